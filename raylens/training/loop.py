"""The training loop every worker of a Ray Train `TorchTrainer` runs, for LoRA and full fine-tuning alike.

One loop for everything raylens trains (`jobs.finetune` and the demo model's `jobs.train_demo`), with the
semantics of a plain PyTorch loop: per step, for each of `grad_accum` micro-batches the model's own
cross-entropy mean over its answer tokens divided by `grad_accum` is back-propagated; then the gradient
norm is clipped, AdamW steps with the scheduled learning rate (`raylens.training.optim`).

Distribution: DDP (Ray's `prepare_model`; gradients all-reduced, `no_sync` while accumulating) or FSDP2
(`fully_shard` per decoder/vision layer, then the root; bf16 compute with float32 master weights and
reductions when the weights' dtype is bf16; one worker with `fsdp` is a real one-rank FSDP). A single DDP
worker trains without a wrapper. On GPUs and with `dtype` bfloat16, DDP keeps the frozen weights in bf16 and
the trainable ones in float32 under autocast.

Fault tolerance: every `save_every` steps (and at the end) rank 0 writes a checkpoint
(`raylens.training.checkpoint`) and every rank calls `ray.train.report` with it. A restarted worker group
(a worker died: Ray Train's FailureConfig) or a rerun of the same command starts from the run directory's
latest *complete* checkpoint: trainable weights, optimizer state, the step and the data positions consumed.
Not from `ray.train.get_checkpoint()`: Ray Train registers a reported checkpoint only when its controller
next polls the workers (every 2 s), so a worker that dies just after a checkpoint was written would restart
the run from the one before, or from step 0 (seen in the kill test).
Every step's loss, lr, grad norm, samples/s and tokens/s go into the run's metrics.jsonl (in every
checkpoint) and rank 0's progress line; `ray.train.report` carries them every `report_every` steps, at most one
report per REPORT_MIN_INTERVAL_S (a sooner one waits for Ray Train's next poll).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from raylens.sources import ReadRoots
from raylens.storage import S3Settings
from raylens.training.checkpoint import (
    HISTORY_FILE,
    OPTIMIZER_FILE,
    RUN_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainingState,
    checkpoint_name,
    download,
    latest_checkpoint,
    prune_checkpoints,
)
from raylens.training.loader import Order, RankBatches, SampleSource, make_loader
from raylens.training.lora import TrainableSpec, load_trainable_state, make_trainable, trainable_names, trainable_state


@dataclass
class LoopSettings:
    """Everything a worker needs, resolved by the driver (`jobs.finetune.setup`); pickled to every worker."""

    model: str | None  # as given: None (demo), hub id, local dir or s3:// (each worker resolves it)
    source: SampleSource
    trainable: TrainableSpec
    total_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    dtype: str = "auto"
    strategy: str = "ddp"
    gradient_checkpointing: bool = False
    max_length: int = 4096
    max_tiles: int | None = None
    seed: int = 0
    shuffle: bool = True
    loader_workers: int = 2
    threads: int | None = None
    save_every: int = 200
    keep: int = 2  # checkpoints kept in the run directory (the newest)
    log_every: int = 1
    # ray.train.report every this many steps (and with every checkpoint), and never sooner than
    # REPORT_MIN_INTERVAL_S after the previous one. Not every step: Ray Train 2.60's controller takes one
    # report per worker every 2 s (its health-check poll; a one-slot queue), so a report per step caps
    # training at 0.5 steps/s (measured), and a report 1 s after the previous one blocked the step for about
    # 1 s (measured on CPU at 0.1 s steps). Every step's metrics are still printed and kept in the run's
    # metrics.jsonl.
    report_every: int = 10
    s3: S3Settings | None = None
    allowed_domains: frozenset[str] | None = None
    read_roots: ReadRoots | None = None  # where local and s3:// images may be read from (None: anywhere)
    run_description: dict[str, Any] = field(default_factory=dict)
    # Called on rank 0 after each step as hook(step, model, tokenizer, spec); the model is the unwrapped one.
    step_hook: Callable | None = None
    # The run directory (--output): where checkpoints are and where a restarted worker group resumes from.
    output_fs: object = None  # pyarrow FileSystem
    output_root: str = ""


def _no_split_classes(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or ())


def _shard_fsdp(model, compute_dtype):
    """FSDP2: each decoder / vision layer is one unit, the rest (embeddings, projector, head) the root's."""
    import warnings

    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The root returns a ModelOutput whose loss is a view; the warning is about in-place ops on it, which
    # the loop never does (it divides out of place). Printed every step otherwise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
              if compute_dtype != torch.float32 else MixedPrecisionPolicy())
    classes = _no_split_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in classes:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


