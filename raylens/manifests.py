"""Read a manifest file (Parquet, CSV, JSON Lines / JSON array) into plain rows, through a filesystem.

Why this module exists: a manifest lists the job's inputs one row each (an image column, maybe a
question column, anything else the user wants carried to the output). :mod:`raylens.sources` turns
rows into input items; this module only knows file formats. A file that cannot be parsed at all is an
error naming the file (the job stops before any work); a row whose *values* are odd is returned as it
is, so it can become one error row later instead of a crash.

Format choices:

* Parquet is read with ``pyarrow.parquet``, batch by batch, with its own types.
* CSV is read with ``pyarrow.csv`` with every column as a string: CSV has no types, and inferring
  them loses data ("0012" -> 12) or fails on a later block. Empty cells are "".
* JSON Lines (``.jsonl``, and ``.json`` unless it starts with ``[``) and JSON arrays are read with the
  standard ``json`` module, row by row: ``pyarrow.json`` infers one type per column and rejects the
  whole file when one row's image value is a number, which must instead be one bad row. The columns
  are the union of the rows' keys, in order of first appearance; a key a row lacks reads as None.
"""
from __future__ import annotations

import json
import posixpath
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST_EXTENSIONS: tuple[str, ...] = (".parquet", ".jsonl", ".json", ".csv")
_BATCH_ROWS = 65_536


def is_manifest(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS


def read_manifest(fs: pafs.FileSystem, path: str, name: str) -> tuple[list[str], Iterator[dict]]:
    """(column names, rows as dicts in file order) of the manifest at ``path``; ``name`` is how error
    messages call the file. Raises ValueError for a file that is not a readable manifest, here or
    while the rows are iterated (Parquet and CSV are read lazily)."""
    ext = posixpath.splitext(path)[1].lower()
    readers = {".parquet": _parquet, ".csv": _csv, ".jsonl": _json, ".json": _json}
    if ext not in readers:
        raise ValueError(f"manifest {name} has an unknown extension; expected one of {', '.join(MANIFEST_EXTENSIONS)}")
    try:
        columns, rows = readers[ext](fs, path, name)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {name} is not valid {ext[1:]}: {exc}") from None
    return columns, _named_errors(rows, name, ext)


def _named_errors(rows: Iterator[dict], name: str, ext: str) -> Iterator[dict]:
    try:
        yield from rows
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {name} is not valid {ext[1:]}: {exc}") from None


def _parquet(fs: pafs.FileSystem, path: str, name: str) -> tuple[list[str], Iterator[dict]]:
    source = fs.open_input_file(path)
    try:
        parquet = pq.ParquetFile(source)
    except BaseException:
        source.close()
        raise
    columns = list(parquet.schema_arrow.names)

    def rows() -> Iterator[dict]:
        with source:
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
                yield from batch.to_pylist()

    return columns, rows()


def _csv(fs: pafs.FileSystem, path: str, name: str) -> tuple[list[str], Iterator[dict]]:
    with fs.open_input_stream(path) as head:  # the header only: names for the all-string read below
        columns = list(pacsv.open_csv(head).schema.names)
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=False)

    def rows() -> Iterator[dict]:
        with fs.open_input_stream(path) as stream:
            for batch in pacsv.open_csv(stream, convert_options=convert):
                yield from batch.to_pylist()

    return columns, rows()


def _json(fs: pafs.FileSystem, path: str, name: str) -> tuple[list[str], Iterator[dict]]:
    with fs.open_input_stream(path) as stream:
        text = stream.read().decode("utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"manifest {name} is not valid JSON: {exc}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"manifest {name} line {number} is not valid JSON: {exc}") from None
    columns: dict[str, None] = {}
    for record in records:
        if isinstance(record, dict):
            columns.update(dict.fromkeys(record))
    names = list(columns)
    # A record that is not an object (a bare string, a list) has no columns: every value reads as None.
    rows = ({c: r.get(c) if isinstance(r, dict) else None for c in names} for r in records)
    return names, rows
