"""What produced an output folder, so a rerun resumes only the very same work.

A rerun skips the shards whose files exist, so before it trusts them it must show it would write the
same rows. `run_identity` records, in `_manifest.json`:

* the input: where it really is (symlinks resolved; `s3://bucket/prefix`), a hash of the listing (ids,
  sources, questions, carried columns) and a hash of the files the listing came from: sizes and
  modification times of the images (a directory) or of the shards (WebDataset), the bytes of the
  manifest files (a manifest rewritten with other rows of the same count differs; the same rows saved
  again do not);
* the model: a hash of its files' content (`raylens.checkpoints.fingerprint`: small files whole, large weight
  files by size and sampled windows, which a fine-tune or a merged LoRA changes), whatever path or URI named it;
* the settings that change an answer: prompts (or the question column), sampling, the tiling actually
  used (`--max-tiles` or the checkpoint's), `--max-pixels`, `--allowed-domains`, the image column, and the
  decoding options (`--fast-jpeg-decode`, `--alpha-background`).

Settings that change only speed or placement (batch size, replicas, GPUs per replica, batches in flight,
engine options, retries, error budget, the engine) are left out: a rerun may change them. The engine is
left out on purpose too: resuming on another machine picks lmdeploy or transformers for the same model.

Cheap for millions of inputs: hashes of the listing and of file metadata (local: one stat per image;
S3: one more listing of the prefix); no image byte is read on the driver.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Sequence

from urllib.parse import unquote_to_bytes

import pyarrow.fs as pafs

from jobs.caption_config import CaptionJobConfig
from jobs.caption_output import Location
from raylens.checkpoints.fingerprint import model_fingerprint
from raylens.images import TilingSpec
from raylens.sources import InputItem, InputListing

# A manifest row's id: "<manifest path relative to --input>:<row>" (raylens.sources).
_MANIFEST_ID = re.compile(r"^(?P<file>.+):\d+$")

# identity key -> how the user names it (a rerun's refusal names flags, not our keys)
FIELD_NAMES = {
    "input": "--input",
    "inputs_sha256": "--input listing (ids, sources, questions, carried columns)",
    "input_files_sha256": "input files (sizes and dates of images or shards, bytes of manifests)",
    "image_column": "--image-column",
    "image_root": "--image-root (where manifest rows may read)",
    "question_column": "--question-column",
    "prompts": "--prompt",
    "model_sha256": "--model",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
    "ignore_eos": "--ignore-eos",
    "max_tiles": "--max-tiles",
    "min_tiles": "the checkpoint's min tiles",
    "tile_size": "the checkpoint's tile size",
    "use_thumbnail": "the checkpoint's thumbnail setting",
    "max_pixels": "--max-pixels",
    "allowed_domains": "--allowed-domains",
    "fast_jpeg_decode": "--fast-jpeg-decode",
    "alpha_background": "--alpha-background",
}


def run_identity(config: CaptionJobConfig, *, input_location: Location, in_fs: pafs.FileSystem, in_root: str,
                 listing: InputListing, model_dir: str, tiling: TilingSpec) -> dict:
    """Everything that decides the output's rows, as JSON values (see the module docstring)."""
    domains = config.allowed_domain_set()
    items = listing.items
    roots = listing.roots
    return {
        "input": input_location.path if input_location.scheme == "local" else f"s3://{input_location.path}",
        "inputs_sha256": listing_fingerprint(items, root=in_root),
        "input_files_sha256": input_files_fingerprint(in_fs, in_root, listing.kind, items),
        "image_column": config.image_column,
        "image_root": None if roots is None else sorted([*roots.local, *(f"s3://{r}" for r in roots.s3)]),
        "question_column": config.question_column,
        "prompts": None if config.question_column else list(config.prompt),
        "model_sha256": model_fingerprint(model_dir),
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "ignore_eos": config.ignore_eos,
        "tile_size": tiling.tile_size,
        "min_tiles": tiling.min_tiles,
        "max_tiles": tiling.max_tiles,
        "use_thumbnail": tiling.use_thumbnail,
        "max_pixels": config.max_pixels,
        "allowed_domains": sorted(domains) if domains else None,
        # Decoding options that change the pixels; recorded only when set, so outputs written before they
        # existed (the default decoding) still resume.
        **({"fast_jpeg_decode": True} if config.fast_jpeg_decode else {}),
        **({"alpha_background": list(config.alpha_background_rgb())} if config.alpha_background else {}),
    }


