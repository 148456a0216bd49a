"""Output layout of the caption job: one file per input shard, written only once the shard is complete.

Why this shape: it makes the job exactly-once and resumable without remembering row ids. Inputs are
listed in a fixed order and cut into shards of `shard_size` images; shard `k` becomes
`part-00000k.parquet` (or `.jsonl`), written in one piece (a temporary name then a rename on local disks;
a single PUT on S3, which is atomic). A rerun skips the shards whose files exist *and read back whole*
(`finished_shards`: a truncated, empty or foreign file is redone), so there are no duplicates and nothing
missing, and the driver tracks shard numbers, not rows. `_manifest.json` pins the sharding and records
what produced the output (`jobs/caption_identity.py`), so a rerun cuts the same shards of the same work.

Only what this module names is the job's (`is_job_file`): the part files, `_manifest.json`,
`_summary.json` and their temporary files, at the top of `--output`. `--overwrite` deletes those and
nothing else, and the output may not overlap the input (`output_overlap`).

This module knows nothing of models or Ray: it receives Arrow tables with a `__shard` column.
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylens.storage import read_bytes, retry_transient, write_atomically

logger = logging.getLogger("raylens.caption")

MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "_summary.json"
MANIFEST_VERSION = 2
FORMATS = ("parquet", "jsonl")
_PART = re.compile(r"^part-(\d{6,})\.(parquet|jsonl)$")
# Temporary names of atomic local writes, and `raylens.storage.ensure_writable_dir`'s probe.
_TEMP = re.compile(r"^\.(part-\d{6,}\.(parquet|jsonl)|_manifest\.json|_summary\.json)\.tmp$")
_WRITE_CHECK = ".raylens-write-check"
_CHECK_THREADS = 16  # part files checked at once on a rerun (S3: one ranged GET each)


# ------------------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class Manifest:
    """What a rerun must agree with to resume: how inputs are cut into shards, and `identity`, the
    fingerprints and settings that produced the rows (built by `jobs.caption_identity`)."""

    num_inputs: int
    shard_size: int
    format: str
    identity: dict = field(default_factory=dict)
    model_name: str | None = None  # how --model was spelt (messages only; identity has its content)

    @property
    def num_shards(self) -> int:
        return (self.num_inputs + self.shard_size - 1) // self.shard_size

    def inputs_in_shard(self, shard: int) -> int:
        return max(0, min(self.shard_size, self.num_inputs - shard * self.shard_size))

    def to_json(self) -> str:
        return json.dumps({"version": MANIFEST_VERSION, "num_inputs": self.num_inputs, "shard_size": self.shard_size,
                           "format": self.format, "model_name": self.model_name, "identity": self.identity}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Raises ValueError for text that is not a manifest. A manifest of an older raylens (no
        `identity`) loads with what it recorded, so a comparison names everything it lacks."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        try:
            identity = d.get("identity")
            if not isinstance(identity, dict):
                identity = {k: d[k] for k in ("inputs_sha256", "prompts") if k in d}
            return cls(int(d["num_inputs"]), int(d["shard_size"]), str(d["format"]), identity, d.get("model_name"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or bad field {exc}") from None


def read_manifest(fs: pafs.FileSystem, root: str) -> Manifest | None:
    """The manifest under `root`; None when there is none; ValueError when it cannot be read."""
    path = posixpath.join(root, MANIFEST_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    data = read_bytes(fs, path)  # a small file: on S3 it needs raylens.storage's retries
    try:
        return Manifest.from_json(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{MANIFEST_FILE} is not a raylens manifest ({exc})") from None


def write_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    write_atomically(fs, posixpath.join(root, MANIFEST_FILE), manifest.to_json().encode())


# ------------------------------------------------------------------------------------- what is ours
def shard_file(shard: int, fmt: str) -> str:
    return f"part-{shard:06d}.{fmt}"


def is_job_file(name: str) -> bool:
    """A top-level file name the job writes (and so the only kind --overwrite may delete)."""
    return bool(_PART.match(name) or _TEMP.match(name)) or name in (MANIFEST_FILE, SUMMARY_FILE, _WRITE_CHECK)


def top_level_files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)) if i.type == pafs.FileType.File]


def delete_job_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Delete the job's own files at the top of `root` (never folders, never other files); their names."""
    deleted = []
    for info in top_level_files(fs, root):
        if is_job_file(info.base_name):
            fs.delete_file(info.path)
            deleted.append(info.base_name)
    return sorted(deleted)


@dataclass(frozen=True)
class Location:
    """Where a path really is: ("local", its resolved path) or ("s3", "bucket/key")."""

    scheme: str
    path: str


def location_of(fs: pafs.FileSystem, path: str) -> Location:
    """Symlinks resolved on local disks (an output reached through a link is still inside the input)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return Location("local", os.path.realpath(path))
    return Location("s3", path.strip("/"))


def output_overlap(input_loc: Location, output_loc: Location) -> str | None:
    """Why --output may not be where it is, or None. Compared by path component: `b/in-captions` is
    not inside `b/in`. Inputs and outputs on different storages never overlap."""
    if input_loc.scheme != output_loc.scheme:
        return None
    if input_loc.path == output_loc.path:
        return "is --input"
    if _below(output_loc.path, input_loc.path):
        return "is inside --input"
    if _below(input_loc.path, output_loc.path):
        return "contains --input"
    return None


def _below(path: str, folder: str) -> bool:
    prefix = folder if folder.endswith("/") else folder + "/"
    return folder == "" or path.startswith(prefix)


# ------------------------------------------------------------------------------------- writing
def _json_value(value):
    """JSON has no NaN or Infinity: a non-finite float is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def encode_table(table: pa.Table, fmt: str) -> bytes:
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    return "".join(json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False, allow_nan=False) + "\n"
                   for row in table.to_pylist()).encode()


