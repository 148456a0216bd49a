"""`--model` -> a local checkpoint directory: the shipped demo model, a local dir, s3://, or a hub id.

Why local: both engines (transformers and lmdeploy) read a directory on the local disk. Resolution is
idempotent and safe to run from several Ray workers of one node at once: an s3:// copy is written into a
private temporary directory and renamed into place in one step, so nobody ever sees half a checkpoint.

Rules, in order:
* None -> `DEMO_MODEL_DIR` (the demo model trained by `jobs/train_demo.py`, shipped in the package);
* an existing local directory -> itself;
* `s3://bucket/prefix` -> every file under the prefix, copied with the given pyarrow filesystem into
  `cache_dir/<name>-<hash of the URI>`; an existing complete copy is reused;
* `org/name` -> `huggingface_hub.snapshot_download` (needs network; the error says so when offline).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo" / "model"
DEFAULT_CACHE_DIR = Path("~/.cache/raylens/models")
# Written last into an s3:// copy: its presence means the copy is complete.
COMPLETE_MARKER = ".raylens-complete"
# What a hub snapshot needs for either engine; skips duplicate .bin weights, images, docs.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 8 * 1024 * 1024


def resolve_model(model: str | os.PathLike | None, *, filesystem=None, cache_dir: str | os.PathLike | None = None
                  ) -> Path:
    """A local directory holding the checkpoint named by `model` (see the module docstring for the rules).

    `filesystem` is the pyarrow FileSystem used for s3:// URIs (None: `pyarrow.fs.FileSystem.from_uri`, i.e.
    the default AWS credential chain). `cache_dir` is where remote checkpoints are copied
    (default ~/.cache/raylens/models for s3://, the Hugging Face cache for hub ids).
    """
    if model is None:
        return demo_model_dir()
    text = str(model)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if text.startswith("s3://"):
        return copy_from_s3(text, filesystem=filesystem, cache_dir=cache_dir)
    if _HUB_ID.match(text) and not local.exists():
        return download_from_hub(text, cache_dir=cache_dir)
    raise FileNotFoundError(f"--model {text!r} is not an existing directory, an s3:// URI or a Hugging Face hub id "
                            "(org/name)")


def demo_model_dir() -> Path:
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing: {DEMO_MODEL_DIR} has no config.json. Train it with "
            f"`python -m jobs.train_demo --out {DEMO_MODEL_DIR}` or pass --model"
        )
    return DEMO_MODEL_DIR


def _cache_name(uri: str) -> str:
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    tail = re.sub(r"[^\w.-]", "_", uri.rstrip("/").rsplit("/", 1)[-1]) or "model"
    return f"{tail}-{digest}"


def copy_from_s3(uri: str, *, filesystem=None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Copy every file under `uri` (recursively) into the cache and return the local directory."""
    import pyarrow.fs as pafs

    if filesystem is None:
        filesystem, root = pafs.FileSystem.from_uri(uri)
    else:
        root = uri.removeprefix("s3://")
    root = root.rstrip("/")
    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    target = cache / _cache_name(uri)
    if (target / COMPLETE_MARKER).is_file():
        return target
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"no files under {uri}")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        for info in files:
            relative = info.path[len(root):].lstrip("/")
            dest = staging / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(info.path) as src, open(dest, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
        (staging / COMPLETE_MARKER).write_text(uri + "\n")
        try:
            staging.rename(target)
        except OSError:
            # Another worker finished first (or a stale incomplete copy is in the way).
            if not (target / COMPLETE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_from_hub(repo_id: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """`snapshot_download(repo_id)` of the files a checkpoint needs; a clear error when the hub is unreachable."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=repo_id, cache_dir=cache_dir, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as exc:  # offline, unknown repo, gated repo: all end here with the cause attached
        raise RuntimeError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Without network access, pass a local checkpoint directory or an s3:// URI as --model"
        ) from exc
    return Path(path)
