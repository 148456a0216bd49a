"""Read a manifest file (Parquet, CSV, JSON Lines / JSON array) into plain rows, through a filesystem.

Why this module exists: a manifest lists the job's inputs one row each (an image column, maybe a
question column, anything else the user wants carried to the output). :mod:`raylens.sources` turns
rows into input items; this module only knows file formats. A file that cannot be parsed at all is an
error naming the file (the job stops before any work); a row whose *values* are odd is returned as it
is, so it can become one error row later instead of a crash. A JSON Lines line that cannot be parsed
(bad JSON, bad UTF-8, a key given twice) is a :class:`BadRow` in its place: one error row, not a
refused job.

Column names must be unique: CSV headers and Parquet schemas can repeat a name (``image,label,label``)
and every reader here would keep only one of them, silently. Such a file is refused, naming the
column (the user renames it; there is no right guess which one they meant to keep).

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
from collections import Counter
from typing import Iterator, NamedTuple, Union

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST_EXTENSIONS: tuple[str, ...] = (".parquet", ".jsonl", ".json", ".csv")
_BATCH_ROWS = 65_536


class BadRow(NamedTuple):
    """A manifest row that could not be read at all (its line is not JSON, ...): why, naming the line."""

    message: str


Row = Union[dict, BadRow]


def is_manifest(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS


def read_manifest(fs: pafs.FileSystem, path: str, name: str) -> tuple[list[str], Iterator[Row]]:
    """(column names, rows in file order: dicts, or BadRow for a JSON line that cannot be read) of the
    manifest at ``path``; ``name`` is how error messages call the file. Raises ValueError for a file
    that is not a readable manifest or repeats a column name, here or while the rows are iterated
    (Parquet and CSV are read lazily)."""
    ext = posixpath.splitext(path)[1].lower()
    readers = {".parquet": _parquet, ".csv": _csv, ".jsonl": _json, ".json": _json}
    if ext not in readers:
        raise ValueError(f"manifest {name} has an unknown extension; expected one of {', '.join(MANIFEST_EXTENSIONS)}")
    try:
        columns, rows = readers[ext](fs, path, name)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {name} is not valid {ext[1:]}: {exc}") from None
    _check_unique(columns, name)
    return columns, _named_errors(rows, name, ext)


def _check_unique(columns: list[str], name: str) -> None:
    repeated = [c for c, n in Counter(columns).items() if n > 1]
    if repeated:
        where = "; ".join(f"{c!r} is columns {', '.join(str(i + 1) for i, x in enumerate(columns) if x == c)}"
                          for c in repeated)
        raise ValueError(f"manifest {name} repeats column names ({where}): rename them, every column is "
                         "carried to the output by its name")


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


def _json(fs: pafs.FileSystem, path: str, name: str) -> tuple[list[str], Iterator[Row]]:
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.lstrip().startswith(b"["):
        try:
            records = json.loads(data.decode("utf-8"), object_pairs_hook=_Object.from_pairs)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"manifest {name} is not valid JSON: {exc}") from None
        if not isinstance(records, list):
            raise ValueError(f"manifest {name} is not valid JSON: a JSON array of objects must start with '['")
        records = [_record(r, f"{name} item {n}") for n, r in enumerate(records)]
    else:
        records = [_json_line(line, f"{name} line {number}")
                   for number, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    columns: dict[str, None] = {}
    for record in records:
        if isinstance(record, dict):
            columns.update(dict.fromkeys(record))
    names = list(columns)
    # A record that is not an object (a bare string, a list) has no columns: every value reads as None.
    rows = (r if isinstance(r, BadRow) else {c: r.get(c) if isinstance(r, dict) else None for c in names}
            for r in records)
    return names, rows


def _json_line(line: bytes, where: str) -> object:
    try:
        return _record(json.loads(line.decode("utf-8"), object_pairs_hook=_Object.from_pairs), where)
    except UnicodeDecodeError as exc:
        return BadRow(f"manifest {where} is not valid UTF-8: {exc}")
    except json.JSONDecodeError as exc:
        return BadRow(f"manifest {where} is not valid JSON: {exc}")


def _record(value: object, where: str) -> object:
    if isinstance(value, _Object) and value.repeated:
        keys = ", ".join(repr(k) for k in value.repeated)
        return BadRow(f"manifest {where} gives the key {keys} more than once")
    return value


class _Object(dict):
    """A JSON object that remembers which keys it was given twice (``json`` keeps the last silently)."""

    repeated: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> "_Object":
        obj = cls(pairs)
        if len(obj) != len(pairs):
            obj.repeated = tuple(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        return obj
