"""Merge a fine-tuning run into a standalone InternVL2 model directory (the original hub format).

    python -m jobs.merge runs/food --output models/food-2b          # the run's latest checkpoint
    python -m jobs.merge runs/food/checkpoint_000400 --output models/food-2b-400

The result is what `OpenGVLab/InternVL2-*` ships, with the LoRA folded into the weights: config.json (with
raylens' own configuration_*.py), the base model's tokenizer files, model.safetensors in the base model's
dtype. `python -m jobs.caption --model models/food-2b`, the endpoint and lmdeploy load it directly; the run's
tiling (`--max-tiles` of training) becomes its `max_dynamic_patch`, as InternVL's own scripts do.

The base model is the one the run's run.json names (`--model` overrides where it lives); its fingerprint
must match the one recorded at training time, because a LoRA added to other weights is silently wrong.
RUN_DIR and --output may be local or s3://. Exit codes: 0 done; 2 bad arguments, run or base model.
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from raylens.checkpoints.fingerprint import model_fingerprint
from raylens.storage import S3Settings, resolve_filesystem
from raylens.training.checkpoint import (
    RUN_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainingState,
    list_checkpoints,
)

MERGE_INFO_FILE = "raylens_finetune.json"
# Files of a base checkpoint that make up its tokenizer (copied verbatim: remote-code tokenizers included).
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "tokenization_*.py",
                      "chat_template.jinja", "vocab.*", "merges.txt", "generation_config.json")


class MergeError(Exception):
    """A run, checkpoint or base model that cannot be merged: one line for the user, exit code 2."""


def find_checkpoint(fs: pafs.FileSystem, path: str) -> str:
    """`path` itself when it is a checkpoint, else the latest checkpoint of the run directory `path`."""
    if fs.get_file_info(posixpath.join(path, STATE_FILE)).type == pafs.FileType.File:
        return path
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise MergeError(f"{path} does not exist")
    checkpoints = list_checkpoints(fs, path)
    if not checkpoints:
        raise MergeError(f"{path} is neither a checkpoint nor a run directory with checkpoints")
    return checkpoints[-1][1]


def _copy_down(fs: pafs.FileSystem, checkpoint: str, into: Path) -> Path:
    for name in (RUN_FILE, STATE_FILE, WEIGHTS_FILE):
        source = posixpath.join(checkpoint, name)
        if fs.get_file_info(source).type != pafs.FileType.File:
            raise MergeError(f"checkpoint {checkpoint} has no {name}")
        with fs.open_input_stream(source) as src, open(into / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
    return into


def resolve_base(description: dict, model: str | None, s3: S3Settings) -> str:
    """The base model's local directory: `model` when given, else the run's; its fingerprint checked."""
    from raylens.checkpoints.resolve import resolve_model

    recorded = description["base_model"]
    name = model if model is not None else recorded.get("model")
    try:
        model_dir = str(resolve_model(name, filesystem=s3.filesystem() if str(name or "").startswith("s3://") else None))
    except (FileNotFoundError, RuntimeError) as exc:
        raise MergeError(f"base model: {exc} (pass --model where it is now)") from None
    if model_fingerprint(model_dir) != recorded["fingerprint"]:
        raise MergeError(f"the base model at {model_dir} is not the one the run was trained from (its weights' "
                         f"fingerprint differs from {recorded['fingerprint'][:12]}...); pass --model with the right one")
    return model_dir


def merge_checkpoint(checkpoint_dir: str | os.PathLike, base_dir: str, out_dir: str | os.PathLike, *,
                     dtype: str | None = None, write_info: bool = True) -> Path:
    """Merge a local checkpoint directory into `base_dir`'s weights and write the original format to `out_dir`
    (with `raylens_finetune.json` saying where it came from, unless `write_info` is False)."""
    import torch
    from safetensors.torch import load_file

    from raylens.checkpoints.loading import load_hf_model
    from raylens.checkpoints.tiny import save_original
    from raylens.training.lora import TrainableSpec, merge_trained

    checkpoint = Path(checkpoint_dir)
    description = json.loads((checkpoint / RUN_FILE).read_text())
    state = TrainingState.from_json((checkpoint / STATE_FILE).read_text())
    model, tokenizer, spec = load_hf_model(base_dir, dtype=torch.float32)
    merged = merge_trained(model, TrainableSpec.from_dict(description["trainable"]), load_file(checkpoint / WEIGHTS_FILE))
    out = Path(out_dir)
    save_dtype = dtype or spec.torch_dtype
    save_original(merged, tokenizer, out, template=spec.template, max_tiles=description["tiling"]["max_tiles"],
                  llm_architecture=spec.llm_architecture, dtype=save_dtype,  # InternLM2 stays InternLM2, re-fused
                  system_message=spec.config_system_message)
    _copy_tokenizer_files(Path(base_dir), out)
    if write_info:
        info = {"base_model": description["base_model"], "checkpoint_step": state.step,
                "trainable": description["trainable"], "tiling": description["tiling"],
                "raylens_version": description.get("raylens_version"), "dtype": save_dtype}
        (out / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return out


def _copy_tokenizer_files(base: Path, out: Path) -> None:
    """The base model's own tokenizer files, verbatim (a remote-code tokenizer keeps its code and model file)."""
    for pattern in TOKENIZER_PATTERNS:
        for path in base.glob(pattern):
            if path.is_file():
                shutil.copy2(path, out / path.name)