REPORT_MIN_INTERVAL_S = 2.5  # > Ray Train's 2 s poll: the previous report has been taken, this one does not wait


class _Window:
    """The progress line's figures: loss, samples/s and tokens/s over the steps since the previous line
    (each step's own figures go to the metrics)."""

    def __init__(self):
        self.start, self.steps, self.loss, self.samples, self.tokens = time.perf_counter(), 0, 0.0, 0, 0

    def add(self, loss: float, samples: int, tokens: int) -> None:
        self.steps, self.loss, self.samples, self.tokens = (self.steps + 1, self.loss + loss, self.samples + samples,
                                                            self.tokens + tokens)

    def close(self, metrics: dict) -> dict:
        """`metrics` with the window's means in place of the last step's; starts the next window."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        line = {**metrics, "loss": self.loss / self.steps, "samples_per_s": self.samples / seconds,
                "tokens_per_s": self.tokens / seconds}
        self.__init__()
        return line


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(metrics: dict, total_steps: int) -> str:
    """`step 12/300  loss 1.2345  lr 3.2e-05  grad 0.81  10.2 samples/s  4,120 tokens/s  epoch 0.40  2m03s, eta 47m10s`
    (loss and rates: means since the previous line; lr and grad norm: this step's)."""
    epoch = f"  epoch {metrics['epoch']:.2f}" if metrics.get("epoch") is not None else ""
    return (f"step {metrics['step']}/{total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
            f"grad {metrics['grad_norm']:.3f}  {metrics['samples_per_s']:.1f} samples/s  "
            f"{metrics['tokens_per_s']:,.0f} tokens/s{epoch}  {_duration(metrics['elapsed_s'])}, "
            f"eta {_duration(metrics['eta_s'])}")


def train_worker(loop_config: dict) -> None:
    """The `train_loop_per_worker` of the TorchTrainer; `loop_config["settings"]` is a LoopSettings."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from raylens.checkpoints.loading import compute_dtype, load_hf_model
    from raylens.checkpoints.resolve import resolve_model
    from raylens.fetch import UrlFetcher
    from raylens.sources import SourceFilesystems
    from raylens.training.optim import adamw, lr_at, set_lr
    from raylens.training.samples import SampleEncoder

    s: LoopSettings = loop_config["settings"]
    _quiet_report_log()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    distributed = world > 1 and dist.is_initialized()
    if s.threads:
        torch.set_num_threads(s.threads)
    device = ray.train.torch.get_device()
    dtype = compute_dtype(s.dtype, device.type)
    fsdp = s.strategy == "fsdp" and dist.is_initialized()  # one worker too: a 1-rank FSDP is a real FSDP run
    print(f"worker {rank}/{world}: pid {os.getpid()}, device {device}, {torch.get_num_threads()} threads", flush=True)

    # -- model ------------------------------------------------------------------------------------------
    model_fs = s.s3.filesystem() if s.s3 is not None and str(s.model or "").startswith("s3://") else None
    model_dir = resolve_model(s.model, filesystem=model_fs)
    load_dtype = torch.float32 if (fsdp or s.trainable.full) else dtype
    torch.manual_seed(s.seed)  # the same LoRA initialisation on every rank (FSDP shards each rank's copy)
    model, tokenizer, spec = load_hf_model(model_dir, dtype=load_dtype, device="cpu" if fsdp else device)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = model.config.text_config.use_cache = False
    model = make_trainable(model, s.trainable)
    model.train()

    state = None
    optimizer_state = None
    restore_from = latest_checkpoint(s.output_fs, s.output_root) if s.output_fs is not None else None
    if restore_from is not None:
        from safetensors.torch import load_file

        with _local_copy(s.output_fs, restore_from) as directory:
            state = TrainingState.from_json(open(os.path.join(directory, STATE_FILE)).read())
            load_trainable_state(model, load_file(os.path.join(directory, WEIGHTS_FILE)))
            optimizer_state = torch.load(os.path.join(directory, OPTIMIZER_FILE), map_location="cpu",
                                         weights_only=True)  # tensors and numbers only: no code from a file
            previous_history = read_history(os.path.join(directory, HISTORY_FILE))
        if rank == 0:
            print(f"resumed from checkpoint at step {state.step} ({state.positions} samples seen)", flush=True)
    history: list[dict] = previous_history if state else []
    start_step = state.step if state else 0
    positions = state.positions if state else 0
    skipped: dict[str, set[str]] = {k: set(v) for k, v in (state.skipped if state else {}).items()}
    starts = [*state.starts, start_step] if state else [0]  # how this run got here: each (re)start's step
    if start_step >= s.total_steps:
        if rank == 0:
            print(f"nothing to do: the run is at step {start_step} of {s.total_steps}", flush=True)
        return

    inner = model
    if fsdp:
        model = _shard_fsdp(model, dtype)
    elif distributed:
        outside_llm = any(not name.startswith(("model.language_model.", "base_model.model.model.language_model."))
                          for name in trainable_names(inner))
        model = ray.train.torch.prepare_model(
            model, parallel_strategy="ddp",
            parallel_strategy_kwargs={"find_unused_parameters": outside_llm})
    else:
        model = model.to(device)
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    optimizer = adamw(named, lr=s.lr, weight_decay=s.weight_decay, betas=s.adam_betas)
    if optimizer_state is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(inner, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optimizer_state)
    params = [p for _, p in named]
    autocast = (torch.autocast(device_type=device.type, dtype=dtype)
                if dtype != torch.float32 and not fsdp else contextlib.nullcontext())
    torch.manual_seed(s.seed * 1_000_003 + rank * 7919 + start_step)  # LoRA dropout: per rank, per restart

    # -- data -------------------------------------------------------------------------------------------
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = model_pad_id(inner)
    encoder = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=s.max_length, max_tiles=s.max_tiles,
                            filesystems=SourceFilesystems.create(s.s3, roots=s.read_roots),
                            fetcher=UrlFetcher(allowed_domains=s.allowed_domains))
    order = Order(s.source.num_records, s.seed, s.shuffle)
    # Pixels leave the loader processes in the dtype the model takes them in (FSDP: float32, its
    # MixedPrecisionPolicy casts), so the step's copy to the device converts nothing on the host.
    pixel_dtype = torch.float32 if fsdp else dtype
    batches = RankBatches(s.source, encoder, order=order, start=positions, rank=rank, world=world,
                          batch_size=s.batch_size, pad_id=pad_id, pixel_dtype=pixel_dtype)
    stream = iter(make_loader(batches, loader_workers=s.loader_workers))
    per_step = s.batch_size * s.grad_accum * world

    # -- steps ------------------------------------------------------------------------------------------
    window = _Window()
    run_start, cpu_start = time.perf_counter(), time.process_time()
    last_report = run_start
    tokens_seen = int(state.metrics.get("tokens", 0)) if state else 0
    for step in range(start_step, s.total_steps):
        step_start = time.perf_counter()
        lr = lr_at(step, s.total_steps, s.lr, s.warmup_steps, s.min_lr_ratio)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, samples, tokens = torch.zeros((), device=device), 0, 0
        for micro in range(s.grad_accum):
            batch = next(stream)
            for record_id, kind in batch["skipped"]:
                skipped.setdefault(kind, set()).add(record_id)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            if batch["pixel_values"] is not None:
                inputs["pixel_values"] = batch["pixel_values"].to(device, pixel_dtype)  # already pixel_dtype
            sync = (model.no_sync() if distributed and not fsdp and micro < s.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast:
                    loss = model(**inputs).loss
                if s.grad_accum > 1:
                    loss = loss / s.grad_accum
                loss.backward()
            loss_sum += loss.detach().float()  # summed on the device: one host sync a step, below
            samples += batch["num_samples"]
            tokens += batch["num_tokens"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        positions += per_step

        totals = torch.stack([loss_sum.double(), torch.tensor(float(samples), dtype=torch.float64, device=device),
                              torch.tensor(float(tokens), dtype=torch.float64, device=device)])
        if distributed:
            dist.all_reduce(totals)
        totals = totals.cpu()
        tokens_seen += int(totals[2])
        done = step + 1
        elapsed = time.perf_counter() - run_start
        step_s = max(time.perf_counter() - step_start, 1e-9)
        step_loss = float(totals[0]) / world
        window.add(step_loss, int(totals[1]), int(totals[2]))
        metrics = {
            "step": done,
            "loss": step_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples_per_s": int(totals[1]) / step_s,
            "tokens_per_s": int(totals[2]) / step_s,
            "samples": positions,  # run totals, resumes included
            "tokens": tokens_seen,
            "epoch": positions / s.source.num_records if s.source.num_records else None,
            "elapsed_s": elapsed,
            "worker_cpu_s": time.process_time() - cpu_start,  # this process's CPU time (rank 0's when reported)
            "eta_s": elapsed / (done - start_step) * (s.total_steps - done),
        }
        if device.type == "cuda":  # the peaks so far on this worker's GPU
            metrics["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics["gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        history.append(metrics)
        if rank == 0 and (done % s.log_every == 0 or done == s.total_steps or done == start_step + 1):
            print(progress_line(window.close(metrics), s.total_steps), flush=True)
        if s.step_hook is not None and rank == 0:
            s.step_hook(done, inner, tokenizer, spec)
        if done % s.save_every == 0 or done == s.total_steps:
            _save(s, inner, optimizer, fsdp, distributed, rank, done, positions, metrics, skipped, history, starts)
            last_report = time.perf_counter()
        elif done % s.report_every == 0 and _report_due(last_report, time.perf_counter(), distributed):
            ray.train.report(metrics)
            last_report = time.perf_counter()
    del stream


def _report_due(last_report: float, now: float, distributed: bool) -> bool:
    """Whether a metrics report may go now: REPORT_MIN_INTERVAL_S since the previous one. With several workers
    rank 0's clock decides for all (one broadcast), since every worker must report the same steps."""
    due = now - last_report >= REPORT_MIN_INTERVAL_S
    if distributed:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(due)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


@contextlib.contextmanager
def _local_copy(fs, path: str):
    """A local directory holding the checkpoint at `path` (itself on a local disk, else a temporary copy)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="raylens-resume-") as directory:
        yield download(fs, path, directory)


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs every report at INFO ("Reporting training result ...", two lines a step) through a
    logger named after its file, outside `ray.train`, so RunConfig's LoggingConfig does not reach it; our
    progress line says the same once."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: its logs stay
        pass


def read_history(path: str) -> list[dict]:
    """The per-step metrics a checkpoint carries (metrics.jsonl), so a resumed run keeps the whole curve."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def model_pad_id(model) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    eos = config.text_config.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def _gather_skipped(skipped: dict[str, set[str]], distributed: bool) -> dict[str, list[str]]:
    import torch.distributed as dist

    parts = [skipped]
    if distributed:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, skipped)
    merged: dict[str, set[str]] = {}
    for part in parts:
        for kind, ids in part.items():
            merged.setdefault(kind, set()).update(ids)
    return {kind: sorted(ids) for kind, ids in sorted(merged.items())}