def differences(old: dict, new: dict, *, old_model: str | None = None, new_model: str | None = None) -> list[str]:
    """`"--flag: old -> new"` for every key whose value differs (a key one side lacks reads as
    "(not recorded)"), in FIELD_NAMES order; hashes shortened."""
    keys = [k for k in FIELD_NAMES if k in old or k in new] + sorted((set(old) | set(new)) - set(FIELD_NAMES))
    lines = []
    for key in keys:
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        name = FIELD_NAMES.get(key, key)
        if key == "model_sha256":
            lines.append(f"{name}: {old_model!r} ({_show(a)}) -> {new_model!r} ({_show(b)})")
        else:
            lines.append(f"{name}: {_show(a)} -> {_show(b)}")
    return lines


class _Missing:
    def __repr__(self) -> str:
        return "(not recorded)"


_MISSING = _Missing()


def _show(value) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"sha256 {value[:12]}"
    return repr(value)


# ------------------------------------------------------------------------------------- inputs
def listing_fingerprint(items: Sequence[InputItem], root: str = "") -> str:
    """What the listing holds, in order: ids, sources, questions and carried values. Sources below the
    input are taken relative to it, so the same folder named through a symlink lists the same."""
    h = hashlib.sha256()
    for item in items:
        h.update(repr((item.id, _below_root(item.source, root), item.question, item.extra, item.error)).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _below_root(source: str, root: str) -> str:
    """`source` with the input root (a local path or a bucket/prefix inside an s3:// URI) cut off."""
    if not root:
        return source
    prefix = root.rstrip("/") + "/"
    for head in ("", "s3://", "tar://", "tar://s3://"):
        if source.startswith(head + prefix):
            return head + "<input>/" + source[len(head + prefix):]
    return source


def input_files_fingerprint(fs: pafs.FileSystem, root: str, kind: str, items: Sequence[InputItem]) -> str:
    """What the listing's files are now: sizes and modification times of images (a directory) or
    shards (WebDataset); the content of manifests (see the module docstring). `kind` is the listing's
    ("directory", "manifest" or "webdataset")."""
    h = hashlib.sha256()
    paths = _input_files(fs, root, kind, items)
    h.update(kind.encode())
    if kind == "manifest":
        for path in paths:
            h.update(_below_root(path, root).encode("utf-8", "surrogateescape") + b"\0" + _content_sha256(fs, path).encode())
        return h.hexdigest()
    for path, info in zip(paths, _file_infos(fs, root, paths)):
        h.update(repr((_below_root(path, root), info.size if info else None, info.mtime_ns if info else None)).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _input_files(fs: pafs.FileSystem, root: str, kind: str, items: Sequence[InputItem]) -> list[str]:
    """The files the items came from, in listing order: images, shards or manifests."""
    from raylens.sources import parse_tar_source

    def fs_path(uri: str) -> str:
        if uri.startswith("s3://"):
            return uri[len("s3://"):]
        if uri.lower().startswith("file://"):  # a name that is not UTF-8 (raylens.sources.file_uri)
            return os.fsdecode(unquote_to_bytes(uri[len("file://"):]))
        return uri

    if kind == "webdataset":
        return list(dict.fromkeys(fs_path(parse_tar_source(i.source)[0]) for i in items))
    if kind == "manifest":
        if fs.get_file_info(root).type == pafs.FileType.File:
            return [root]
        files = (m.group("file") for i in items if (m := _MANIFEST_ID.match(i.id)))
        return [f"{root.rstrip('/')}/{rel}" for rel in dict.fromkeys(files)]
    return [fs_path(i.source) for i in items]


class _Stat:
    def __init__(self, size: int, mtime_ns: int) -> None:
        self.size, self.mtime_ns = size, mtime_ns


def _file_infos(fs: pafs.FileSystem, root: str, paths: list[str]) -> list[_Stat | None]:
    """Size and modification time of each path: a stat each on local disks (any bytes in a name), one
    listing of the prefix on object stores (a HEAD request per object would be far slower)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return [_stat(p) for p in paths]
    single = fs.get_file_info(root)
    listed = [single] if single.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    by_path = {i.path: _Stat(i.size, i.mtime_ns or 0) for i in listed if i.type == pafs.FileType.File}
    return [by_path.get(p) for p in paths]


def _stat(path: str) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stat(st.st_size, st.st_mtime_ns)


def _content_sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


