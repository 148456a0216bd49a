"""Output layout of the caption job: one file per input shard, written only once the shard is complete.

Why this shape: it makes the job exactly-once and resumable without remembering row ids. Inputs are
listed in a fixed order and cut into shards of `shard_size` images; shard `k` becomes
`part-00000k.parquet` (or `.jsonl`), written in one piece (a temporary name then a rename on local disks;
a single PUT on S3, which is atomic). A file therefore exists only for a complete shard, and a rerun
skips the shards whose files exist: no duplicates, nothing missing, and the driver tracks shard numbers,
not rows. `_manifest.json` pins the sharding so a rerun cuts the same shards.

This module knows nothing of models or Ray: it receives Arrow tables with a `shard` column.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson  # noqa: F401  (kept for readers of .jsonl outputs)
import pyarrow.parquet as pq

MANIFEST_FILE = "_manifest.json"
FORMATS = ("parquet", "jsonl")
_PART = re.compile(r"^part-(\d{6,})\.(parquet|jsonl)$")


@dataclass(frozen=True)
class Manifest:
    """What a rerun must agree with to resume: the inputs and how they were cut into shards."""

    num_inputs: int
    shard_size: int
    inputs_sha256: str
    prompts: tuple[str, ...]
    format: str

    @property
    def num_shards(self) -> int:
        return (self.num_inputs + self.shard_size - 1) // self.shard_size

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "prompts": list(self.prompts)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        return cls(d["num_inputs"], d["shard_size"], d["inputs_sha256"], tuple(d["prompts"]), d["format"])


def fingerprint(ids: Iterable[str]) -> str:
    """A digest of the ordered input ids (streamed: constant memory)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()


def shard_file(shard: int, fmt: str) -> str:
    return f"part-{shard:06d}.{fmt}"


def completed_shards(fs: pafs.FileSystem, root: str) -> set[int]:
    """Shards whose output file exists (complete by construction)."""
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return {int(m.group(1)) for i in infos if i.type == pafs.FileType.File and (m := _PART.match(i.base_name))}


def read_manifest(fs: pafs.FileSystem, root: str) -> Manifest | None:
    path = posixpath.join(root, MANIFEST_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return Manifest.from_json(f.read().decode())


def write_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    _write_atomically(fs, posixpath.join(root, MANIFEST_FILE), manifest.to_json().encode())


def _write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = posixpath.join(posixpath.dirname(path), "." + posixpath.basename(path) + ".tmp")
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:  # object stores: one PUT is atomic
        with fs.open_output_stream(path) as f:
            f.write(data)


def encode_table(table: pa.Table, fmt: str) -> bytes:
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table.to_pylist()).encode()


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
            part = table.filter(pa.compute.equal(table.column("__shard"), shard))
            self._pending.setdefault(shard, []).append(part)
            self._counts[shard] = self._counts.get(shard, 0) + part.num_rows
            if self._counts[shard] >= self.expected[shard]:
                self._flush(shard)

    def _flush(self, shard: int) -> None:
        table = pa.concat_tables(self._pending.pop(shard)).drop_columns(["__shard"]).sort_by([("id", "ascending")])
        _write_atomically(self.fs, posixpath.join(self.root, shard_file(shard, self.fmt)), encode_table(table.cast(self.schema), self.fmt))
        self.written.append(shard)

    def incomplete(self) -> dict[int, int]:
        """Shards not written: shard -> rows received so far."""
        return {s: self._counts.get(s, 0) for s in self.expected if s not in self.written}

    def rows_of(self, shard: int) -> pa.Table | None:
        parts = self._pending.get(shard)
        return pa.concat_tables(parts) if parts else None


def iter_output_tables(fs: pafs.FileSystem, root: str, columns: list[str]) -> Iterator[pa.Table]:
    """Each shard file's columns in turn (constant memory in the number of shards)."""
    infos = sorted((i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)) if _PART.match(i.base_name)), key=lambda i: i.base_name)
    for info in infos:
        with fs.open_input_file(info.path) as f:
            if info.base_name.endswith(".parquet"):
                yield pq.read_table(f, columns=columns)
            else:
                rows = [json.loads(line) for line in f.read().decode().splitlines() if line]
                yield pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