class ShardWriter:
    """Buffers rows per shard and writes each shard's file the moment its last row arrives."""

    def __init__(self, fs: pafs.FileSystem, root: str, fmt: str, expected_rows: dict[int, int], schema: pa.Schema) -> None:
        self.fs, self.root, self.fmt, self.schema = fs, root, fmt, schema
        self.expected = dict(expected_rows)
        self._pending: dict[int, list[pa.Table]] = {}
        self._counts: dict[int, int] = {}
        self.written: list[int] = []

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        shards = table.column("__shard").to_pylist()
        for shard in sorted(set(shards)):
            part = table.filter(pc.equal(table.column("__shard"), shard))
            self._pending.setdefault(shard, []).append(part)
            self._counts[shard] = self._counts.get(shard, 0) + part.num_rows
            if self._counts[shard] >= self.expected[shard]:
                self._flush(shard)

    def _flush(self, shard: int) -> None:
        table = pa.concat_tables(self._pending.pop(shard)).drop_columns(["__shard"]).sort_by([("id", "ascending")])
        write_atomically(self.fs, posixpath.join(self.root, shard_file(shard, self.fmt)), encode_table(table.cast(self.schema), self.fmt))
        self.written.append(shard)

    def incomplete(self) -> dict[int, int]:
        """Shards not written: shard -> rows received so far."""
        return {s: self._counts.get(s, 0) for s in self.expected if s not in self.written}

    def rows_of(self, shard: int) -> pa.Table | None:
        parts = self._pending.get(shard)
        return pa.concat_tables(parts) if parts else None


# ------------------------------------------------------------------------------------- reading back
def _read_part(fs: pafs.FileSystem, path: str, fmt: str, columns: list[str] | None) -> pa.Table:
    # One whole read (retried when transient), not Parquet's small ranged reads of column chunks, which
    # the AWS SDK does not retry when an error answer outgrows them (raylens.storage).
    data = read_bytes(fs, path)
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(data), columns=columns)
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
    if columns is not None:
        rows = [{c: r.get(c) for c in columns} for r in rows]
    return pa.Table.from_pylist(rows)


def check_part(fs: pafs.FileSystem, path: str, fmt: str, rows: int, columns: list[str]) -> str | None:
    """Why the part file at `path` is not a complete shard of `rows` rows with `columns`, or None.

    Parquet: its footer only (row count, column names). JSON Lines: every line parses to an object with
    exactly `columns`. Never raises for a damaged file: that is what this finds."""
    try:
        if fmt == "parquet":
            def footer() -> pq.FileMetaData:  # retried when transient: a flaky read is no damaged file
                with fs.open_input_file(path) as f:
                    return pq.read_metadata(f)

            meta = retry_transient(footer)
            found_rows, found_columns = meta.num_rows, list(meta.schema.to_arrow_schema().names)
        else:
            lines = [line for line in read_bytes(fs, path).decode("utf-8").splitlines() if line]
            parsed = [json.loads(line) for line in lines]
            if any(not isinstance(r, dict) or list(r) != columns for r in parsed):
                return "a line is not a row with the job's columns"
            found_rows, found_columns = len(parsed), columns
    except Exception as exc:  # noqa: BLE001 - any failure to read it back means it is not done
        return f"unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if found_columns != columns:
        return f"has columns {found_columns[:6]}..., not the job's"
    if found_rows != rows:
        return f"has {found_rows} rows, expected {rows}"
    return None


def finished_shards(fs: pafs.FileSystem, root: str, manifest: Manifest, rows_per_input: int,
                    columns: list[str]) -> tuple[set[int], dict[str, str]]:
    """(shards whose part file is complete, {file name: why not} for part files that are not).

    A part file that is not complete is left where it is: the shard is redone and its file replaced."""
    candidates = {}
    for info in top_level_files(fs, root):
        match = _PART.match(info.base_name)
        if match and match.group(2) == manifest.format and int(match.group(1)) < manifest.num_shards:
            candidates[int(match.group(1))] = info

    def check(shard: int) -> tuple[int, str | None]:
        expected = manifest.inputs_in_shard(shard) * rows_per_input
        return shard, check_part(fs, candidates[shard].path, manifest.format, expected, columns)

    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        results = list(pool.map(check, sorted(candidates)))
    done = {shard for shard, problem in results if problem is None}
    damaged = {candidates[shard].base_name: problem for shard, problem in results if problem is not None}
    for name, problem in damaged.items():
        logger.warning("%s is not a complete shard (%s): redoing it", name, problem)
    return done, damaged


def iter_part_columns(fs: pafs.FileSystem, root: str, manifest: Manifest, columns: list[str]
                      ) -> Iterable[tuple[str, pa.Table | None]]:
    """(file name, its `columns`, or None when it cannot be read) for each of this job's part files, in
    shard order (constant memory in the number of shards)."""
    infos = sorted((i for i in top_level_files(fs, root) if (m := _PART.match(i.base_name))
                    and m.group(2) == manifest.format and int(m.group(1)) < manifest.num_shards),
                   key=lambda i: i.base_name)
    for info in infos:
        try:
            yield info.base_name, _read_part(fs, info.path, manifest.format, columns)
        except Exception as exc:  # noqa: BLE001 - a summary never dies on a damaged file; it names it
            logger.warning("cannot read %s back (%s: %s)", info.base_name, type(exc).__name__, exc)
            yield info.base_name, None
