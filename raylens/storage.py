"""Explicit pyarrow filesystems for local paths and `s3://` URIs, and listing image files.

Every read and write in raylens goes through a `pyarrow.fs.FileSystem` object built here and passed
down explicitly. pyarrow's `S3FileSystem()` ignores `AWS_ENDPOINT_URL(_S3)` on its own (apache/arrow
#49643), so the endpoint is resolved here, once, from a flag or those variables, and carried along.
S3 requests that fail transiently (5xx, throttling, dropped connections) are retried by the AWS SDK
with backoff, `S3Settings.retry_attempts` times in all. A pickled `S3FileSystem` forgets its retry
strategy (pyarrow 26 leaves it out of `__reduce__`): build filesystems from `S3Settings` where they
are used rather than shipping them. One transient failure the SDK does not retry: it writes an error
answer's XML body (a few hundred bytes) into the buffer of a ranged read, and a read smaller than that
body fails as a non-retryable INTERNAL_FAILURE "Failed to flush response stream" (small files like
`_manifest.json`, Parquet column chunks). `retry_transient` retries such failures, and `read_bytes`
(a whole file in one read) uses it.

Listing a local tree is our own walk, not pyarrow's recursive selector, which follows symbolic links
without remembering where it has been: `ln -s . loop` listed every image 41 times, and two such links
made it run forever. The walk (`list_files`) visits each directory once (by device and inode), lists
each file once (by its path with every link resolved), walks the real tree before anything reached
through a link, and skips what is not a regular file (FIFOs, devices, sockets) and links that lead
nowhere or in circles, with a warning naming them. Links are followed, also out of the input: the
input is the user's own tree. File names that are not valid UTF-8 come back as Python strings with
surrogate escapes (`os.fsdecode`); callers decide how to name them.
"""
from __future__ import annotations

import heapq
import logging
import os
import posixpath
import re
import stat
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_S3_RETRY_ATTEMPTS = 6
# What pyarrow's S3 errors say when a retry may succeed (the SDK's error types, or the HTTP status).
_TRANSIENT = re.compile(r"AWS Error (INTERNAL_FAILURE|NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|THROTTLING|"
                        r"REQUEST_TIMEOUT|REQUEST_TIME_TOO_SKEWED)|HTTP status (5\d\d|429)")


