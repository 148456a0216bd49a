"""Caption (or question) every image under a directory or S3 prefix with an InternVL2 model, on Ray Data.

Locally (starts a Ray instance when none is running):

    python -m jobs.caption --input examples/images --output out/captions

On a cluster:

    ray job submit --working-dir . -- python -m jobs.caption \\
        --input s3://bucket/images/ --output s3://bucket/captions/ --model OpenGVLab/InternVL2-2B

Stages (see jobs/caption_stages.py): list files (driver) -> read, decode, validate, downscale (CPU tasks)
-> generate (actor pool: GPU actors where the cluster has GPUs, CPU actors otherwise) -> Parquet.
`setup()` resolves and validates everything that can fail before Ray starts; `main()` runs the pipeline.
Exit codes: 0 done; 1 nothing could be processed; 2 bad --input/--output or arguments.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import sys
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from jobs.caption_config import CaptionJobConfig
from raylens.images import IMAGE_EXTENSIONS, TilingSpec
from raylens.storage import S3Settings, ensure_writable_dir, list_files, relative_id, resolve_filesystem, to_uri

logger = logging.getLogger("raylens.caption")

SUMMARY_FILE = "_summary.json"
DEMO_NOTICE = (
    "Using the raylens demo model (a tiny InternVL2 trained on synthetic shapes). "
    "For real captions pass --model OpenGVLab/InternVL2-2B (GPU recommended: pip install 'raylens[gpu]')."
)


class UsageError(Exception):
    """Bad --input/--output or arguments: one line for the user, exit code 2."""


@dataclass
class JobPlan:
    """Everything `setup()` resolved: filesystems, files, model directory and tiling."""

    config: CaptionJobConfig
    in_fs: pafs.FileSystem
    in_root: str
    out_fs: pafs.FileSystem
    out_root: str
    files: list[str]
    model_dir: str
    model_name: str
    tiling: TilingSpec
    uses_demo_model: bool


def setup(config: CaptionJobConfig, env: dict[str, str] | None = None) -> JobPlan:
    """Resolve storage, list inputs, check the output and the model. Raises UsageError on bad input."""
    from raylens.checkpoints.formats import read_model_spec
    from raylens.checkpoints.resolve import resolve_model

    env = dict(os.environ if env is None else env)
    s3 = S3Settings.from_env(env, endpoint=config.s3_endpoint)
    in_fs, in_root = resolve_filesystem(config.input, s3)
    out_fs, out_root = resolve_filesystem(config.output, s3)
    try:
        info = in_fs.get_file_info(in_root)
    except OSError as exc:
        raise UsageError(f"cannot read --input {config.input}: {exc}") from None
    if info.type != pafs.FileType.Directory:
        raise UsageError(f"--input {config.input} is not a readable directory")
    try:
        files = list_files(in_fs, in_root, IMAGE_EXTENSIONS)
    except OSError as exc:
        raise UsageError(f"cannot list --input {config.input}: {exc}") from None
    if not files:
        raise UsageError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under --input {config.input}")
    try:
        existing = [i for i in out_fs.get_file_info(pafs.FileSelector(out_root, allow_not_found=True)) if i.base_name != ".raylens-write-check"]
        if existing and not config.overwrite:
            raise UsageError(f"--output {config.output} already holds results; pass --overwrite to replace them")
        if existing:
            out_fs.delete_dir_contents(out_root)
        ensure_writable_dir(out_fs, out_root)
    except OSError as exc:
        raise UsageError(f"cannot write --output {config.output}: {exc}") from None
    model_fs = s3.filesystem() if (config.model or "").startswith("s3://") else None
    model_dir = str(resolve_model(config.model, filesystem=model_fs))
    spec = read_model_spec(model_dir)
    tiling = TilingSpec(
        tile_size=spec.tile_size,
        min_tiles=spec.min_tiles,
        max_tiles=config.max_tiles or spec.max_tiles,
        use_thumbnail=spec.use_thumbnail,
    )
    return JobPlan(
        config=config, in_fs=in_fs, in_root=in_root, out_fs=out_fs, out_root=out_root, files=files,
        model_dir=model_dir, model_name=config.model or "raylens-demo", tiling=tiling,
        uses_demo_model=config.model is None,
    )


def build_dataset(plan: JobPlan):
    """The lazy Ray Data pipeline: listing -> prepare (CPU tasks) -> generate (actor pool)."""
    import ray
    from ray.data import ActorPoolStrategy

    from jobs.caption_stages import GenerateStage, prepare_batch
    from raylens.engines import resolve_engine_name
    from raylens.engines.base import SamplingParams

    cfg = plan.config
    rows = [{"id": relative_id(plan.in_root, p), "image": to_uri(plan.in_fs, p), "path": p} for p in plan.files]
    num_blocks = max(1, min(len(rows) // 8, 1000))
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks)
    ds = ds.map_batches(
        prepare_batch,
        batch_size=8,
        fn_kwargs=dict(filesystem=plan.in_fs, tiling=plan.tiling, max_pixels=cfg.max_pixels),
        num_cpus=1,
    )
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    engine = cfg.engine
    if engine == "auto":
        engine = "lmdeploy" if has_gpus and _lmdeploy_installed() else "transformers"
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    engine_options = {"max_batch_size": cfg.batch_size} if engine == "transformers" else {}
    ds = ds.map_batches(
        GenerateStage,
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=cfg.replicas),
        fn_constructor_kwargs=dict(
            engine=resolve_engine_name(engine) if engine != "lmdeploy" else "lmdeploy",
            model_dir=plan.model_dir, model_name=plan.model_name, engine_options=engine_options,
            params=params, prompt=cfg.prompt, max_tiles=cfg.max_tiles,
        ),
        num_gpus=cfg.gpus_per_replica if has_gpus else 0,
        num_cpus=1,
    )
    return ds, engine


def _lmdeploy_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lmdeploy") is not None


def summarize(plan: JobPlan, wall_s: float, engine: str) -> dict:
    """Count what was actually written (the output is the truth, not the driver's memory)."""
    import pyarrow.dataset as pads

    table = pads.dataset(plan.out_root, filesystem=plan.out_fs, format="parquet").to_table(columns=["error", "stage"])
    errors = table.column("error").to_pylist()
    failed = sum(e is not None for e in errors)
    by_kind: dict[str, int] = {}
    for e in errors:
        if e is not None:
            kind = e.split(":", 1)[0]
            by_kind[kind] = by_kind.get(kind, 0) + 1
    rows = len(errors)
    return {
        "rows": rows,
        "inputs": len(plan.files),
        "succeeded": rows - failed,
        "failed": failed,
        "errors_by_kind": by_kind,
        "wall_s": round(wall_s, 3),
        "images_per_s": round(rows / wall_s, 3) if wall_s > 0 else None,
        "model": plan.model_name,
        "engine": engine,
        "config": plan.config.to_dict(),
    }


def main(plan: JobPlan) -> dict:
    """Run the pipeline for a resolved plan; returns the summary (also written to _summary.json)."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    start = time.perf_counter()
    ds, engine = build_dataset(plan)
    ds.write_parquet(plan.out_root, filesystem=plan.out_fs)
    summary = summarize(plan, time.perf_counter() - start, engine)
    with plan.out_fs.open_output_stream(posixpath.join(plan.out_root, SUMMARY_FILE)) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def run(argv: list[str] | None = None) -> int:
    config = CaptionJobConfig.from_args(argv, description=__doc__)
    try:
        plan = setup(config)
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if plan.uses_demo_model:
        print(DEMO_NOTICE, flush=True)
    print(f"captioning {len(plan.files)} images from {config.input} -> {config.output}", flush=True)
    summary = main(plan)
    brief = {k: summary[k] for k in ("rows", "succeeded", "failed", "wall_s", "images_per_s", "model", "engine")}
    print("summary: " + json.dumps(brief), flush=True)
    return 0 if summary["succeeded"] > 0 else 1


if __name__ == "__main__":
    sys.exit(run())
