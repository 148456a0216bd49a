"""Explicit pyarrow filesystems for local paths and `s3://` URIs, and listing image files.

Every read and write in raylens goes through a `pyarrow.fs.FileSystem` object built here and passed
down explicitly. pyarrow's `S3FileSystem()` ignores `AWS_ENDPOINT_URL(_S3)` on its own (apache/arrow
#49643), so the endpoint is resolved here, once, from a flag or those variables, and carried along.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Iterable, Mapping
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Settings:
    """What an S3-compatible endpoint needs; `from_env` reads the standard AWS variables once."""

    endpoint: str | None = None  # e.g. "http://127.0.0.1:9000"; None = AWS
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

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
        kwargs: dict = {}
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
    """Every file under `root` (recursive) whose lower-cased extension is in `extensions`, sorted."""
    exts = {e.lower() for e in extensions}
    selector = pafs.FileSelector(root, recursive=True)
    found = [
        info.path
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and posixpath.splitext(info.path)[1].lower() in exts
    ]
    return sorted(found)


def relative_id(root: str, path: str) -> str:
    """A stable row id: the path relative to the input root, with forward slashes."""
    rel = posixpath.relpath(path.replace(os.sep, "/"), root.replace(os.sep, "/"))
    return rel


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def ensure_writable_dir(fs: pafs.FileSystem, path: str) -> None:
    """Create `path` and prove it is writable by writing and deleting a marker; raises OSError if not."""
    fs.create_dir(path, recursive=True)
    marker = posixpath.join(path, ".raylens-write-check")
    with fs.open_output_stream(marker) as f:
        f.write(b"ok")
    fs.delete_file(marker)
