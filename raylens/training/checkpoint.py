"""What a fine-tuning run writes: a self-describing run directory, and checkpoints inside it.

Layout of `--output` (local or s3://; Ray Train writes the checkpoint directories there):

    run.json                    the run's description (below), written before training starts
    checkpoint_000200/          one per --save-every steps, the last --keep kept (Ray Train's CheckpointConfig)
        trainable.safetensors   the trainable tensors (LoRA A/B, projector, or every weight), float32
        optimizer.pt            AdamW state, to resume
        state.json              step, positions consumed, the step each attempt started from, last metrics,
                                skipped records
        metrics.jsonl           the metrics of every step so far
        run.json                the same description: a checkpoint copied elsewhere still says what it is
    _summary.json               written when the run ends: steps, final metrics, skipped records
    (Ray Train's own bookkeeping files)

`run.json` names the base model (as given, its resolved path and a sha256 fingerprint of its config and
weights), the chat template and system message, the tiling, the LoRA settings, the whole training config,
the data files and their fingerprint, and the raylens version: `jobs.merge` needs nothing else, and
refuses a base model whose fingerprint differs.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raylens.storage import read_bytes, write_atomically

RUN_FILE = "run.json"
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
HISTORY_FILE = "metrics.jsonl"
SUMMARY_FILE = "_summary.json"
CHECKPOINT_PREFIX = "checkpoint_"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")
_CHUNK = 8 * 1024 * 1024


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(name: str) -> int | None:
    match = _CHECKPOINT_NAME.match(posixpath.basename(name.rstrip("/")))
    return int(match.group(1)) if match else None


def raylens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raylens")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@dataclass
class TrainingState:
    """Where a run stands at a checkpoint (state.json)."""

    step: int  # optimizer steps done
    positions: int  # data positions consumed (raylens.training.loader)
    metrics: dict[str, Any]
    skipped: dict[str, list[str]]  # kind -> record ids replaced during training so far (all ranks)
    starts: list[int] = field(default_factory=lambda: [0])  # the step each attempt started from (resumes)
    files: dict[str, int] = field(default_factory=dict)  # the checkpoint's other files and their sizes

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "positions": self.positions, "starts": self.starts,
                           "metrics": self.metrics, "skipped": self.skipped, "files": self.files}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainingState":
        d = json.loads(text)
        return cls(step=int(d["step"]), positions=int(d["positions"]), metrics=d.get("metrics", {}),
                   skipped={k: list(v) for k, v in d.get("skipped", {}).items()},
                   starts=[int(x) for x in d.get("starts", [0])], files=dict(d.get("files", {})))


def write_json(fs: pafs.FileSystem, path: str, value: Any) -> None:
    """Write JSON to `path` on `fs`; readers never see half of it."""
    write_atomically(fs, path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any | None:
    """The JSON at `path`, or None when there is no such file."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return json.loads(read_bytes(fs, path))


def list_checkpoints(fs: pafs.FileSystem, run_root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in a run directory, oldest first (see `is_complete`)."""
    infos = fs.get_file_info(pafs.FileSelector(run_root, allow_not_found=True))
    found = []
    for info in infos:
        step = checkpoint_step(info.path)
        if info.type == pafs.FileType.Directory and step is not None and is_complete(fs, info.path):
            found.append((step, info.path))
    return sorted(found)


def is_complete(fs: pafs.FileSystem, path: str) -> bool:
    """A checkpoint whose state.json parses and lists files that all exist at their recorded sizes.

    Why: a checkpoint's files are uploaded one by one, and a run killed meanwhile leaves a partial directory;
    resuming (and merging) must only ever read whole ones.
    """
    try:
        state = read_json(fs, posixpath.join(path, STATE_FILE))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict):
        return False
    files = state.get("files", {WEIGHTS_FILE: None})
    for name, size in files.items():
        info = fs.get_file_info(posixpath.join(path, name))
        if info.type != pafs.FileType.File or (size is not None and info.size != size):
            return False
    return True


def prune_checkpoints(fs: pafs.FileSystem, run_root: str, keep: int) -> list[str]:
    """Delete every checkpoint directory older than the newest `keep` complete ones (partial ones too);
    returns the deleted paths.

    Why here and not Ray Train's CheckpointConfig(num_to_keep): Ray only deletes checkpoints its controller
    registered, and a checkpoint written just before a worker or the driver died never is, so a run that
    was resumed kept them all (seen in the kill test)."""
    complete = list_checkpoints(fs, run_root)
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep][0]
    deleted = []
    for info in fs.get_file_info(pafs.FileSelector(run_root, allow_not_found=True)):
        step = checkpoint_step(info.path)
        if info.type == pafs.FileType.Directory and step is not None and step < oldest_kept:
            fs.delete_dir(info.path)
            deleted.append(info.path)
    return deleted


def latest_checkpoint(fs: pafs.FileSystem, run_root: str) -> str | None:
    """The path of the run's latest complete checkpoint, or None."""
    found = list_checkpoints(fs, run_root)
    return found[-1][1] if found else None


def download(fs: pafs.FileSystem, path: str, into: str) -> str:
    """Copy a checkpoint directory's files to the local directory `into` (a no-op copy for local disks)."""
    import shutil

    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as src, open(os.path.join(into, info.base_name), "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return into