def merge(run_dir: str, output: str, *, model: str | None = None, dtype: str | None = None,
          overwrite: bool = False, s3: S3Settings | None = None) -> dict:
    """Merge the checkpoint `run_dir` names (see `find_checkpoint`) into `output`; returns what was done."""
    s3 = s3 or S3Settings()
    run_fs, run_path = resolve_filesystem(run_dir, s3)
    out_fs, out_path = resolve_filesystem(output, s3)
    existing = out_fs.get_file_info(pafs.FileSelector(out_path, allow_not_found=True))
    if existing and not overwrite:
        raise MergeError(f"--output {output} is not empty; pass --overwrite to replace it")
    checkpoint = find_checkpoint(run_fs, run_path)
    with tempfile.TemporaryDirectory(prefix="raylens-merge-") as tmp:
        local_checkpoint = _copy_down(run_fs, checkpoint, Path(tmp))
        description = json.loads((local_checkpoint / RUN_FILE).read_text())
        base_dir = resolve_base(description, model, s3)
        if existing:
            out_fs.delete_dir_contents(out_path)
        if isinstance(out_fs, pafs.LocalFileSystem):
            merge_checkpoint(local_checkpoint, base_dir, out_path, dtype=dtype)
        else:
            staged = Path(tmp) / "merged"
            merge_checkpoint(local_checkpoint, base_dir, staged, dtype=dtype)
            pafs.copy_files(str(staged), out_path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=out_fs)
        state = TrainingState.from_json((local_checkpoint / STATE_FILE).read_text())
    return {"checkpoint": checkpoint, "step": state.step, "base_model": base_dir, "output": output}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a jobs.finetune --output directory (its latest checkpoint) "
                        "or one checkpoint_NNNNNN directory in it; local or s3://")
    parser.add_argument("--output", required=True, help="directory to write the merged model to (local or s3://)")
    parser.add_argument("--model", default=None, help="where the base model is now, if not where run.json says")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="dtype of the merged weights (default: the base model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3-compatible endpoint URL; default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s3 = S3Settings.from_env(dict(os.environ), endpoint=args.s3_endpoint)
    try:
        done = merge(args.run_dir, args.output, model=args.model, dtype=args.dtype, overwrite=args.overwrite, s3=s3)
    except (MergeError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {done['checkpoint']} (step {done['step']}) into {done['base_model']} -> {done['output']}\n"
          f"caption with it: python -m jobs.caption --model {done['output']} --input IMAGES --output OUT", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run())
