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
  so the job records an error row for it.
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

Reading (:func:`read_source`) goes through explicit filesystems (:class:`SourceFilesystems`) and the
fetcher; every failure is a :class:`SourceError` naming the source, and no source may exceed the
fetcher's ``max_bytes``. Nothing is cached between calls.
"""
from __future__ import annotations

import datetime
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator, Union

import pyarrow.fs as pafs

from raylens.fetch import FETCH_ERROR_KINDS, FetchError, UrlFetcher
from raylens.images import IMAGE_EXTENSIONS
from raylens.manifests import MANIFEST_EXTENSIONS, is_manifest, read_manifest
from raylens.storage import S3Settings, list_files, relative_id, to_uri
from raylens.errors import KindError
from raylens.webdataset import SHARD_EXTENSION, find_member, iter_shard_samples, read_member_range

INPUT_KINDS = ("directory", "manifest", "webdataset")
SOURCE_ERROR_KINDS = frozenset({"missing", "bad_source", "read", "too_large"}) | FETCH_ERROR_KINDS
Scalar = Union[str, int, float, bool, None]
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TAR_SOURCE = re.compile(r"^tar://(?P<shard>.+?\.tar)#(?P<member>.+?)(?:\?offset=(?P<offset>\d+)&size=(?P<size>\d+))?$",
                         re.IGNORECASE | re.DOTALL)


class SourceError(KindError):
    """An input item whose bytes could not be read; ``kind`` is "missing", "bad_source", "read",
    "too_large" or a :class:`raylens.fetch.FetchError` kind. Pickles with its kind."""

    KINDS = SOURCE_ERROR_KINDS


@dataclass(frozen=True)
class InputItem:
    """One unit of work: a stable id, where its image bytes are, an optional question, and the other
    columns of its manifest row (or its WebDataset metadata) to carry to the output."""

    id: str
    source: str  # local path | "s3://bucket/key" | "http(s)://..." | "tar://<shard>#<member>..." | "" (no image)
    question: str | None = None
    extra: tuple[tuple[str, Scalar], ...] = ()


@dataclass(frozen=True)
class SourceFilesystems:
    """The filesystems :func:`read_source` may use, built once and passed down (both pickle)."""

    local: pafs.FileSystem
    s3: pafs.FileSystem | None = None

    @classmethod
    def create(cls, s3: S3Settings | None = None) -> "SourceFilesystems":
        return cls(local=pafs.LocalFileSystem(), s3=s3.filesystem() if s3 is not None else None)


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
    visible = [p for p in files if not _hidden(root, p)]
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


# -------------------------------------------------------------------------------------- listing
def iter_inputs(fs: pafs.FileSystem, root: str, *, image_column: str = "image",
                question_column: str | None = None) -> Iterator[InputItem]:
    """The input items under ``root`` (a path inside ``fs``), in a deterministic order.

    ``image_column`` / ``question_column`` name manifest columns; for WebDataset ``question_column``
    names a metadata field (``"txt"`` or a .json field) instead. Raises FileNotFoundError / ValueError
    for an input that cannot be listed or a manifest/shard that cannot be parsed (naming it), and
    ValueError for ``question_column`` with a directory of images (there is nowhere to read it from).
    """
    kind, files = _scan(fs, root)
    if kind == "directory":
        if question_column is not None:
            raise ValueError(f"question column {question_column!r} needs a manifest or WebDataset input, "
                             f"but {to_uri(fs, root)} is a directory of images")
        for path in files:
            yield InputItem(id=relative_id(root, path), source=to_uri(fs, path))
    elif kind == "manifest":
        for path in files:
            yield from _manifest_items(fs, root, path, image_column, question_column)
    else:
        for path in files:
            yield from _shard_items(fs, root, path, question_column)


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
        return value  # s3://, http(s)://, tar://; any other scheme is refused by read_source, by name
    if isinstance(fs, pafs.LocalFileSystem):
        return os.path.normpath(os.path.join(os.path.dirname(manifest_path), value))
    if value.startswith("/"):
        return value  # an absolute path is a local path, wherever the manifest is
    return to_uri(fs, posixpath.normpath(posixpath.join(posixpath.dirname(manifest_path), value)))


def _shard_items(fs: pafs.FileSystem, root: str, path: str, question_column: str | None) -> Iterator[InputItem]:
    shard = to_uri(fs, path)
    rel = _name_below(root, path)
    for sample in iter_shard_samples(fs, path, shard):
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
            return fetcher.fetch(source)
        except FetchError as exc:
            raise SourceError(exc.kind, str(exc)) from None
    if scheme == "tar":
        return _read_tar(source, filesystems, fetcher.max_bytes)
    if scheme in ("s3", None):
        fs, path = _filesystem_for(source, filesystems)
        return _read_file(fs, path, source, fetcher.max_bytes)
    raise SourceError("bad_source", f"unsupported source {source!r}: expected a local path, s3://, http(s):// or tar://")


def _filesystem_for(uri: str, filesystems: SourceFilesystems) -> tuple[pafs.FileSystem, str]:
    if uri.startswith("s3://"):
        if filesystems.s3 is None:
            raise SourceError("bad_source", f"{uri}: no S3 filesystem was configured for this job")
        return filesystems.s3, uri[len("s3://"):]
    if not os.path.isabs(uri):
        raise SourceError("bad_source", f"{uri!r} is not an absolute local path, s3://, http(s):// or tar:// source")
    return filesystems.local, uri


def _read_file(fs: pafs.FileSystem, path: str, uri: str, max_bytes: int) -> bytes:
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size > max_bytes:
                raise SourceError("too_large", f"{uri} is {size} bytes, more than the limit of {max_bytes}")
            return f.read()
    except FileNotFoundError:
        raise SourceError("missing", f"{uri} does not exist") from None
    except OSError as exc:
        raise SourceError("read", f"cannot read {uri}: {exc}") from None


def _read_tar(source: str, filesystems: SourceFilesystems, max_bytes: int) -> bytes:
    try:
        shard, member, offset, size = parse_tar_source(source)
    except ValueError as exc:
        raise SourceError("bad_source", str(exc)) from None
    fs, path = _filesystem_for(shard, filesystems)
    try:
        if offset is None or size is None:
            offset, size = find_member(fs, path, member)
        if size > max_bytes:
            raise SourceError("too_large", f"{source} is {size} bytes, more than the limit of {max_bytes}")
        return read_member_range(fs, path, member, offset, size)
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError("missing", f"{source}: shard {shard} does not exist") from None
    except KeyError:
        raise SourceError("missing", f"{source}: shard {shard} has no member {member!r}") from None
    except (OSError, ValueError, EOFError, tarfile.TarError) as exc:  # a damaged or rewritten shard
        raise SourceError("read", f"cannot read {source}: {exc}") from None
