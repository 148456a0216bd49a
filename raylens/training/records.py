"""Training data files -> `TrainingRecord`s: LLaVA/XTuner JSON or JSONL, and InternVL's meta JSON + JSONL.

Why a reader of our own: these are the two layouts people already have (the tutorial's FoodieQA file is
LLaVA JSON; InternVL's own recipes use a meta file naming JSONL annotations), and both must become the
same thing: a `Conversation` (the model layer's type, rendered by the checkpoint's own template) plus the
images it refers to, as source URIs that `raylens.sources.read_source` reads (local paths or s3://).

Formats:
* LLaVA/XTuner: a JSON list, or JSON Lines, of `{"id"?, "image"?: path | [paths], "conversations":
  [{"from": "human"|"gpt"|"system", "value": str}, ...]}`. Relative image paths are relative to
  `--image-root` (default: the data file's directory).
* InternVL meta JSON: `{"<name>": {"root": dir, "annotation": file.jsonl, "repeat_time"?: float,
  "max_dynamic_patch"?: int, ...}, ...}`; each annotation file is LLaVA JSONL whose relative image paths
  are relative to that entry's `root`. A relative `annotation` is relative to the meta file; a relative
  `root` to `--image-root` when given, else to the meta file. `repeat_time` 2 repeats a data set twice,
  0.5 keeps a seeded half (InternVL's rule); `max_dynamic_patch` caps that data set's tiles.

What is checked here, before training, from the text alone (`StructureError` kinds; the record is skipped
and counted): not an object or bad field types (`bad_record`), no conversation turns
(`no_conversations`), turns that do not alternate human -> gpt (`bad_turns`), an empty answer
(`empty_answer`), more `<image>` tags than images or tags that do not account for every image
(`image_tags`). Images themselves are read and decoded by the training workers (`raylens.training.samples`).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow.fs as pafs

from raylens.conversation import Conversation, Turn
from raylens.errors import KindError
from raylens.prompts import IMAGE_PLACEHOLDER
from raylens.storage import S3Settings, is_s3, read_bytes, resolve_filesystem

STRUCTURE_KINDS = frozenset({"bad_record", "no_conversations", "bad_turns", "empty_answer", "image_tags"})
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLE = "system"


class StructureError(KindError):
    """A data record that cannot be trained on, whatever its images hold."""

    KINDS = STRUCTURE_KINDS


@dataclass(frozen=True)
class TrainingRecord:
    """One training sample: its conversation and the images it refers to (source URIs, in order)."""

    id: str
    conversation: Conversation
    images: tuple[str, ...] = ()
    max_tiles: int | None = None  # a meta file's per-data-set `max_dynamic_patch`


@dataclass
class TrainingData:
    """What a data file holds: the records to train on, and those skipped, by reason."""

    records: list[TrainingRecord]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # kind -> record ids
    files: list[str] = field(default_factory=list)  # every file read (URIs)
    fingerprint: str = ""  # sha256 over the files' bytes, in reading order
    # The folders (or s3:// prefixes) the records' image paths were resolved against: the only places
    # training may read images from, as a manifest's rows in the batch job (raylens.sources.ReadRoots).
    roots: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(len(ids) for ids in self.skipped.values())


def _join(root: str, path: str) -> str:
    """`path` when absolute (or a URI), else `root/path` (POSIX joins also for s3://)."""
    if path.startswith("/") or "://" in path:
        return path
    return posixpath.normpath(posixpath.join(root, path)) if not is_s3(root) else root.rstrip("/") + "/" + path


def _dirname(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/"))


class _Reader:
    """Reads files through explicit filesystems, hashing every byte read (the data fingerprint)."""

    def __init__(self, s3: S3Settings | None):
        self.s3 = s3
        self.digest = hashlib.sha256()
        self.files: list[str] = []

    def read(self, uri: str) -> bytes:
        fs, path = resolve_filesystem(uri, self.s3)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"data file {uri} does not exist")
        data = read_bytes(fs, path)
        self.digest.update(uri.encode() + b"\0" + data)
        self.files.append(uri)
        return data


def read_training_data(data: str, *, image_root: str | None = None, s3: S3Settings | None = None,
                       seed: int = 0) -> TrainingData:
    """Every record of a LLaVA JSON/JSONL file or an InternVL meta JSON (local path or s3:// URI).

    Raises FileNotFoundError / ValueError for a file that cannot be read as any of the formats; a bad
    record only becomes an entry of `skipped`.
    """
    if "://" not in data:
        data = resolve_filesystem(data)[1]  # absolute local path
    reader = _Reader(s3)
    raw = reader.read(data)
    out = TrainingData(records=[])
    if data.lower().endswith(".jsonl"):
        root = image_root or _dirname(data)
        out.roots.append(root)
        _add(out, _records(_jsonl_rows(raw, data), posixpath.basename(data), root, None))
    else:
        try:
            parsed = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{data} is neither JSON Lines (.jsonl) nor valid JSON: {exc}") from None
        if isinstance(parsed, list):
            root = image_root or _dirname(data)
            out.roots.append(root)
            _add(out, _records(((i, row) for i, row in enumerate(parsed)), posixpath.basename(data), root, None))
        elif _is_meta(parsed):
            for name, entry in parsed.items():
                root, records = _meta_entry(reader, data, name, entry, image_root, seed)
                out.roots.append(root)
                _add(out, records)
        else:
            raise ValueError(f"{data} is JSON but neither a LLaVA list of records nor an InternVL meta file "
                             "({name: {root, annotation, ...}})")
    out.files = reader.files
    out.roots = list(dict.fromkeys(out.roots))
    out.fingerprint = reader.digest.hexdigest()
    return out


def _is_meta(parsed: Any) -> bool:
    return isinstance(parsed, dict) and bool(parsed) and all(
        isinstance(v, dict) and "annotation" in v for v in parsed.values())


def _meta_entry(reader: _Reader, meta_uri: str, name: str, entry: dict, image_root: str | None, seed: int):
    annotation = _join(_dirname(meta_uri), str(entry["annotation"]))
    root = str(entry.get("root") or "")
    root = _join(image_root or _dirname(meta_uri), root) if root else (image_root or _dirname(annotation))
    max_tiles = entry.get("max_dynamic_patch")
    if max_tiles is not None and (not isinstance(max_tiles, int) or max_tiles < 1):
        raise ValueError(f"{meta_uri}: {name}.max_dynamic_patch must be a positive integer, got {max_tiles!r}")
    rows = list(_jsonl_rows(reader.read(annotation), annotation))
    repeat = float(entry.get("repeat_time", 1))
    if repeat <= 0:
        raise ValueError(f"{meta_uri}: {name}.repeat_time must be > 0, got {repeat}")
    whole, fraction = int(repeat), repeat - int(repeat)
    picked = rows * whole
    if fraction:
        picked += random.Random(f"{seed}/{name}").sample(rows, int(len(rows) * fraction))
    return root, _records(iter(picked), name, root, max_tiles)


def _jsonl_rows(raw: bytes, uri: str) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value or the StructureError of a line that is not JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{uri} is not UTF-8 text: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, StructureError("bad_record", f"line {number} is not JSON: {exc.msg}")


def _add(out: TrainingData, results: Iterator[TrainingRecord | tuple[str, StructureError]]) -> None:
    for result in results:
        if isinstance(result, TrainingRecord):
            out.records.append(result)
        else:
            record_id, error = result
            out.skipped.setdefault(error.kind, []).append(record_id)


def _records(rows, source: str, root: str, max_tiles: int | None):
    for position, row in rows:
        record_id = f"{source}:{position}"
        if isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and not isinstance(row.get("id"), bool):
            record_id = str(row["id"])
        try:
            if isinstance(row, StructureError):
                raise row
            yield parse_record(row, record_id=record_id, image_root=root, max_tiles=max_tiles)
        except StructureError as exc:
            yield record_id, exc


def parse_record(row: Any, *, record_id: str, image_root: str, max_tiles: int | None = None) -> TrainingRecord:
    """One LLaVA record -> TrainingRecord; StructureError (with its kind) when it cannot be trained on."""
    if not isinstance(row, dict):
        raise StructureError("bad_record", f"a record must be a JSON object, got {type(row).__name__}")
    images = row.get("image", row.get("images"))
    if images is None or images == "":
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise StructureError("bad_record", "'image' must be a path or a list of paths")
    turns_raw = row.get("conversations")
    if not turns_raw:
        raise StructureError("no_conversations", "the record has no conversations")
    if not isinstance(turns_raw, list) or not all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns_raw):
        raise StructureError("bad_record", "'conversations' must be a list of {from, value} objects with string values")
    system = None
    if turns_raw[0]["from"] == SYSTEM_ROLE:
        system, turns_raw = turns_raw[0]["value"], turns_raw[1:]
    if not turns_raw or len(turns_raw) % 2:
        raise StructureError("bad_turns", "turns must be human/gpt pairs")
    pairs = []
    for question, answer in zip(turns_raw[::2], turns_raw[1::2]):
        if question["from"] not in USER_ROLES or answer["from"] not in ASSISTANT_ROLES:
            raise StructureError("bad_turns", f"turns must alternate human -> gpt, got {question['from']} -> {answer['from']}")
        if not answer["value"].strip():
            raise StructureError("empty_answer", "an answer is empty")
        pairs.append((question["value"], answer["value"]))
    tags = [q.count(IMAGE_PLACEHOLDER) for q, _ in pairs]
    if sum(tags) > len(images):
        raise StructureError("image_tags", f"{sum(tags)} {IMAGE_PLACEHOLDER} tags but {len(images)} images")
    if sum(tags) == 0:
        tags[0] = len(images)  # InternVL's rule: untagged images go in front of the first question
    elif sum(tags) < len(images):
        raise StructureError("image_tags", f"{sum(tags)} {IMAGE_PLACEHOLDER} tags for {len(images)} images")
    conversation = Conversation(tuple(Turn(q, n, a) for (q, a), n in zip(pairs, tags)), system=system)
    return TrainingRecord(id=record_id, conversation=conversation, images=tuple(_join(image_root, p) for p in images),
                          max_tiles=max_tiles)