def _save(s: LoopSettings, inner, optimizer, fsdp: bool, distributed: bool, rank: int, step: int, positions: int,
          metrics: dict, skipped: dict[str, set[str]], history: list[dict], starts: list[int]) -> None:
    """Every rank takes part (FSDP gathers, skipped records are merged); rank 0 writes, all report."""
    import ray.train
    import torch
    from safetensors.torch import save_file

    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(inner, options=options)
        optimizer_state = get_optimizer_state_dict(inner, optimizer, options=options)
        weights = trainable_state(inner, full) if rank == 0 else None
    else:
        optimizer_state = optimizer.state_dict() if rank == 0 else None
        weights = trainable_state(inner) if rank == 0 else None
    all_skipped = _gather_skipped(skipped, distributed)
    metrics = {**metrics, "skipped_records": sum(len(ids) for ids in all_skipped.values())}
    name = checkpoint_name(step)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="raylens-ckpt-") as directory:
        save_file(weights, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
        torch.save(optimizer_state, os.path.join(directory, OPTIMIZER_FILE))
        with open(os.path.join(directory, RUN_FILE), "w") as f:
            json.dump(s.run_description, f, indent=2, ensure_ascii=False)
        with open(os.path.join(directory, HISTORY_FILE), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in history)
        files = {name: os.path.getsize(os.path.join(directory, name))
                 for name in (WEIGHTS_FILE, OPTIMIZER_FILE, RUN_FILE, HISTORY_FILE)}
        state = TrainingState(step=step, positions=positions, metrics=metrics, skipped=all_skipped, starts=starts,
                              files=files)
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            f.write(state.to_json())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)
    if s.output_fs is not None:
        prune_checkpoints(s.output_fs, s.output_root, s.keep)
    print(f"saved {name} (step {step}, {positions} samples seen)", flush=True)


def total_steps_for(num_records: int | None, *, max_steps: int | None, epochs: float | None, batch_size: int,
                    grad_accum: int, workers: int) -> int:
    """--max-steps, or the steps `epochs` passes over `num_records` take at this global batch."""
    if max_steps is not None:
        return max_steps
    if not num_records:
        raise ValueError("--epochs needs a data set of known size; give --max-steps")
    return max(1, math.ceil(epochs * num_records / (batch_size * grad_accum * workers)))
