"""`FinetuneConfig`: the one typed config of a fine-tuning run, parsed by the CLI and passed to every worker.

Kept free of heavy imports (no torch, no ray) so `--help` is instant. Each field's `help` is the CLI help
text; defaults are InternVL2's official LoRA recipe (notes/serve-train-deploy.md E) where it has one.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from jobs.config_cli import config_field as _f, config_parser, parse_config

STRATEGIES = ("ddp", "fsdp")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# What may differ when a run is resumed with the same --output: how long it runs, how often it saves, on how
# many workers and with how many loader processes. Everything else defines the run and must match.
RESUMABLE_CHANGES = frozenset({
    "max_steps", "epochs", "save_every", "keep", "max_failures", "workers", "gpus_per_worker", "cpus_per_worker",
    "loader_workers", "log_every", "report_every", "threads", "ray_address", "s3_endpoint", "overwrite", "output",
})


@dataclass
class FinetuneConfig:
    # -- data -------------------------------------------------------------------------------------
    data: str = _f(None, "training data: LLaVA/XTuner .json or .jsonl, or an InternVL meta .json (local or s3://)", required=True)
    image_root: str | None = _f(None, "directory or s3:// prefix that relative image paths are relative to (default: the data file's directory)")
    output: str = _f(None, "run directory (local or s3://): checkpoints, run.json, _summary.json; rerunning with the same --output resumes", required=True)
    overwrite: bool = _f(False, "delete an earlier run in --output first instead of resuming it")
    # -- model ------------------------------------------------------------------------------------
    model: str | None = _f(None, "base model: Hugging Face id (OpenGVLab/InternVL2-2B), local directory or s3:// prefix; default: the shipped demo model")
    max_tiles: int | None = _f(None, "at most this many tiles per image (+ thumbnail), as at inference; default: the checkpoint's max_dynamic_patch")
    max_length: int = _f(4096, "samples longer than this many tokens (image tokens included) are skipped")
    # -- what trains ------------------------------------------------------------------------------
    lora_r: int = _f(16, "LoRA rank on the language model (0: no LLM LoRA; with nothing else to train, the same as --full)")
    lora_alpha: int | None = _f(None, "LoRA alpha (default: 2 x --lora-r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_targets: list[str] | None = _f(None, "LLM linear layers to adapt, e.g. q_proj v_proj (InternLM2 names wqkv wo w1 w2 w3 work too); default: all", nargs="+")
    train_projector: bool = _f(False, "also train the vision-language projector (mlp1) in full")
    vision_lora: int = _f(0, "LoRA rank on the vision tower (attention qkv/proj, mlp fc1/fc2; alpha 2 x rank); 0: frozen")
    full: bool = _f(False, "full fine-tuning: every weight trains (LoRA flags do not apply)")
    # -- optimisation -----------------------------------------------------------------------------
    max_steps: int | None = _f(None, "optimizer steps to train for (excludes --epochs)")
    epochs: float | None = _f(None, "passes over the data (default 1 when --max-steps is not given)")
    batch_size: int = _f(4, "samples per worker per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step (global batch = batch-size x grad-accum x workers)")
    lr: float = _f(4e-5, "peak learning rate")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent warming up linearly")
    warmup_steps: int | None = _f(None, "warm-up steps (overrides --warmup-ratio)")
    min_lr_ratio: float = _f(0.0, "cosine decay ends at this fraction of --lr")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices only)")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    clip: float = _f(1.0, "gradient-norm clip")
    dtype: str = _f("auto", "weights' dtype: auto = bfloat16 on GPUs (trainable weights in float32 with autocast), float32 on CPUs", choices=DTYPES)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, ~30%% more compute)")
    shuffle: bool = _f(True, "shuffle the records every epoch (--no-shuffle keeps file order)")
    seed: int = _f(0, "seed of the data order, LoRA initialisation and dropout")
    # -- scale ------------------------------------------------------------------------------------
    workers: int = _f(1, "training workers (one per GPU on GPU clusters; CPU workers with gloo where there are no GPUs)")
    gpus_per_worker: float = _f(1.0, "GPUs per worker where the cluster has GPUs (0: train on CPUs)")
    cpus_per_worker: float = _f(1.0, "CPUs per worker (its torch threads on CPU)")
    strategy: str = _f("ddp", "ddp: every worker holds the model; fsdp: parameters, gradients and optimizer state sharded across workers", choices=STRATEGIES)
    loader_workers: int = _f(2, "data loader processes per worker (read, decode, tile, tokenise ahead of the step; 0: in the training process)")
    threads: int | None = _f(None, "torch CPU threads per worker (default: Ray's, = --cpus-per-worker)")
    ray_address: str | None = _f(None, "the Ray cluster to run on (default: $RAY_ADDRESS, which `ray job submit` sets; else a private local instance)")
    # -- checkpoints and failures -------------------------------------------------------------------
    save_every: int = _f(200, "save a checkpoint every this many steps (and at the end)")
    keep: int = _f(2, "keep the last this many checkpoints")
    max_failures: int = _f(3, "times a run recovers from a failed worker (restarted from the last checkpoint); -1: always")
    log_every: int = _f(1, "print a progress line every this many steps (every step's metrics go to metrics.jsonl)")
    report_every: int = _f(10, "ray.train.report the metrics every this many steps (at most one report per 2.5 s: Ray Train takes one per 2 s, a sooner one waits) and with every checkpoint")
    s3_endpoint: str | None = _f(None, "S3-compatible endpoint URL; default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL")

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = [self.lora_targets]
        checks = [
            (not (self.max_steps is not None and self.epochs is not None), "--max-steps and --epochs exclude each other"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
            (self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0.0 < self.adam_beta2 < 1.0, f"--adam-beta2 must be in (0, 1), got {self.adam_beta2}"),
            (self.clip > 0, f"--clip must be > 0, got {self.clip}"),
            (self.lora_r >= 0, f"--lora-r must be >= 0, got {self.lora_r}"),
            (self.lora_alpha is None or self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}"),
            (0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.vision_lora >= 0, f"--vision-lora must be >= 0, got {self.vision_lora}"),
            (not (self.full and (self.vision_lora or self.train_projector)), "--full trains every weight: drop --vision-lora and --train-projector"),
            (self.max_tiles is None or self.max_tiles >= 1, f"--max-tiles must be >= 1, got {self.max_tiles}"),
            (self.max_length >= 16, f"--max-length must be >= 16, got {self.max_length}"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}"),
            (self.cpus_per_worker > 0, f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}"),
            (self.loader_workers >= 0, f"--loader-workers must be >= 0, got {self.loader_workers}"),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
            (self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}"),
            (self.keep >= 1, f"--keep must be >= 1, got {self.keep}"),
            (self.max_failures >= -1, f"--max-failures must be >= -1, got {self.max_failures}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.report_every >= 1, f"--report-every must be >= 1, got {self.report_every}"),
            (self.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}"),
            (self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        self.trainable()  # validates the combination

    @property
    def full_fine_tune(self) -> bool:
        """--full, or --lora-r 0 with nothing else asked to train."""
        return self.full or (self.lora_r == 0 and not self.vision_lora and not self.train_projector)

    def trainable(self):
        """The TrainableSpec these flags ask for."""
        from raylens.training.lora import TrainableSpec

        if self.full_fine_tune:
            return TrainableSpec(full=True, lora_r=0, lora_alpha=0, lora_dropout=self.lora_dropout)
        return TrainableSpec(
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha or 2 * self.lora_r,
            lora_dropout=self.lora_dropout,
            lora_targets=tuple(self.lora_targets or ()),
            vision_lora_r=self.vision_lora,
            vision_lora_alpha=2 * self.vision_lora,
            train_projector=self.train_projector,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_defining(self) -> dict:
        """The settings a resumed run must share with the run it resumes."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}

    @classmethod
    def parser(cls, prog: str = "python -m jobs.finetune", description: str | None = None,
               epilog: str | None = None) -> argparse.ArgumentParser:
        return config_parser(cls, prog, description, epilog)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, **parser_kwargs) -> "FinetuneConfig":
        return parse_config(cls, argv, **parser_kwargs)
