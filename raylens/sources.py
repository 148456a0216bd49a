"""What the job's ``--input`` can be, as a stream of input items, and reading one item's bytes.

Why this module exists: inputs come in three shapes, and the job should not care which.

* **directory** (or S3 prefix) of image files: one item per file (``IMAGE_EXTENSIONS``, recursive),
  id = the path relative to the input, source = the file's path or ``s3://`` URI.
* **manifest**: one ``.parquet`` / ``.csv`` / ``.jsonl`` / ``.json`` file, or a directory of them
  (read in sorted order; see :mod:`raylens.manifests` for the formats). One item per row, in file
  order. id = ``"<manifest path relative to the input>:<row number from 0>"`` (for a single-file input,
  the file's name): unique and stable even when rows repeat an image (VQA manifests ask several
  questions of one image). The image column may hold a local path (relative ones are resolved against
  the manifest's directory: on S3 they become ``s3://`` keys next to it; absolute ones are local paths),
  an ``s3://`` URI or an ``http(s)://`` URL (fetched by :class:`raylens.fetch.UrlFetcher`). Other
  columns are carried as ``extra`` (binary values as None; lists, structs and dates as JSON/ISO text).
  A row whose image value is missing, empty or not a string still yields an item, with source "",
  so the job records an error row for it; so does a JSON line that cannot be parsed (its item's
  ``error`` says why; see :mod:`raylens.manifests`).
* **webdataset**: ``.tar`` shards (img2dataset's layout; see :mod:`raylens.webdataset`): one item per
  sample key that has an image member. id = ``"<shard path relative to the input>/<key>"``; source =
  ``tar://<shard>#<member>?offset=<n>&size=<n>`` where ``<shard>`` is the shard's local path or
  ``s3://`` URI and the byte range lets one ranged read fetch the image. ``extra`` carries the
  ``.txt`` member as ``("txt", text)`` and the ``.json`` member's top-level fields under their own
  names (a field named "txt" becomes "json.txt"; a .json that is not an object is carried as "json").

Detection (:func:`detect_input_kind`): a single file is a manifest by extension or a shard if .tar;
a directory holding image files is "directory"; else one holding .tar files is "webdataset" (the
.parquet / _stats.json files img2dataset writes next to its shards are ignored); else one holding
manifest files is "manifest". Files whose name (or a parent directory's, below the input) starts with
"." or "_" (``_SUCCESS``, ``.DS_Store``) are ignored when looking for shards and manifests.

Directory listings (:func:`raylens.storage.list_files`) list each file once and survive link loops.
A file whose name is not valid UTF-8 keeps its row: its id shows the bad bytes as ``\\xNN`` and its
source is a ``file://`` URI with the name's bytes percent-encoded (RFC 8089), which reads back the
exact file. A manifest or shard with such a name is skipped with a warning naming it.

Reading (:func:`read_source`) goes through explicit filesystems (:class:`SourceFilesystems`) and the
fetcher; every failure is a :class:`SourceError` naming the source, and no source may exceed the
fetcher's ``max_bytes``. Nothing is cached between calls. Every read has a time limit
(``SourceFilesystems.read_timeout_s``, local disks included: a stalled network mount must not hold a
task forever); a read past it is abandoned and becomes ``SourceError(timeout)``.

**What a manifest may read.** A manifest is data, often from strangers, so its rows may name only
files under the folder the manifest is in (for a folder of manifests, that folder; for a manifest on
S3, its prefix) and under the ``image_roots`` the user adds (``--image-root``: local folders or
``s3://bucket/prefix``). Local paths are judged after resolving every symbolic link, so neither
``../`` nor a link leads out; an ``s3://`` URI or a relative key is judged by its key (keys holding
``.`` or ``..`` segments are refused: some clients normalise them away). Outside the roots a row is
``SourceError(outside_root)``. Wherever it is, only a regular file is read: a FIFO, a socket, a
device, a directory, or anything under ``/proc``, ``/sys`` or ``/dev`` is ``SourceError(not_a_file)``,
found without opening it (a FIFO is never opened). http(s) URLs are governed by
:class:`raylens.fetch.UrlFetcher` instead. Directory and WebDataset inputs have no roots: their
files come from our own listing of the user's tree (links followed, see :mod:`raylens.storage`),
but the regular-file rule holds for them too.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar, Union
from urllib.parse import quote, unquote_to_bytes

import pyarrow.fs as pafs

from raylens.errors import KindError
from raylens.fetch import FETCH_ERROR_KINDS, FetchError, UrlFetcher
from raylens.images import IMAGE_EXTENSIONS
from raylens.manifests import MANIFEST_EXTENSIONS, BadRow, is_manifest, read_manifest
from raylens.storage import (S3Settings, has_undecodable_bytes, list_files, readable_name, relative_id, retry_transient,
                             to_uri)
from raylens.webdataset import SHARD_EXTENSION, find_member, iter_shard_samples, read_member_range

logger = logging.getLogger(__name__)
T = TypeVar("T")

INPUT_KINDS = ("directory", "manifest", "webdataset")
SOURCE_ERROR_KINDS = frozenset({"missing", "bad_source", "bad_row", "read", "too_large", "outside_root",
                                "not_a_file"}) | FETCH_ERROR_KINDS
DEFAULT_READ_TIMEOUT_S = 120.0
KERNEL_FILESYSTEMS = ("/proc", "/sys", "/dev")
Scalar = Union[str, int, float, bool, None]
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TAR_SOURCE = re.compile(r"^tar://(?P<shard>.+?\.tar)#(?P<member>.+?)(?:\?offset=(?P<offset>\d+)&size=(?P<size>\d+))?$",
                         re.IGNORECASE | re.DOTALL)


class SourceError(KindError):
    """An input item whose bytes could not be read; ``kind`` is "missing", "bad_source", "bad_row" (a
    manifest row that could not be parsed), "read", "too_large", "outside_root", "not_a_file",
    "timeout" or another :class:`raylens.fetch.FetchError` kind. Pickles with its kind."""

    KINDS = SOURCE_ERROR_KINDS


@dataclass(frozen=True)
class InputItem:
    """One unit of work: a stable id, where its image bytes are, an optional question, and the other
    columns of its manifest row (or its WebDataset metadata) to carry to the output."""

    id: str
    source: str  # local path | "file://..." | "s3://bucket/key" | "http(s)://..." | "tar://<shard>#<member>..." | "" (no image)
    question: str | None = None
    extra: tuple[tuple[str, Scalar], ...] = ()
    error: str | None = None  # known bad while listing (a manifest line that is not JSON): read as bad_row


@dataclass(frozen=True)
class ReadRoots:
    """Where a manifest's rows may read (see the module docstring): local folders as real paths (every
    link resolved) and S3 prefixes as ``bucket`` or ``bucket/prefix``."""

    local: tuple[str, ...] = ()
    s3: tuple[str, ...] = ()

    def allows_local(self, real_path: str) -> bool:
        return any(_within(real_path, root) for root in self.local)

    def allows_s3(self, path: str) -> bool:
        return any(_within(path, root) for root in self.s3)

    def describe(self) -> str:
        shown = [*self.local, *(f"s3://{r}" for r in self.s3)]
        return ", ".join(shown) if shown else "none"

    @classmethod
    def of(cls, roots: Sequence[str]) -> "ReadRoots":
        """Roots given as folders or ``s3://bucket/prefix`` URIs (local ones resolved to their real paths)."""
        local = [os.path.realpath(r) for r in roots if not r.startswith("s3://")]
        s3 = [r[len("s3://"):].strip("/") for r in roots if r.startswith("s3://")]
        return cls(local=tuple(dict.fromkeys(local)), s3=tuple(dict.fromkeys(s3)))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class SourceFilesystems:
    """What :func:`read_source` may use and where it may read, built once and passed down (pickles).

    ``roots`` None reads anywhere (directory and WebDataset inputs); a :class:`ReadRoots` confines a
    manifest's rows. ``read_timeout_s`` bounds every local, S3 and tar read."""

    local: pafs.FileSystem
    s3: pafs.FileSystem | None = None
    roots: ReadRoots | None = None
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    s3_settings: S3Settings | None = field(default=None, repr=False)

    @classmethod
    def create(cls, s3: S3Settings | None = None, *, roots: ReadRoots | None = None,
               read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> "SourceFilesystems":
        return cls(local=pafs.LocalFileSystem(), s3=s3.filesystem() if s3 is not None else None, roots=roots,
                   read_timeout_s=read_timeout_s, s3_settings=s3)

    def __reduce__(self):
        # pyarrow's S3FileSystem pickles without its retry strategy (it would fall back to 3 attempts):
        # where the settings are known, each process builds its own from them.
        if self.s3_settings is not None:
            return (_rebuild_filesystems, (self.s3_settings, self.roots, self.read_timeout_s))
        return (SourceFilesystems, (self.local, self.s3, self.roots, self.read_timeout_s))


def _rebuild_filesystems(s3: S3Settings, roots: ReadRoots | None, read_timeout_s: float) -> SourceFilesystems:
    return SourceFilesystems.create(s3, roots=roots, read_timeout_s=read_timeout_s)


@dataclass(frozen=True)
class InputListing:
    """What :func:`list_inputs` found: the input's kind, its items in order, and the roots its rows
    may read (None for directory and WebDataset inputs)."""

    kind: str
    items: list[InputItem]
    roots: ReadRoots | None


# -------------------------------------------------------------------------------------- detection
def detect_input_kind(fs: pafs.FileSystem, path: str) -> str:
    """"directory", "manifest" or "webdataset" (see the module docstring). Raises FileNotFoundError
    when nothing is at ``path``, ValueError for a single file that is neither manifest nor shard."""
    return _scan(fs, path)[0]


def _scan(fs: pafs.FileSystem, root: str) -> tuple[str, list[str]]:
    """(kind, the files to read for that kind, sorted): one listing serves detection and reading."""
    uri = to_uri(fs, root)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        if is_manifest(root):
            return "manifest", [root]
        if _ext(root) == SHARD_EXTENSION:
            return "webdataset", [root]
        raise ValueError(f"input {uri} is a single file that is neither a manifest "
                         "(.parquet, .jsonl, .json, .csv) nor a WebDataset shard (.tar); pass a directory")
    files = list_files(fs, root, IMAGE_EXTENSIONS | {SHARD_EXTENSION, *MANIFEST_EXTENSIONS})
    images = [p for p in files if _ext(p) in IMAGE_EXTENSIONS]
    if images:
        return "directory", images
    visible = [p for p in files if not _hidden(root, p) and not _unreadable_name(p)]
    shards = [p for p in visible if _ext(p) == SHARD_EXTENSION]
    if shards:
        return "webdataset", shards
    manifests = [p for p in visible if is_manifest(p)]
    if manifests:
        return "manifest", manifests
    return "directory", []


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _hidden(root: str, path: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative_id(root, path).split("/"))


def _unreadable_name(path: str) -> bool:
    """A manifest or shard named in bytes pyarrow cannot take (its paths are UTF-8): skipped, said."""
    if _ext(path) not in (SHARD_EXTENSION, *MANIFEST_EXTENSIONS) or not has_undecodable_bytes(path):
        return False
    logger.warning("skipping %s: its name is not valid UTF-8; rename it to read it", readable_name(path))
    return True


def file_uri(path: str) -> str:
    """``file://`` + the path's bytes percent-encoded: a text name for any local path (RFC 8089)."""
    return "file://" + quote(os.fsencode(path), safe="/")


# -------------------------------------------------------------------------------------- listing
def list_inputs(fs: pafs.FileSystem, root: str, *, image_column: str = "image", question_column: str | None = None,
                image_roots: Sequence[str] = ()) -> InputListing:
    """The input items under ``root`` (a path inside ``fs``), in a deterministic order, with the kind
    of input and, for manifests, the :class:`ReadRoots` their rows may read: the manifest's folder
    plus ``image_roots`` (local folders, which must exist, or ``s3://`` prefixes).

    ``image_column`` / ``question_column`` name manifest columns; for WebDataset ``question_column``
    names a metadata field (``"txt"`` or a .json field) instead. Raises FileNotFoundError / ValueError
    for an input that cannot be listed or a manifest/shard that cannot be parsed (naming it), and
    ValueError for ``question_column`` with a directory of images (there is nowhere to read it from),
    for ``image_roots`` with an input that is not a manifest, and for an image root that is no folder.
    """
    def listed() -> tuple[str, list[InputItem]]:  # all again after a transient object-store failure
        kind, files = _scan(fs, root)
        return kind, list(_items(fs, root, kind, files, image_column, question_column))

    kind, items = retry_transient(listed)
    if image_roots and kind != "manifest":
        raise ValueError(f"--image-root widens what manifest rows may read, but {to_uri(fs, root)} is a {kind} input")
    roots = manifest_roots(fs, root, image_roots) if kind == "manifest" else None
    return InputListing(kind=kind, items=items, roots=roots)


def iter_inputs(fs: pafs.FileSystem, root: str, *, image_column: str = "image",
                question_column: str | None = None) -> Iterator[InputItem]:
    """The items of :func:`list_inputs`, without the kind and roots."""
    kind, files = _scan(fs, root)
    yield from _items(fs, root, kind, files, image_column, question_column)


def _items(fs: pafs.FileSystem, root: str, kind: str, files: list[str], image_column: str,
           question_column: str | None) -> Iterator[InputItem]:
    if kind == "directory":
        if question_column is not None:
            raise ValueError(f"question column {question_column!r} needs a manifest or WebDataset input, "
                             f"but {to_uri(fs, root)} is a directory of images")
        for path in files:
            if has_undecodable_bytes(path):  # a row that names the file and reads it back exactly
                yield InputItem(id=readable_name(relative_id(root, path)), source=file_uri(path))
            else:
                yield InputItem(id=relative_id(root, path), source=to_uri(fs, path))
    elif kind == "manifest":
        for path in files:
            yield from _manifest_items(fs, root, path, image_column, question_column)
    else:
        for path in files:
            yield from _shard_items(fs, root, path, question_column)


def manifest_roots(fs: pafs.FileSystem, root: str, image_roots: Sequence[str] = ()) -> ReadRoots:
    """The roots a manifest input's rows may read: its folder (``root`` itself when it is a folder of
    manifests) and every image root. ValueError for a local image root that is not a folder."""
    folder = root if fs.get_file_info(root).type == pafs.FileType.Directory else posixpath.dirname(root)
    roots = ["s3://" + folder if isinstance(fs, pafs.S3FileSystem) else folder]
    for extra in image_roots:
        if extra.startswith("s3://"):
            prefix = extra[len("s3://"):].strip("/")
            if not prefix or _dot_segments(prefix):
                raise ValueError(f"--image-root {extra!r} is not an s3://bucket[/prefix]")
            roots.append(extra)
        elif "://" in extra:
            raise ValueError(f"--image-root {extra!r}: expected a local folder or s3://bucket/prefix")
        else:
            real = os.path.realpath(os.path.expanduser(extra))
            if not os.path.isdir(real):
                raise ValueError(f"--image-root {extra} is not a folder")
            roots.append(real)
    return ReadRoots.of(roots)


def _name_below(root: str, path: str) -> str:
    """How an id names a file: relative to the input directory, or its file name for a file input."""
    return posixpath.basename(path) if path == root else relative_id(root, path)


def _manifest_items(fs: pafs.FileSystem, root: str, path: str, image_column: str,
                    question_column: str | None) -> Iterator[InputItem]:
    name = to_uri(fs, path)
    columns, rows = read_manifest(fs, path, name)
    for wanted, flag in ((image_column, "image"), (question_column, "question")):
        if wanted is not None and wanted not in columns:
            raise ValueError(f"manifest {name} has no {flag} column {wanted!r}; its columns are {columns}")
    carried = [c for c in columns if c not in (image_column, question_column)]
    rel = _name_below(root, path)
    for index, row in enumerate(rows):
        if isinstance(row, BadRow):  # one error row, like any other bad row
            yield InputItem(id=f"{rel}:{index}", source="", extra=tuple((c, None) for c in carried), error=row.message)
            continue
        yield InputItem(
            id=f"{rel}:{index}",
            source=_manifest_source(fs, path, row.get(image_column)),
            question=_question(row.get(question_column)) if question_column else None,
            extra=tuple((c, _scalar(row.get(c))) for c in carried),
        )


def _manifest_source(fs: pafs.FileSystem, manifest_path: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        return ""
    value = value.strip()
    if _SCHEME.match(value):
        return value  # s3://, http(s)://, tar://, file://; any other scheme is refused by read_source, by name
    if isinstance(fs, pafs.LocalFileSystem):
        return os.path.normpath(os.path.join(os.path.dirname(manifest_path), value))
    if value.startswith("/"):
        return value  # an absolute path is a local path, wherever the manifest is
    return to_uri(fs, posixpath.normpath(posixpath.join(posixpath.dirname(manifest_path), value)))


def _shard_items(fs: pafs.FileSystem, root: str, path: str, question_column: str | None) -> Iterator[InputItem]:
    shard = to_uri(fs, path)
    rel = _name_below(root, path)
    for sample in iter_shard_samples(fs, path, shard):
        if has_undecodable_bytes(sample.image_member):  # no text id or tar:// source can name it exactly
            logger.warning("skipping member %s of %s: its name is not valid UTF-8", readable_name(sample.image_member), shard)
            continue
        extra: list[tuple[str, Scalar]] = []
        if "txt" in sample.metadata:
            extra.append(("txt", _scalar(sample.metadata["txt"])))
        meta = sample.metadata.get("json")
        if isinstance(meta, dict):
            extra.extend(("json.txt" if k == "txt" else k, _scalar(v)) for k, v in meta.items())
        elif "json" in sample.metadata:
            extra.append(("json", _scalar(meta)))
        question = None
        if question_column is not None:
            found = [v for k, v in extra if k == question_column]
            extra = [(k, v) for k, v in extra if k != question_column]
            question = _question(found[0]) if found else None
        yield InputItem(id=f"{rel}/{sample.key}", source=tar_source(shard, sample.image_member, sample.offset, sample.size),
                        question=question, extra=tuple(extra))


def _scalar(value: object) -> Scalar:
    """A manifest/metadata value as something every output format can hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None  # embedded bytes (an image column of another name): too big to copy into every row
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _question(value: object) -> str | None:
    value = _scalar(value)
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


# -------------------------------------------------------------------------------------- tar sources
def tar_source(shard: str, member: str, offset: int | None = None, size: int | None = None) -> str:
    """``tar://<shard path or s3:// URI>#<member>``, with ``?offset=&size=`` when the range is known."""
    base = f"tar://{shard}#{member}"
    return base if offset is None or size is None else f"{base}?offset={offset}&size={size}"


def parse_tar_source(source: str) -> tuple[str, str, int | None, int | None]:
    """(shard, member, offset, size) of a tar source; ValueError when it is not one."""
    match = _TAR_SOURCE.match(source)
    if not match:
        raise ValueError(f"{source!r} is not a tar source (tar://<shard>.tar#<member>[?offset=N&size=N])")
    offset, size = match.group("offset"), match.group("size")
    return (match.group("shard"), match.group("member"),
            int(offset) if offset is not None else None, int(size) if size is not None else None)


# -------------------------------------------------------------------------------------- reading
def read_source(source: str, *, filesystems: SourceFilesystems, fetcher: UrlFetcher) -> bytes:
    """The bytes of one item's source, or SourceError (kind + a message naming the source)."""
    if not isinstance(source, str) or not source.strip():
        raise SourceError("bad_source", "the input has no image: its image value is missing, empty or not a string")
    match = _SCHEME.match(source)
    scheme = match.group(1).lower() if match else None
    if scheme in ("http", "https"):
        try:
            return fetcher.fetch(source)  # under the fetcher's own time budget
        except FetchError as exc:
            raise SourceError(exc.kind, str(exc)) from None
    if scheme == "tar":
        return _bounded(filesystems.read_timeout_s, source, _read_tar, source, filesystems, fetcher.max_bytes)
    if scheme == "s3":
        path = _s3_path(source, filesystems)
        return _bounded(filesystems.read_timeout_s, source, _read_file, filesystems.s3, path, source, fetcher.max_bytes)
    if scheme == "file" or scheme is None:
        path = _local_path(source)
        return _bounded(filesystems.read_timeout_s, source, _read_local, path, source, filesystems.roots, fetcher.max_bytes)
    raise SourceError("bad_source", f"unsupported source {source!r}: expected a local path, s3://, http(s)://, "
                      "file:// or tar://")


def _bounded(seconds: float, uri: str, read: Callable[..., T], *args) -> T:
    """``read(*args)`` on a thread of its own, given up on after ``seconds``.

    A read stuck in the kernel (a hard-mounted NFS server gone, a stalled FUSE mount) cannot be
    interrupted, not even by a signal; waiting on another thread is the only way to let the task go
    on. The abandoned thread is a daemon: it ends with its read, or with the process."""
    outcome: list = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, read(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, name="raylens-read", daemon=True).start()
    if not done.wait(seconds):
        raise SourceError("timeout", f"{readable_name(uri)}: no complete read within {seconds:g}s "
                          "(a stalled disk, network mount or object store?); the read was abandoned")
    ok, value = outcome[0]
    if ok:
        return value
    raise value


def _local_path(source: str) -> str:
    """The local path a plain path or ``file://`` URI names (file URIs may carry any bytes)."""
    if source.lower().startswith("file://"):
        rest = source[len("file://"):]
        if rest.lower().startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            raise SourceError("bad_source", f"{source!r}: a file:// URI must name an absolute path (file:///...)")
        return os.fsdecode(unquote_to_bytes(rest))
    if not os.path.isabs(source):
        raise SourceError("bad_source", f"{source!r} is not an absolute local path, s3://, http(s)://, file:// or tar:// source")
    return source


def _s3_path(uri: str, filesystems: SourceFilesystems) -> str:
    """``bucket/key`` of an s3:// URI, after the roots check."""
    if filesystems.s3 is None:
        raise SourceError("bad_source", f"{uri}: no S3 filesystem was configured for this job")
    path = uri[len("s3://"):]
    roots = filesystems.roots
    if roots is not None:
        if _dot_segments(path):
            raise SourceError("outside_root", f"{uri}: keys with '.' or '..' segments are refused in manifests "
                              "(some clients resolve them, others do not)")
        if not roots.allows_s3(path):
            raise SourceError("outside_root", f"{uri} is outside what this manifest may read ({roots.describe()}); "
                              "--image-root s3://bucket/prefix allows more")
    return path


def _dot_segments(path: str) -> bool:
    return any(part in (".", "..") for part in path.split("/"))


def _checked_local(path: str, uri: str, roots: ReadRoots | None, max_bytes: int) -> tuple[str, os.stat_result]:
    """The real path of a local file that may be read, and its stat; SourceError otherwise. Nothing
    is opened here: a FIFO or device is recognised by its stat alone."""
    real = os.path.realpath(path)
    shown = readable_name(uri)
    if roots is not None and not roots.allows_local(real):
        via = "" if real == os.path.normpath(path) else f" (it resolves to {readable_name(real)})"
        raise SourceError("outside_root", f"{shown} is outside the folders this manifest may read{via}: "
                          f"{roots.describe()}; --image-root DIR allows more")
    kernel = next((k for k in KERNEL_FILESYSTEMS if _within(real, k)), None)
    if kernel is not None:
        raise SourceError("not_a_file", f"{shown} is under {kernel}, a kernel filesystem, not an image file")
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise SourceError("missing", f"{shown} does not exist") from None
    except OSError as exc:
        raise SourceError("read", f"cannot read {shown}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SourceError("not_a_file", f"{shown} is {_file_type(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise SourceError("too_large", f"{shown} is {info.st_size} bytes, more than the limit of {max_bytes}")
    return real, info


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _read_local(path: str, uri: str, roots: ReadRoots | None, max_bytes: int) -> bytes:
    real, info = _checked_local(path, uri, roots, max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)  # O_NONBLOCK: should it have become a FIFO since, opening does not wait
    except FileNotFoundError:
        raise SourceError("missing", f"{readable_name(uri)} does not exist") from None
    except OSError as exc:
        raise SourceError("read", f"cannot read {readable_name(uri)}: {exc.strerror or exc}") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise SourceError("read", f"{readable_name(uri)} was replaced while it was being opened")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise SourceError("too_large", f"{readable_name(uri)} is more than the limit of {max_bytes} bytes")
    except OSError as exc:
        raise SourceError("read", f"cannot read {readable_name(uri)}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _read_file(fs: pafs.FileSystem, path: str, uri: str, max_bytes: int) -> bytes:
    def read() -> bytes:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size > max_bytes:
                raise SourceError("too_large", f"{uri} is {size} bytes, more than the limit of {max_bytes}")
            return f.read()

    try:
        return retry_transient(read)  # what the AWS SDK leaves unretried (raylens.storage)
    except FileNotFoundError:
        raise SourceError("missing", f"{uri} does not exist") from None
    except OSError as exc:
        raise SourceError("read", f"cannot read {uri}: {exc}") from None


def _read_tar(source: str, filesystems: SourceFilesystems, max_bytes: int) -> bytes:
    try:
        shard, member, offset, size = parse_tar_source(source)
    except ValueError as exc:
        raise SourceError("bad_source", str(exc)) from None
    if shard.startswith("s3://"):
        fs, path = filesystems.s3, _s3_path(shard, filesystems)
    else:
        fs = filesystems.local
        path, _ = _checked_local(_local_path(shard), shard, filesystems.roots, max_bytes=1 << 62)
    def read(offset: int | None = offset, size: int | None = size) -> bytes:
        if offset is None or size is None:
            offset, size = find_member(fs, path, member)
        if size > max_bytes:
            raise SourceError("too_large", f"{source} is {size} bytes, more than the limit of {max_bytes}")
        return read_member_range(fs, path, member, offset, size)

    try:
        return retry_transient(read)
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError("missing", f"{source}: shard {shard} does not exist") from None
    except KeyError:
        raise SourceError("missing", f"{source}: shard {shard} has no member {member!r}") from None
    except (OSError, ValueError, EOFError, tarfile.TarError) as exc:  # a damaged or rewritten shard
        raise SourceError("read", f"cannot read {source}: {exc}") from None
