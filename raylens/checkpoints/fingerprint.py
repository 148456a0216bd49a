"""What a checkpoint directory holds, as one hash: the caption job's run identity, fine-tuning's record of
its base model and the merge's check that it merges onto that same model all ask this question.

Cheap for GB-sized weights: small files are hashed whole, large ones by their size and 16 sampled 64 KiB
windows, which any fine-tune, merged LoRA or other checkpoint changes (every weight moves), at the cost of a
few MB read instead of the whole file (an 8B model is 16 GB). Names are part of the hash; where the
directory lives, and caches or completion markers inside it, are not.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_SAMPLE_WINDOWS = 16
_WINDOW = 64 * 1024
_HASH_WHOLE_BELOW = 16 * 1024 * 1024
_SKIPPED_PARTS = {".git", ".cache", "__pycache__", ".raylens-complete"}


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A sha256 hex digest of the directory's files: relative names, sizes and content (see above)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not (_SKIPPED_PARTS & set(p.relative_to(root).parts)))
    if not files:
        raise FileNotFoundError(f"{root} holds no files to fingerprint")
    for path in files:
        h.update(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        h.update(_file_digest(path))
    return h.hexdigest()


def _file_digest(path: Path) -> bytes:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _HASH_WHOLE_BELOW:
            h.update(f.read())
        else:
            for i in range(_SAMPLE_WINDOWS):
                f.seek((size - _WINDOW) * i // (_SAMPLE_WINDOWS - 1))
                h.update(f.read(_WINDOW))
    return h.digest()
