"""LoRA (or full) fine-tuning of an InternVL2 model on Ray Train, from LLaVA/XTuner or InternVL data.

Locally (starts a private Ray instance; CPU workers with gloo where there are no GPUs):

    python -m jobs.finetune --data data/train.jsonl --output runs/food --model OpenGVLab/InternVL2-2B

On a cluster (one worker per GPU, checkpoints to shared storage):

    ray job submit --working-dir . -- python -m jobs.finetune --data s3://bucket/train.jsonl \\
        --image-root s3://bucket/images/ --output s3://bucket/runs/food --model OpenGVLab/InternVL2-2B --workers 8

Then merge the LoRA into a standalone model that jobs.caption, the endpoint and lmdeploy load:

    python -m jobs.merge runs/food --output models/food-2b

Rerunning the same command with the same --output resumes from its last checkpoint (a finished run says so
and exits); a worker that dies is replaced and training continues from the last checkpoint (--max-failures).
`setup()` resolves and validates everything that can fail before Ray starts (data, model, output); `main()`
runs the TorchTrainer (raylens/training/loop.py) and writes _summary.json.
Exit codes: 0 done; 1 training failed; 2 bad data, model, output or arguments.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import sys
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from jobs.finetune_config import FinetuneConfig
from raylens.storage import S3Settings, ensure_writable_dir, resolve_filesystem

logger = logging.getLogger("raylens.finetune")


class UsageError(Exception):
    """Bad data, model, output or arguments: one line for the user, exit code 2."""


@dataclass
class FinetunePlan:
    """Everything `setup()` resolved."""

    config: FinetuneConfig
    s3: S3Settings
    out_fs: pafs.FileSystem
    out_root: str
    model_dir: str
    settings: object  # raylens.training.loop.LoopSettings
    description: dict
    skipped_at_setup: dict[str, list[str]]
    num_records: int | None


def setup(config: FinetuneConfig, env: dict[str, str] | None = None, *, source=None,
          step_hook=None) -> FinetunePlan:
    """Read the data, resolve the model, check or create the run directory. Raises UsageError.

    `source` replaces the data files (an endless synthetic stream: `jobs.train_demo`); `step_hook` is
    called on rank 0 after every step (see LoopSettings)."""
    from raylens.checkpoints.formats import CheckpointError, read_model_spec
    from raylens.checkpoints.resolve import resolve_model
    from raylens.checkpoints.fingerprint import model_fingerprint
    from raylens.training.checkpoint import raylens_version
    from raylens.training.loader import RecordSource
    from raylens.training.loop import LoopSettings, total_steps_for
    from raylens.sources import ReadRoots
    from raylens.training.records import read_training_data

    env = dict(os.environ if env is None else env)
    s3 = S3Settings.from_env(env, endpoint=config.s3_endpoint)
    try:
        model_fs = s3.filesystem() if (config.model or "").startswith("s3://") else None
        model_dir = str(resolve_model(config.model, filesystem=model_fs))
        spec = read_model_spec(model_dir)
        tiling = spec.tiling(config.max_tiles)
        fingerprint = model_fingerprint(model_dir)
    except (FileNotFoundError, CheckpointError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--model: {exc}") from None

    skipped: dict[str, list[str]] = {}
    read_roots = None  # a SampleSource given in code (synthetic data) reads no files
    data_info: dict = {"data": config.data, "image_root": config.image_root}
    if source is None:
        try:
            data = read_training_data(config.data, image_root=config.image_root, s3=s3, seed=config.seed)
        except FileNotFoundError as exc:
            raise UsageError(f"--data: {exc}") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read --data {config.data}: {exc}") from None
        if not data.records:
            reasons = ", ".join(f"{len(ids)} {kind}" for kind, ids in data.skipped.items()) or "it is empty"
            raise UsageError(f"--data {config.data} has no record to train on ({reasons})")
        source = RecordSource(data.records)
        read_roots = ReadRoots.of(data.roots)
        skipped = data.skipped
        data_info.update(files=data.files, fingerprint=data.fingerprint, records=len(data.records),
                         skipped={kind: len(ids) for kind, ids in skipped.items()})
    else:
        data_info.update(source=type(source).__name__, records=source.num_records)

    try:
        total_steps = total_steps_for(source.num_records, max_steps=config.max_steps, epochs=config.epochs,
                                      batch_size=config.batch_size, grad_accum=config.grad_accum,
                                      workers=config.workers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total_steps)
    max_length = min(config.max_length, spec.max_position_embeddings or config.max_length)
    trainable = config.trainable()
    try:
        out_fs, out_root = resolve_filesystem(config.output, s3)
    except ValueError as exc:
        raise UsageError(f"--output: {exc}") from None
    description = {
        "raylens_version": raylens_version(),
        "base_model": {
            "model": config.model, "path": model_dir, "fingerprint": fingerprint, "format": spec.format,
            "llm_architecture": spec.llm_architecture, "template": spec.template, "torch_dtype": spec.torch_dtype,
        },
        "tiling": {"tile_size": tiling.tile_size, "min_tiles": tiling.min_tiles, "max_tiles": tiling.max_tiles,
                   "use_thumbnail": tiling.use_thumbnail, "image_tokens_per_tile": spec.image_tokens_per_tile},
        "trainable": trainable.to_dict(),
        "training": {"total_steps": total_steps, "warmup_steps": warmup, "max_length": max_length,
                     "global_batch": config.batch_size * config.grad_accum * config.workers},
        "data": data_info,
        "config": config.to_dict(),
    }
    settings = LoopSettings(
        model=config.model, source=source, trainable=trainable,
        total_steps=total_steps, batch_size=config.batch_size, grad_accum=config.grad_accum, lr=config.lr,
        warmup_steps=warmup, min_lr_ratio=config.min_lr_ratio, weight_decay=config.weight_decay,
        adam_betas=(0.9, config.adam_beta2), clip=config.clip, dtype=config.dtype, strategy=config.strategy,
        gradient_checkpointing=config.gradient_checkpointing, max_length=max_length, max_tiles=config.max_tiles,
        seed=config.seed, shuffle=config.shuffle, loader_workers=config.loader_workers, threads=config.threads,
        save_every=config.save_every, keep=config.keep, log_every=config.log_every,
        report_every=config.report_every, s3=s3, read_roots=read_roots, run_description=description, step_hook=step_hook,
        output_fs=out_fs, output_root=out_root,
    )
    try:
        _prepare_output(config, out_fs, out_root, description)
    except OSError as exc:
        raise UsageError(f"cannot write --output {config.output}: {exc}") from None
    return FinetunePlan(config=config, s3=s3, out_fs=out_fs, out_root=out_root, model_dir=model_dir,
                        settings=settings, description=description, skipped_at_setup=skipped,
                        num_records=source.num_records)


def _prepare_output(config: FinetuneConfig, fs: pafs.FileSystem, root: str, description: dict) -> None:
    """A fresh run directory, or the same run to resume (same model, data and training settings)."""
    from raylens.training.checkpoint import RUN_FILE, read_json, write_json

    existing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    if existing and config.overwrite:
        fs.delete_dir_contents(root)
        existing = []
    ensure_writable_dir(fs, root)
    run_file = posixpath.join(root, RUN_FILE)
    if existing:
        previous = read_json(fs, run_file)
        if previous is None:
            raise UsageError(f"--output {config.output} holds files that are not a raylens run; "
                             "use another directory or --overwrite")
        mismatch = _run_mismatch(previous, description, config)
        if mismatch:
            raise UsageError(f"--output {config.output} holds another run ({mismatch} differs); "
                             "use another --output, or --overwrite to start over")
    write_json(fs, run_file, description)


def _run_mismatch(previous: dict, description: dict, config: FinetuneConfig) -> str | None:
    """What makes `previous` another run than this one, or None."""
    if previous.get("base_model", {}).get("fingerprint") != description["base_model"]["fingerprint"]:
        return "the base model"
    if previous.get("data", {}).get("fingerprint") != description["data"].get("fingerprint"):
        return "the data"
    before = FinetuneConfig(**previous["config"]).run_defining()
    for key, value in config.run_defining().items():
        if before.get(key) != value:
            return f"--{key.replace('_', '-')}"
    return None


def _start_ray(flag: str | None = None) -> None:
    """Join the cluster `--ray-address` or RAY_ADDRESS (what `ray job submit` sets) names, else start a private
    instance (never a bare `ray.init()`, which joins whatever Ray runs on the machine). Raises UsageError
    (one line) when that Ray cannot be reached.

    The private instance's dashboard listens on a port chosen here, and its processes get
    RAY_API_SERVER_ADDRESS pointing at it. Why: Ray Train's placement-group cleaner asks the state API
    whether the run's controller is alive without naming a cluster, and Ray then picks the machine's most
    recent `ray start` cluster or the one GCS it finds by scanning processes; when that is another user's
    cluster, the controller is "not found" there and the cleaner removes our workers' placement group,
    killing them (seen on a shared machine: a demo run restarted from step 0).
    """
    import ray

    from jobs.caption_runtime import LOCAL, RayUnavailable, check_reachable, ray_address, unavailable_message

    if ray.is_initialized():
        return
    address = ray_address(flag, os.environ)
    try:
        check_reachable(address)
        if address != LOCAL:
            ray.init(address=address, logging_level=logging.WARNING)
            return
        port = _free_port()
        with _environment(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}"):  # inherited by Ray's processes
            ray.init(address=LOCAL, dashboard_host="127.0.0.1", dashboard_port=port, logging_level=logging.WARNING)
    except RayUnavailable as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - every way of not getting a Ray ends in one line
        raise UsageError(unavailable_message(address, exc)) from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the duration (processes started meanwhile keep them)."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_trainer(plan: FinetunePlan):
    """The TorchTrainer of a plan (GPU workers when the cluster has GPUs and --gpus-per-worker > 0)."""
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylens.training.loop import train_worker

    cfg = plan.config
    use_gpu = cfg.gpus_per_worker > 0 and ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    name = posixpath.basename(plan.out_root.rstrip("/"))
    parent = posixpath.dirname(plan.out_root.rstrip("/"))
    run_config = RunConfig(
        name=name,
        storage_path=parent,
        storage_filesystem=plan.out_fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        # Our progress lines are plain prints (Ray Train's print patch would print each twice) and its own
        # per-report INFO lines would drown them.
        worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"settings": plan.settings},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config,
    )
    return trainer, use_gpu


def summarize(plan: FinetunePlan, wall_s: float, error: str | None) -> dict:
    """The run's summary, read from its latest checkpoint (what a resume would start from)."""
    from raylens.storage import read_bytes
    from raylens.training.checkpoint import STATE_FILE, TrainingState, list_checkpoints

    checkpoints = list_checkpoints(plan.out_fs, plan.out_root)
    state = None
    if checkpoints:
        state = TrainingState.from_json(read_bytes(plan.out_fs, posixpath.join(checkpoints[-1][1], STATE_FILE)).decode())
    total = plan.settings.total_steps
    skipped = {kind: len(ids) for kind, ids in plan.skipped_at_setup.items()}
    for kind, ids in (state.skipped if state else {}).items():
        skipped[kind] = skipped.get(kind, 0) + len(ids)
    return {
        "completed": bool(state and state.step >= total) and error is None,
        "step": state.step if state else 0,
        "total_steps": total,
        "samples_seen": state.positions if state else 0,
        "final_metrics": state.metrics if state else None,
        "skipped_records": skipped,
        "skipped_examples": {kind: ids[:5] for kind, ids in {**plan.skipped_at_setup, **(state.skipped if state else {})}.items()},
        "checkpoints": [posixpath.basename(path) for _, path in checkpoints],
        "latest_checkpoint": posixpath.basename(checkpoints[-1][1]) if checkpoints else None,
        "trainable": plan.settings.trainable.describe(),
        "records": plan.num_records,
        "wall_s": round(wall_s, 3),
        "error": error,
    }