@dataclass(frozen=True)
class S3Settings:
    """What an S3-compatible endpoint needs; `from_env` reads the standard AWS variables once."""

    endpoint: str | None = None  # e.g. "http://127.0.0.1:9000"; None = AWS
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    retry_attempts: int = DEFAULT_S3_RETRY_ATTEMPTS  # per request, the first one included

    @classmethod
    def from_env(cls, env: Mapping[str, str], endpoint: str | None = None) -> "S3Settings":
        return cls(
            endpoint=endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            access_key=env.get("AWS_ACCESS_KEY_ID"),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
        )

    def filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.retry_attempts)}
        if self.endpoint:
            parsed = urlparse(self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        if self.region:
            kwargs["region"] = self.region
        if self.access_key and self.secret_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key, session_token=self.session_token)
        return pafs.S3FileSystem(**kwargs)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve_filesystem(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an `s3://bucket/key` URI."""
    if is_s3(uri):
        return (s3 or S3Settings()).filesystem(), uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The user-facing name of `path` (what goes into the output's `image` column)."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def list_files(fs: pafs.FileSystem, root: str, extensions: Iterable[str]) -> list[str]:
    """Every regular file under `root` (recursive) whose lower-cased extension is in `extensions`, sorted.
    Local trees are walked by `_walk_local` (see the module docstring); object stores have no links."""
    exts = {e.lower() for e in extensions}
    if isinstance(fs, pafs.LocalFileSystem):
        return sorted(_walk_local(root, exts))
    selector = pafs.FileSelector(root, recursive=True)
    found = [
        info.path
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and posixpath.splitext(info.path)[1].lower() in exts
    ]
    return sorted(found)


def _walk_local(root: str, exts: set[str]) -> list[str]:
    """Paths of the regular files under `root` with these extensions: each file once, under the first
    path that reaches it (the real tree first, then links in sorted order); each directory once.

    Terminates on any tree: a directory is entered only the first time its (device, inode) is seen,
    and every link met is taken once. Memory grows with the number of distinct directories and files,
    never with the number of paths that reach them. An unreadable directory raises OSError."""
    visited_dirs: set[tuple[int, int]] = set()
    files: dict[str, str] = {}  # real path -> the path it is listed under
    links: list[str] = []  # a heap: links are followed after the real tree, smallest path first

    def walk(top: str, real_top: str) -> None:
        stack = [(top, real_top)]
        while stack:
            path, real = stack.pop()
            with os.scandir(path) as entries:
                for entry in entries:
                    name = entry.name
                    if entry.is_symlink():
                        heapq.heappush(links, entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        if _enter(info):
                            stack.append((entry.path, os.path.join(real, name)))
                    elif _wanted(name, exts):
                        if entry.is_file(follow_symlinks=False):
                            files.setdefault(os.path.join(real, name), entry.path)
                        else:
                            logger.warning("skipping %s: not a regular file", readable_name(entry.path))

    def _enter(info: os.stat_result) -> bool:
        key = (info.st_dev, info.st_ino)
        if key in visited_dirs:
            return False
        visited_dirs.add(key)
        return True

    _enter(os.stat(root))
    walk(root, os.path.realpath(root))
    while links:
        link = heapq.heappop(links)
        try:
            info = os.stat(link)  # follows the link (and any chain of them)
        except OSError as exc:  # nothing behind it, a cycle of links, no permission
            if _wanted(link, exts):
                logger.warning("skipping %s: a link that leads nowhere (%s)", readable_name(link), exc.strerror or exc)
            continue
        if stat.S_ISDIR(info.st_mode):
            if _enter(info):
                walk(link, os.path.realpath(link))
        elif _wanted(link, exts):
            if stat.S_ISREG(info.st_mode):
                files.setdefault(os.path.realpath(link), link)
            else:
                logger.warning("skipping %s: a link to something that is not a regular file", readable_name(link))
    return list(files.values())


def _wanted(name: str, exts: set[str]) -> bool:
    return posixpath.splitext(name)[1].lower() in exts


def has_undecodable_bytes(text: str) -> bool:
    """A name holding bytes that are not UTF-8 (``os.fsdecode`` made them lone surrogates)."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def readable_name(path: str) -> str:
    """A path as ids and messages show it: bytes that are not UTF-8 as \\xNN (always valid UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if has_undecodable_bytes(path) else path


def relative_id(root: str, path: str) -> str:
    """A stable row id: the path relative to the input root, with forward slashes."""
    rel = posixpath.relpath(path.replace(os.sep, "/"), root.replace(os.sep, "/"))
    return rel


def is_transient(exc: BaseException) -> bool:
    """An object-store failure that another attempt may not meet (never a missing key or a refusal)."""
    return (isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError))
            and bool(_TRANSIENT.search(str(exc))))


def retry_transient(fn: Callable[[], T], *, attempts: int = 4, first_delay_s: float = 0.2) -> T:
    """``fn()``, again after a transient failure (`is_transient`), with exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            logger.info("retrying after a transient storage error: %s", exc)
            time.sleep(first_delay_s * 2**attempt)
    raise AssertionError("unreachable")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole file, transient failures retried (see the module docstring)."""

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retry_transient(read)


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Readers see the whole file or none of it: on local disks through a hidden temporary name, moved into
    place; on object stores one PUT is atomic."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = posixpath.join(posixpath.dirname(path), "." + posixpath.basename(path) + ".tmp")
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def ensure_writable_dir(fs: pafs.FileSystem, path: str) -> None:
    """Create `path` and prove it is writable by writing and deleting a marker; raises OSError if not."""
    fs.create_dir(path, recursive=True)
    marker = posixpath.join(path, ".raylens-write-check")
    with fs.open_output_stream(marker) as f:
        f.write(b"ok")
    fs.delete_file(marker)
