"""`CaptionJobConfig`: the one typed config of the batch job, parsed by the CLI and passed to the Ray job.

Kept free of heavy imports (no torch, no ray) so `--help` is instant and the config can be built and
validated anywhere. Each field's `help` is the CLI help text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

from jobs.config_cli import config_field as _f, config_parser, parse_config
from raylens.engines import ENGINE_NAMES as ENGINES  # the one list of engine names (a cheap import)
from raylens.prompts import DEFAULT_CAPTION_PROMPT


@dataclass
class CaptionJobConfig:
    # -- data -------------------------------------------------------------------------------
    input: str = _f(None, "directory of images (recursive; jpg jpeg png webp bmp gif tiff) or s3://bucket/prefix/", required=True)
    output: str = _f(None, "output directory or s3://bucket/prefix/ for Parquet files and _summary.json", required=True)
    overwrite: bool = _f(False, "start over: delete the job's own files under --output (part files, _manifest.json, "
                                "_summary.json), never other files (default: resume, skipping finished shards of the "
                                "same inputs and settings)")
    format: str = _f("parquet", "output file format", choices=("parquet", "jsonl"))
    image_column: str = _f("image", "manifest column holding each row's image (local path, s3:// URI or http(s) URL)")
    question_column: str | None = _f(None, "manifest column holding each row's own question (VQA); replaces --prompt")
    allowed_domains: str | None = _f(None, "comma-separated hosts that http(s) image URLs may come from (default: any public host)")
    image_root: list[str] | None = _f(None, "a folder or s3://bucket/prefix that manifest rows may read besides the manifest's own folder; repeatable (default: only the manifest's folder)", action="append")
    shard_size: int = _f(256, "images per output file; the unit of resume")
    # -- what to ask ------------------------------------------------------------------------
    prompt: list[str] = _f(None, "the instruction asked of every image; repeat the flag to ask several (one row each)", action="append",
                                shown_default=repr(DEFAULT_CAPTION_PROMPT))
    # -- model and engine -------------------------------------------------------------------
    model: str | None = _f(None, "Hugging Face id (OpenGVLab/InternVL2-2B), local directory or s3:// prefix; default: the shipped demo model")
    engine: str = _f("auto", "auto (lmdeploy on GPUs when installed, else transformers) | lmdeploy | transformers | package.module:Class")
    max_tiles: int | None = _f(None, "at most this many 448px tiles per image (+ thumbnail); default: the checkpoint's max_dynamic_patch")
    fast_jpeg_decode: bool = _f(False, "decode large JPEGs at a reduced DCT scale (Pillow's draft mode): several times faster on big photos, a few grey levels off the reference preprocessing (docs/benchmarks.md)")
    tiles_on_cpu: bool = _f(True, "cut and normalise the tiles in the CPU stage, in the model's dtype, so the engine actor only forwards them to the GPU (the same answers; 1.2 MB per 448px tile in bfloat16 through Ray's object store; measured 1.26x the images/s at 1 tile, 1.04x at 12, docs/benchmarks.md); --no-tiles-on-cpu makes them in the engine actor instead")
    alpha_background: str | None = _f(None, "composite transparent images onto this colour (a name such as white, or #rrggbb) instead of dropping their alpha as the model card, lmdeploy and transformers do")
    max_new_tokens: int = _f(64, "longest answer, in tokens")
    temperature: float = _f(0.0, "0 = greedy; > 0 samples")
    top_p: float = _f(1.0, "nucleus sampling mass (with --temperature > 0)")
    seed: int | None = _f(None, "sampling seed")
    ignore_eos: bool = _f(False, "always generate --max-new-tokens tokens (benchmarks)")
    engine_args: str | None = _f(None, "JSON object of engine options, e.g. '{\"cache_max_entry_count\": 0.5}' for lmdeploy")
    # -- scale ------------------------------------------------------------------------------
    batch_size: int = _f(16, "images per engine call")
    replicas: str = _f("1", "engine actors: N, or MIN:MAX to autoscale (GPU actors where GPUs exist, CPU actors otherwise)")
    batches_in_flight: int = _f(8, "batches each engine actor works on at once: keeps an async engine's queue full")
    gpus_per_replica: float = _f(1.0, "GPUs per engine actor where the cluster has GPUs: a fraction shares a GPU between engines; an integer K >= 2 runs lmdeploy with tensor parallelism K")
    max_pixels: int = _f(64_000_000, "refuse images that declare more pixels than this (decompression bombs)")
    # -- failures ---------------------------------------------------------------------------
    max_error_rate: float = _f(1.0, "exit 1 when more than this fraction of rows failed")
    engine_retries: int = _f(2, "retries of a batch whose engine actor died; its rows are then recorded as errors")
    # -- storage ----------------------------------------------------------------------------
    s3_endpoint: str | None = _f(None, "S3-compatible endpoint URL; default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL")
    # -- where it runs and what it prints ---------------------------------------------------
    ray_address: str | None = _f(None, "Ray to run on: a cluster's host:port, 'auto' (the cluster started on this machine), "
                                       "or 'local' (a private instance for this job); default: $RAY_ADDRESS (set by "
                                       "`ray job submit`), else 'local'")
    log_level: str = _f("WARNING", "what raylens logs besides the progress and the summary (INFO adds engine and "
                                   "placement details)", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        if self.question_column and self.prompt:
            raise ValueError("--prompt and --question-column exclude each other: each row asks its own question")
        if self.prompt is None:
            self.prompt = [DEFAULT_CAPTION_PROMPT]
        elif isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        checks = [
            (self.engine in ENGINES or ":" in self.engine, f"--engine must be one of {ENGINES} or package.module:Class, got {self.engine!r}"),
            (self.max_tiles is None or self.max_tiles >= 1, f"--max-tiles must be >= 1, got {self.max_tiles}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (0.0 <= self.temperature <= 2.0, f"--temperature must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self._replicas_ok(), f"--replicas must be N or MIN:MAX with 1 <= MIN <= MAX, got {self.replicas!r}"),
            (0.0 <= self.max_error_rate <= 1.0, f"--max-error-rate must be in [0, 1], got {self.max_error_rate}"),
            (self.engine_retries >= 0, f"--engine-retries must be >= 0, got {self.engine_retries}"),
            (self.batches_in_flight >= 1, f"--batches-in-flight must be >= 1, got {self.batches_in_flight}"),
            (self.gpus_per_replica > 0, f"--gpus-per-replica must be > 0, got {self.gpus_per_replica}"),
            (self.gpus_per_replica <= 1 or float(self.gpus_per_replica).is_integer(),
             f"--gpus-per-replica above 1 must be a whole number of GPUs (tensor parallelism), got {self.gpus_per_replica}"),
            (self.max_pixels >= 1, f"--max-pixels must be >= 1, got {self.max_pixels}"),
            (all(p and p.strip() for p in self.prompt), "--prompt must not be empty"),
            (self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}"),
            (self.format in ("parquet", "jsonl"), f"--format must be parquet or jsonl, got {self.format!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.engine_options()  # validates --engine-args
        self.alpha_background_rgb()  # validates --alpha-background

    def alpha_background_rgb(self) -> tuple[int, int, int] | None:
        """--alpha-background as an (r, g, b) triple, None when not given."""
        if self.alpha_background is None:
            return None
        from PIL import ImageColor

        try:
            rgb = ImageColor.getrgb(self.alpha_background)
        except ValueError:
            raise ValueError(f"--alpha-background must be a colour name or #rrggbb, got {self.alpha_background!r}") from None
        return tuple(rgb[:3])

    def allowed_domain_set(self) -> frozenset[str] | None:
        if not self.allowed_domains:
            return None
        return frozenset(d.strip() for d in self.allowed_domains.split(",") if d.strip())

    def tensor_parallel(self) -> int:
        """lmdeploy `tp`: the GPUs one engine spans (1 for fractional or single GPUs)."""
        return int(self.gpus_per_replica) if self.gpus_per_replica > 1 else 1

    def replica_range(self) -> tuple[int, int]:
        """(min, max) engine actors."""
        lo, sep, hi = str(self.replicas).partition(":")
        return int(lo), int(hi if sep else lo)

    def _replicas_ok(self) -> bool:
        try:
            lo, hi = self.replica_range()
        except ValueError:
            return False
        return 1 <= lo <= hi

    def engine_options(self) -> dict:
        """--engine-args parsed (a JSON object), {} when not given."""
        if not self.engine_args:
            return {}
        try:
            value = json.loads(self.engine_args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--engine-args is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"--engine-args must be a JSON object, got {self.engine_args!r}")
        return value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def parser(cls, prog: str = "python -m jobs.caption", description: str | None = None) -> argparse.ArgumentParser:
        return config_parser(cls, prog, description)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, **parser_kwargs) -> "CaptionJobConfig":
        return parse_config(cls, argv, **parser_kwargs)
