"""Caption (or question) images with an InternVL2 model on Ray Data: a directory or S3 prefix of images,
Parquet/JSONL/CSV manifests (optionally with a question per row), or WebDataset shards.

Locally (starts a Ray instance when none is running):

    python -m jobs.caption --input examples/images --output out/captions

On a cluster:

    ray job submit --working-dir . -- python -m jobs.caption \\
        --input s3://bucket/images/ --output s3://bucket/captions/ --model OpenGVLab/InternVL2-2B

Stages (see jobs/caption_stages.py): list inputs (driver) -> read, decode, validate, downscale (CPU tasks)
-> generate (actor pool: GPU actors where the cluster has GPUs, CPU actors otherwise) -> one Parquet file
per shard of inputs, written when complete (jobs/caption_output.py): rerunning resumes, exactly once.
`setup()` resolves and validates everything that can fail before Ray starts; `main()` runs the pipeline.
Exit codes: 0 done; 1 nothing could be processed; 2 bad --input/--output or arguments.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from jobs.caption_config import CaptionJobConfig
from jobs.caption_output import (
    Manifest,
    ShardWriter,
    completed_shards,
    fingerprint,
    iter_output_tables,
    read_manifest,
    write_manifest,
)
from raylens.images import TilingSpec
from raylens.sources import InputItem, ReadRoots, list_inputs
from raylens.storage import S3Settings, ensure_writable_dir, resolve_filesystem

logger = logging.getLogger("raylens.caption")

SUMMARY_FILE = "_summary.json"
DEMO_NOTICE = (
    "Using the raylens demo model (a tiny InternVL2 trained on synthetic shapes). "
    "For real captions pass --model OpenGVLab/InternVL2-2B (GPU recommended: pip install 'raylens[gpu]')."
)
# Our output columns; an input column of the same name is carried as "input.<name>". (Columns that
# only travel between stages are named "__<name>" and never reach the output.)
_RESERVED = {"id", "prompt_index", "image", "prompt", "text", "error", "stage", "model", "num_tiles",
             "num_input_tokens", "num_output_tokens", "finish_reason"}


class UsageError(Exception):
    """Bad --input/--output or arguments: one line for the user, exit code 2."""


@dataclass
class JobPlan:
    """Everything `setup()` resolved: filesystems, input items, model directory, tiling, output layout."""

    config: CaptionJobConfig
    s3: S3Settings
    in_fs: pafs.FileSystem
    in_root: str
    out_fs: pafs.FileSystem
    out_root: str
    items: list[InputItem]
    extra_fields: list  # pyarrow fields of the input's own columns, carried to the output
    model_dir: str
    model_name: str
    tiling: TilingSpec
    uses_demo_model: bool
    manifest: Manifest
    read_roots: ReadRoots | None = None  # where manifest rows may read (raylens.sources); None: not a manifest

    def shard_of(self, index: int) -> int:
        return index // self.manifest.shard_size

    def prompts_per_item(self) -> int:
        return 1 if self.config.question_column else len(self.config.prompt)


def setup(config: CaptionJobConfig, env: dict[str, str] | None = None) -> JobPlan:
    """Resolve storage, list inputs, check the output and the model. Raises UsageError on bad input."""
    from raylens.checkpoints.formats import ModelSpec
    from raylens.checkpoints.resolve import resolve_model

    env = dict(os.environ if env is None else env)
    s3 = S3Settings.from_env(env, endpoint=config.s3_endpoint)
    in_fs, in_root = resolve_filesystem(config.input, s3)
    out_fs, out_root = resolve_filesystem(config.output, s3)
    try:
        listing = list_inputs(in_fs, in_root, image_column=config.image_column, question_column=config.question_column,
                              image_roots=config.image_root or ())
    except FileNotFoundError:
        raise UsageError(f"--input {config.input} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read --input {config.input}: {exc}") from None
    items = listing.items
    if not items:
        raise UsageError(f"no image files or manifest rows under --input {config.input}")
    prompts = (f"question column {config.question_column}",) if config.question_column else tuple(config.prompt)
    manifest = Manifest(num_inputs=len(items), shard_size=config.shard_size, inputs_sha256=fingerprint(i.id for i in items),
                        prompts=prompts, format=config.format)
    try:
        _prepare_output(config, out_fs, out_root, manifest)
    except OSError as exc:
        raise UsageError(f"cannot write --output {config.output}: {exc}") from None
    model_fs = s3.filesystem() if (config.model or "").startswith("s3://") else None
    model_dir = str(resolve_model(config.model, filesystem=model_fs))
    try:
        tiling = ModelSpec.from_dir(model_dir).tiling(config.max_tiles)
    except ValueError as exc:  # e.g. --max-tiles below the checkpoint's min tiles
        raise UsageError(f"--model {config.model or model_dir}: {exc}") from None
    return JobPlan(
        config=config, s3=s3, in_fs=in_fs, in_root=in_root, out_fs=out_fs, out_root=out_root, items=items,
        extra_fields=_extra_fields(items), model_dir=model_dir, model_name=config.model or "raylens-demo",
        tiling=tiling, uses_demo_model=config.model is None, manifest=manifest, read_roots=listing.roots,
    )


def _extra_name(name: str) -> str:
    return f"input.{name}" if name in _RESERVED or name.startswith("__") else name


def _extra_fields(items: list[InputItem]):
    """One Arrow type per carried input column, inferred from every row (mixed types become strings)."""
    import pyarrow as pa

    values: dict[str, list] = {}
    for item in items:
        for name, value in item.extra:
            values.setdefault(name, []).append(value)
    fields = []
    for name, column in values.items():
        try:
            kind = pa.array(column).type
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kind = pa.string()
        fields.append(pa.field(_extra_name(name), pa.string() if pa.types.is_null(kind) else kind))
    return fields


def _prepare_output(config: CaptionJobConfig, fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    """Start fresh (--overwrite or empty output) or check that a rerun resumes the same work."""
    existing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    if existing and config.overwrite:
        fs.delete_dir_contents(root)
        existing = []
    ensure_writable_dir(fs, root)
    if existing:
        previous = read_manifest(fs, root)
        if previous is None:
            raise UsageError(f"--output {config.output} holds files that raylens did not write; use another directory or --overwrite")
        if previous != manifest:
            raise UsageError(f"--output {config.output} holds results of other inputs or settings "
                             "(files, --prompt, --shard-size or --format changed); pass --overwrite to start over")
    write_manifest(fs, root, manifest)


def pending_rows(plan: JobPlan) -> tuple[list[dict], dict[int, int]]:
    """Listing rows of the shards not yet written, and how many output rows each shard must get."""
    done = completed_shards(plan.out_fs, plan.out_root)
    names = [f.name for f in plan.extra_fields]
    string_columns = {f.name for f in plan.extra_fields if str(f.type) == "string"}
    rows, expected = [], {}
    for index, item in enumerate(plan.items):
        shard = plan.shard_of(index)
        if shard in done:
            continue
        extra = dict.fromkeys(names)
        for name, value in item.extra:
            key = _extra_name(name)
            extra[key] = str(value) if key in string_columns and value is not None else value
        rows.append({"id": item.id, "image": item.source, "__source": item.source, "__shard": shard,
                     "__question": item.question, "__listing_error": item.error, **extra})
        expected[shard] = expected.get(shard, 0) + plan.prompts_per_item()
    return rows, expected


def build_dataset(plan: JobPlan, rows: list[dict]):
    """The lazy Ray Data pipeline: listing -> prepare (CPU tasks) -> generate (actor pool)."""
    import ray
    from ray.data import ActorPoolStrategy

    import pyarrow as pa

    from jobs.caption_stages import LISTING_SCHEMA, GenerateStage, prepare_batch
    from raylens.engines.base import SamplingParams
    from raylens.fetch import UrlFetcher
    from raylens.sources import SourceFilesystems

    cfg = plan.config
    lo, hi = cfg.replica_range()
    listing = pa.Table.from_pylist(rows, schema=pa.schema(list(LISTING_SCHEMA) + list(plan.extra_fields)))
    # One block per engine batch: a block is the unit Ray retries, so when an engine actor dies only the
    # batches it was working on are retried (and, past --engine-retries, recorded as errors).
    size = max(cfg.batch_size, -(-len(rows) // 20_000))
    ds = ray.data.from_arrow([listing.slice(i, size) for i in range(0, len(rows), size)])
    fetcher = UrlFetcher(allowed_domains=cfg.allowed_domain_set())
    ds = ds.map_batches(
        prepare_batch,
        batch_size=cfg.batch_size,  # keeps blocks batch-sized all the way to the engine
        batch_format="pyarrow",
        fn_kwargs=dict(filesystems=SourceFilesystems.create(plan.s3, roots=plan.read_roots), fetcher=fetcher, tiling=plan.tiling,
                       max_pixels=cfg.max_pixels),
        num_cpus=1,
        # Spread decoding over the cluster's CPUs. Passing the args through a function also keeps Ray
        # Data from fusing this stage into the engine actors: fused, the GPU actor would decode images.
        ray_remote_args_fn=_spread,
    )
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    engine = cfg.engine
    if engine == "auto":
        engine = "lmdeploy" if has_gpus and _lmdeploy_installed() else "transformers"
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.seed, ignore_eos=cfg.ignore_eos)
    engine_options = engine_options_for(cfg, engine, has_gpus)
    tp = engine_options.get("tp", 1)
    ds = ds.map_batches(
        GenerateStage,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        # Several calls per actor at once: without it an actor takes one batch at a time and lmdeploy's
        # continuous batching never sees more than --batch-size requests (measured: GPU 19% busy).
        # No more queued on an actor than it runs: Ray Data's default (twice as many) let the first engine
        # that was ready take every batch of a small job while the second GPU idled (measured on 2 GPUs).
        compute=ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=cfg.batches_in_flight,
                                  max_tasks_in_flight_per_actor=cfg.batches_in_flight),
        fn_constructor_kwargs=dict(
            engine=engine,
            model=cfg.model, s3=plan.s3, model_name=plan.model_name, engine_options=engine_options,
            params=params, prompts=list(cfg.prompt), use_question_column=bool(cfg.question_column),
            max_tiles=cfg.max_tiles, extra_fields=plan.extra_fields,
        ),
        **_engine_resources(cfg.gpus_per_replica if has_gpus else 0, tp),
        # A dead engine actor is restarted (Ray Data's default) and its batch retried, but only this often:
        # a batch that kills every engine it meets must not loop forever. Its rows become error rows.
        max_task_retries=cfg.engine_retries,
    )
    if tp > 1:
        _no_extra_placement_groups(ds.context)
    # A batch that still fails is dropped here and its rows are recorded as errors by the driver
    # (`record_lost_rows`), so the job finishes and no row goes missing.
    ds.context.max_errored_blocks = -1
    return ds, engine


def record_lost_rows(plan: JobPlan, writer: ShardWriter, rows: list[dict]) -> None:
    """Rows of batches that failed for good (engine actor died past its retries): written as errors."""
    import pyarrow as pa

    from jobs.caption_stages import output_row, prompts_of, stage_output_schema

    incomplete = writer.incomplete()
    if not incomplete:
        return
    logger.warning("%d shards have rows whose batch failed; recording them as errors", len(incomplete))
    message = (f"BatchFailed: the batch holding this row failed {plan.config.engine_retries + 1} times "
               "(engine actor died or a stage raised); see the Ray logs")
    extra_names = [f.name for f in plan.extra_fields]
    schema = stage_output_schema(plan.extra_fields)
    for shard in sorted(incomplete):
        have = writer.rows_of(shard)
        seen = set() if have is None else set(zip(have.column("id").to_pylist(), have.column("prompt_index").to_pylist()))
        lost = [
            output_row(r, j, prompt, model=plan.model_name, extra_names=extra_names, error=message, stage="engine", num_tiles=0)
            for r in rows if r["__shard"] == shard
            for j, prompt in enumerate(prompts_of(r, plan.config.prompt, bool(plan.config.question_column)))
            if (r["id"], j) not in seen
        ]
        writer.add(pa.Table.from_pylist(lost, schema=schema))


def engine_options_for(cfg: CaptionJobConfig, engine: str, has_gpus: bool) -> dict:
    """The engine's constructor options: `--engine-args`, plus what the job's layout implies.

    An lmdeploy engine on a fraction of a GPU gets that fraction of the usual KV-cache share unless
    `--engine-args` sets one: lmdeploy takes 0.8 of the *free* memory, so the first engine on a GPU
    would otherwise leave too little for the others."""
    from raylens.engines.kv_cache import DEFAULT_CACHE_FRACTION

    options = ({"max_batch_size": cfg.batch_size} if engine == "transformers" else {}) | cfg.engine_options()
    if not has_gpus:
        return options
    tp = cfg.tensor_parallel()
    if tp > 1:
        options["tp"] = tp
    if engine == "lmdeploy" and cfg.gpus_per_replica < 1:
        options.setdefault("cache_max_entry_count", round(DEFAULT_CACHE_FRACTION * cfg.gpus_per_replica, 3))
    return options


def _engine_resources(gpus: float, tp: int) -> dict:
    """Ray resources of one engine actor.

    With tensor parallelism lmdeploy starts its own GPU workers with Ray and places them in the placement
    group of the actor that builds the engine (notes/lmdeploy.md 4.2). So the actor itself holds no GPU
    and runs inside a fresh group of `tp` GPU bundles that captures its child tasks; an actor holding the
    GPUs itself would make lmdeploy wait for `tp` more.
    """
    if tp <= 1:
        return {"num_gpus": gpus, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": 1, "ray_remote_args_fn": lambda: _tp_placement(tp)}


def _tp_placement(tp: int) -> dict:
    """A new placement group for each engine actor Ray Data starts (its `ray_remote_args_fn`).

    Not waited for here: an actor waits for its group anyway, and a group that cannot be placed yet (an
    autoscaling pool asking for more GPUs than are free) must not stop Ray Data's scheduling. Waiting is
    what made `--gpus-per-replica 2` hang: Ray Data called this a second time (next function), and that
    group, which needed two more GPUs, never became ready."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="STRICT_PACK")
    logger.info("engine actor with tensor parallelism %d: placement group %s", tp, group.id.hex())
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def _no_extra_placement_groups(context) -> None:
    """Ray Data 2.60's high-memory issue detector calls every operator's `ray_remote_args_fn` once more
    when execution starts, to read a `memory` value, which would create (and leak) one more placement
    group of `tp` GPUs; on an autoscaling cluster a pending group asks for GPU nodes. The job sets no
    `memory`, so that detector has nothing to report here: it is left out of this dataset's context."""
    config = context.issue_detectors_config
    config.detectors = [d for d in config.detectors if d.__name__ != "HighMemoryIssueDetector"]


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def _lmdeploy_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lmdeploy") is not None