def main(plan: FinetunePlan) -> dict:
    """Train (resuming when the run directory has checkpoints); returns the summary (also _summary.json)."""
    from raylens.training.checkpoint import SUMMARY_FILE, write_json

    from raylens.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(plan.out_fs, plan.out_root)
    if checkpoints and checkpoints[-1][0] >= plan.settings.total_steps:
        print(f"the run in {plan.config.output} is complete ({posixpath.basename(checkpoints[-1][1])}); "
              "nothing to do (raise --max-steps / --epochs to train further)", flush=True)
        summary = summarize(plan, 0.0, None)
        write_json(plan.out_fs, posixpath.join(plan.out_root, SUMMARY_FILE), summary)
        return summary
    _start_ray(plan.config.ray_address)
    trainer, use_gpu = build_trainer(plan)
    cfg = plan.config
    kind = "GPU" if use_gpu else "CPU"
    print(f"training {plan.settings.trainable.describe()} of {plan.model_dir} on {cfg.workers} {kind} worker(s) "
          f"({cfg.strategy}), {plan.settings.total_steps} steps of {cfg.batch_size * cfg.grad_accum * cfg.workers} "
          f"samples, {plan.num_records if plan.num_records is not None else 'endless'} records -> {cfg.output}",
          flush=True)
    start = time.perf_counter()
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train's TrainingFailedError wraps the worker's error
        error = f"{type(exc).__name__}: {exc}"
    summary = summarize(plan, time.perf_counter() - start, error)
    write_json(plan.out_fs, posixpath.join(plan.out_root, SUMMARY_FILE), summary)
    return summary


def run(argv: list[str] | None = None) -> int:
    config = FinetuneConfig.from_args(argv, description=__doc__)
    try:
        plan = setup(config)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.model is None:
        print("Fine-tuning the raylens demo model (a tiny InternVL2 trained on synthetic shapes); "
              "pass --model OpenGVLab/InternVL2-2B for a real one.", flush=True)
    if plan.skipped_at_setup:
        counts = ", ".join(f"{len(ids)} {kind}" for kind, ids in plan.skipped_at_setup.items())
        print(f"skipping records the data file cannot train on: {counts}", flush=True)
    try:
        summary = main(plan)
    except UsageError as exc:  # the Ray to run on cannot be reached
        print(f"error: {exc}", file=sys.stderr)
        return 2
    brief = {k: summary[k] for k in ("completed", "step", "total_steps", "latest_checkpoint", "skipped_records",
                                     "wall_s")}
    if summary["final_metrics"]:
        brief["loss"] = round(summary["final_metrics"]["loss"], 4)
    import json

    print("summary: " + json.dumps(brief), flush=True)
    if summary["error"]:
        print(f"error: training failed: {summary['error'].splitlines()[0]}\n(the last checkpoint is kept; "
              "rerunning the same command resumes from it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