def summarize(plan: JobPlan, wall_s: float, engine: str, processed_images: int) -> dict:
    """Count what was actually written (the output is the truth, not the driver's memory)."""
    rows = failed = 0
    by_kind: dict[str, int] = {}
    for table in iter_output_tables(plan.out_fs, plan.out_root, ["error"]):
        rows += table.num_rows
        for e in table.column("error").to_pylist():
            if e is not None:
                failed += 1
                kind = e.split(":", 1)[0]
                by_kind[kind] = by_kind.get(kind, 0) + 1
    return {
        "rows": rows,
        "inputs": len(plan.items),
        "prompts": len(plan.config.prompt),
        "succeeded": rows - failed,
        "failed": failed,
        "errors_by_kind": by_kind,
        "wall_s": round(wall_s, 3),
        "processed_images": processed_images,  # by this run (a resumed run skips finished shards)
        "images_per_s": round(processed_images / wall_s, 3) if wall_s > 0 else None,
        "model": plan.model_name,
        "engine": engine,
        "config": plan.config.to_dict(),
    }


def main(plan: JobPlan) -> dict:
    """Run the pipeline for a resolved plan; returns the summary (also written to _summary.json)."""
    import ray

    if not ray.is_initialized():
        # Join a cluster only when told to (`ray job submit` sets RAY_ADDRESS); otherwise start a private
        # instance: a bare ray.init() joins any Ray already running on the machine and dies with it.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING)
    from jobs.caption_stages import output_schema

    start = time.perf_counter()
    rows, expected = pending_rows(plan)
    engine = plan.config.engine
    if rows:
        print(f"{len(expected)} of {plan.manifest.num_shards} shards to do ({len(rows)} images)", flush=True)
        ds, engine = build_dataset(plan, rows)
        writer = ShardWriter(plan.out_fs, plan.out_root, plan.config.format, expected, output_schema(plan.extra_fields))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
        record_lost_rows(plan, writer, rows)
    else:
        print("every shard is already written; nothing to do", flush=True)
    summary = summarize(plan, time.perf_counter() - start, engine, processed_images=len(rows))
    with plan.out_fs.open_output_stream(posixpath.join(plan.out_root, SUMMARY_FILE)) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def engine_start_failure(exc: BaseException) -> str | None:
    """The error that kept every engine actor from being built, or None for any other failure.

    An engine whose constructor raises (a bad --engine-args key, a model lmdeploy refuses) kills its actor
    before it takes a batch; Ray Data then gives up with ActorDiedError, whose text ends with the original
    exception. That is a setup error, so the job reports that one line instead of Ray's traceback.
    """
    from ray.exceptions import ActorDiedError

    if not isinstance(exc, ActorDiedError) or "creation task" not in str(exc):
        return None
    errors = re.findall(r"^\s*((?:\w+\.)*\w+(?:Error|Exception): .+)$", str(exc), flags=re.MULTILINE)
    causes = [e for e in errors if not e.split(":", 1)[0].endswith("ActorDiedError")]
    return causes[-1].strip() if causes else str(exc).splitlines()[0]


def run(argv: list[str] | None = None) -> int:
    config = CaptionJobConfig.from_args(argv, description=__doc__)
    try:
        plan = setup(config)
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if plan.uses_demo_model:
        print(DEMO_NOTICE, flush=True)
    print(f"captioning {len(plan.items)} images from {config.input} -> {config.output}", flush=True)
    try:
        summary = main(plan)
    except Exception as exc:  # noqa: BLE001
        cause = engine_start_failure(exc)
        if cause is None:
            raise
        print(f"error: the engine could not start: {cause}\n(check --model, --engine and --engine-args; "
              "finished shards are kept and a rerun resumes)", file=sys.stderr)
        return 1
    brief = {k: summary[k] for k in ("rows", "succeeded", "failed", "wall_s", "images_per_s", "model", "engine")}
    print("summary: " + json.dumps(brief), flush=True)
    if summary["succeeded"] == 0:
        print("error: no image could be processed (see the error column)", file=sys.stderr)
        return 1
    rate = summary["failed"] / summary["rows"]
    if rate > config.max_error_rate:
        print(f"error: {rate:.1%} of rows failed, more than --max-error-rate {config.max_error_rate}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
