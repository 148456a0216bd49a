"""Caption (or question) images with an InternVL2 model on Ray Data: a directory or S3 prefix of images,
Parquet/JSONL/CSV manifests (optionally with a question per row), or WebDataset shards.

Locally (on a private Ray instance of its own, never one already running on the machine):

    python -m jobs.caption --input examples/images --output out/captions

On a cluster (`ray job submit` sets RAY_ADDRESS; or pass --ray-address host:port):

    ray job submit --working-dir . -- python -m jobs.caption \\
        --input s3://bucket/images/ --output s3://bucket/captions/ --model OpenGVLab/InternVL2-2B

Stages (see jobs/caption_stages.py): list inputs (driver) -> read, decode, validate, downscale (CPU tasks)
-> generate (actor pool: GPU actors where the cluster has GPUs, CPU actors otherwise) -> one Parquet file
per shard of inputs, written when complete (jobs/caption_output.py): rerunning the same command resumes,
exactly once, and a rerun with other inputs, model or output-changing settings is refused, naming each
difference (jobs/caption_identity.py). --overwrite deletes only the job's own files, and --output may not
overlap --input. `setup()` resolves and validates everything that can fail before Ray starts; `main()`
runs the pipeline.
Exit codes: 0 done; 1 nothing could be processed, too many errors, no engine, the output refused a write,
or Ray failed mid-run; 2 bad flags, --input, --output, --model, an unreachable --ray-address, or a rerun
that does not match.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import sys
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from jobs.caption_config import CaptionJobConfig
from jobs.caption_output import (
    SUMMARY_FILE,
    Manifest,
    ShardWriter,
    delete_job_files,
    finished_shards,
    is_job_file,
    iter_part_columns,
    location_of,
    output_overlap,
    read_manifest,
    top_level_files,
    write_manifest,
)
from raylens.images import TILE_DTYPES, TilingSpec
from raylens.sources import InputItem, ReadRoots, list_inputs
from raylens.storage import S3Settings, ensure_writable_dir, resolve_filesystem, write_atomically

logger = logging.getLogger("raylens.caption")

DEMO_NOTICE = (
    "Using the raylens demo model (a tiny InternVL2 trained on synthetic shapes). "
    "For real captions pass --model OpenGVLab/InternVL2-2B (GPU recommended: pip install 'raylens[gpu]')."
)
# Our output columns; an input column of the same name is carried as "input.<name>". (Columns that
# only travel between stages are named "__<name>" and never reach the output.)
_RESERVED = {"id", "prompt_index", "image", "prompt", "text", "error", "error_kind", "stage", "model", "num_tiles",
             "num_input_tokens", "num_output_tokens", "finish_reason"}
MAX_RUN_RECORDS = 100  # per-run records kept in _summary.json


class UsageError(Exception):
    """Bad --input/--output or arguments: one line for the user, exit code 2."""


class OutputWriteError(Exception):
    """The output refused a write mid-run (disk full, permission withdrawn, bucket gone): one line, exit 1.
    Shards written before it are complete files, so a rerun of the same command resumes."""


@contextlib.contextmanager
def _writing_output(plan: "JobPlan"):
    """Turns an OSError of the output filesystem into OutputWriteError (only around output writes:
    Ray's task errors can be OSErrors too, and are not the output's fault)."""
    try:
        yield
    except OSError as exc:
        raise OutputWriteError(f"cannot write --output {plan.config.output}: {' '.join(str(exc).split())}") from exc


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
    extra_names: dict  # input column name -> its output column name (renamed when it clashes)
    model_dir: str
    model_name: str
    tiling: TilingSpec
    uses_demo_model: bool
    manifest: Manifest
    read_roots: ReadRoots | None = None  # where manifest rows may read (raylens.sources); None: not a manifest
    model_dtype: str = "bfloat16"  # the checkpoint's torch_dtype: what --tiles-on-cpu normalises into for lmdeploy

    def shard_of(self, index: int) -> int:
        return index // self.manifest.shard_size

    def prompts_per_item(self) -> int:
        return 1 if self.config.question_column else len(self.config.prompt)


def setup(config: CaptionJobConfig, env: dict[str, str] | None = None) -> JobPlan:
    """Resolve storage, list inputs, check the model and the output. Raises UsageError on bad input.

    Nothing under --output is deleted or written before every check has passed."""
    from jobs.caption_identity import run_identity
    from raylens.checkpoints.formats import CheckpointError, ModelSpec
    from raylens.checkpoints.resolve import resolve_model

    env = dict(os.environ if env is None else env)
    s3 = S3Settings.from_env(env, endpoint=config.s3_endpoint)
    try:
        in_fs, in_root = resolve_filesystem(config.input, s3)
        out_fs, out_root = resolve_filesystem(config.output, s3)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    input_location = location_of(in_fs, in_root)
    overlap = output_overlap(input_location, location_of(out_fs, out_root))
    if overlap:
        raise UsageError(f"--output {config.output} {overlap} {config.input}: the job would read its own results "
                         "back or --overwrite could delete inputs; choose an --output outside the input")
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
    extra_names = _extra_names(items)
    try:
        model_fs = s3.filesystem() if (config.model or "").startswith("s3://") else None
        model_dir = str(resolve_model(config.model, filesystem=model_fs))
        spec = ModelSpec.from_dir(model_dir)
    except (FileNotFoundError, CheckpointError) as exc:
        raise UsageError(f"--model: {exc}") from None
    try:
        tiling = spec.tiling(config.max_tiles)
    except ValueError as exc:  # e.g. --max-tiles below the checkpoint's min tiles
        raise UsageError(f"--model {config.model or model_dir}: {exc}") from None
    check_context_length(config, spec, tiling)
    model_name = config.model or "raylens-demo"
    manifest = Manifest(num_inputs=len(items), shard_size=config.shard_size, format=config.format, model_name=model_name,
                        identity=run_identity(config, input_location=input_location, in_fs=in_fs, in_root=in_root,
                                              listing=listing, model_dir=model_dir, tiling=tiling))
    try:
        _prepare_output(config, out_fs, out_root, manifest)
    except OSError as exc:
        raise UsageError(f"cannot write --output {config.output}: {exc}") from None
    return JobPlan(
        config=config, s3=s3, in_fs=in_fs, in_root=in_root, out_fs=out_fs, out_root=out_root, items=items,
        extra_fields=_extra_fields(items, extra_names), extra_names=extra_names, model_dir=model_dir,
        model_name=model_name, tiling=tiling, uses_demo_model=config.model is None, manifest=manifest,
        read_roots=listing.roots, model_dtype=spec.torch_dtype,
    )


def check_context_length(config: CaptionJobConfig, spec, tiling: TilingSpec) -> None:
    """Refuse, before any work, an answer length that cannot fit the model's context with the largest
    image the tiling allows (otherwise every row would fail in the engine). The prompt's own tokens are
    not counted here; the engine still checks each request exactly."""
    context = spec.max_context
    if not context:
        return
    if config.max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {config.max_new_tokens} does not fit the model's context of {context} "
                         f"tokens (prompt and image included): choose far less than {context}")
    tiles = tiling.max_tiles + (1 if tiling.use_thumbnail and tiling.max_tiles > 1 else 0)
    image_tokens = spec.image_tokens(tiles)
    if config.max_new_tokens + image_tokens > context:
        room = (context - config.max_new_tokens) // spec.image_tokens_per_tile  # tiles, thumbnail included
        fits = room - 1 if tiling.use_thumbnail and room >= 2 else room  # a single tile has no thumbnail
        tiles_hint = f" or --max-tiles to at most {fits}" if fits >= max(tiling.min_tiles, 1) else ""
        raise UsageError(f"--max-new-tokens {config.max_new_tokens} plus up to {image_tokens} image tokens "
                         f"(--max-tiles {tiling.max_tiles}) exceed the model's context of {context} tokens: lower "
                         f"--max-new-tokens to at most {context - image_tokens}{tiles_hint}")


def _extra_names(items: list[InputItem]) -> dict[str, str]:
    """Each carried input column's output name: its own, or "input.<name>" where it clashes with ours
    (or with a Ray-side "__" column), prefixed again until unique ("text" beside "input.text")."""
    names = list(dict.fromkeys(name for item in items for name, _ in item.extra))
    taken = set(_RESERVED) | {n for n in names if not (n in _RESERVED or n.startswith("__"))}
    mapping = {}
    for name in names:
        if name in _RESERVED or name.startswith("__"):
            out = f"input.{name}"
            while out in taken:
                out = f"input.{out}"
            taken.add(out)
            mapping[name] = out
        else:
            mapping[name] = name
    return mapping


def _extra_fields(items: list[InputItem], extra_names: dict[str, str]):
    """One Arrow type per carried input column, inferred from every row (mixed types, and integers
    beyond 64 bits, become strings)."""
    import pyarrow as pa

    values: dict[str, list] = {name: [] for name in extra_names}
    for item in items:
        for name, value in item.extra:
            values[name].append(value)
    fields = []
    for name, column in values.items():
        try:
            kind = pa.array(column).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            kind = pa.string()
        fields.append(pa.field(extra_names[name], pa.string() if pa.types.is_null(kind) else kind))
    return fields


def _prepare_output(config: CaptionJobConfig, fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    """Start fresh (--overwrite or a new folder) or check that a rerun resumes the same work.

    --overwrite deletes only the job's own files (`is_job_file`), and only where they are the job's:
    files named like part files in a folder without our `_manifest.json` belong to someone else."""
    files = [i.base_name for i in top_level_files(fs, root)]
    try:
        previous = read_manifest(fs, root)
        unreadable = None
    except ValueError as exc:
        previous, unreadable = None, str(exc)
    ours_by_name = [n for n in files if not n.startswith(".") and is_job_file(n)]
    if previous is None and unreadable is None and ours_by_name:
        raise UsageError(f"--output {config.output} holds {ours_by_name[0]} but no _manifest.json: raylens did not "
                         "write it (or its manifest was removed); choose another --output")
    if config.overwrite:
        deleted = delete_job_files(fs, root)
        if deleted:
            logger.info("--overwrite: deleted %d files of an earlier run under %s", len(deleted), config.output)
    elif unreadable is not None:
        raise UsageError(f"--output {config.output}: {unreadable}; pass --overwrite to start over")
    elif previous is not None:
        _check_resume(config, previous, manifest)
    elif files:
        raise UsageError(f"--output {config.output} holds files raylens did not write (e.g. {sorted(files)[0]}); "
                         "choose an empty folder, or pass --overwrite to write beside them (they are kept)")
    ensure_writable_dir(fs, root)
    write_manifest(fs, root, manifest)


def _check_resume(config: CaptionJobConfig, previous: Manifest, manifest: Manifest) -> None:
    """A rerun resumes only the work that produced the output: every difference is named."""
    from jobs.caption_identity import differences

    found = []
    if previous.format != manifest.format:
        found.append(f"--format: {previous.format!r} -> {manifest.format!r}")
    if previous.shard_size != manifest.shard_size:
        found.append(f"--shard-size: {previous.shard_size} -> {manifest.shard_size}")
    if previous.num_inputs != manifest.num_inputs:
        found.append(f"number of inputs: {previous.num_inputs} -> {manifest.num_inputs}")
    found += differences(previous.identity, manifest.identity, old_model=previous.model_name,
                         new_model=manifest.model_name)
    if found:
        raise UsageError(f"--output {config.output} holds results of other inputs or settings ({'; '.join(found)}); "
                         "rerun with the same ones to resume, or pass --overwrite to start over")


def pending_rows(plan: JobPlan) -> tuple[list[dict], dict[int, int]]:
    """Listing rows of the shards not yet written whole, and how many output rows each shard must get."""
    from jobs.caption_stages import output_schema

    done, _ = finished_shards(plan.out_fs, plan.out_root, plan.manifest, plan.prompts_per_item(),
                              output_schema(plan.extra_fields).names)
    names = [f.name for f in plan.extra_fields]
    string_columns = {f.name for f in plan.extra_fields if str(f.type) == "string"}
    rows, expected = [], {}
    for index, item in enumerate(plan.items):
        shard = plan.shard_of(index)
        if shard in done:
            continue
        extra = dict.fromkeys(names)
        for name, value in item.extra:
            key = plan.extra_names[name]
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

    from jobs.caption_runtime import quiet_ray_data_deprecations
    from jobs.caption_stages import LISTING_SCHEMA, GenerateStage, prepare_batch
    from raylens.engines.base import SamplingParams
    from raylens.fetch import UrlFetcher
    from raylens.sources import SourceFilesystems

    cfg = plan.config
    lo, hi = cfg.replica_range()
    resources = ray.cluster_resources()
    has_gpus = resources.get("GPU", 0) > 0
    _check_cpus_left_for_preprocessing(cfg, resources)  # before the listing goes into the object store
    listing = pa.Table.from_pylist(rows, schema=pa.schema(list(LISTING_SCHEMA) + list(plan.extra_fields)))
    # One block per engine batch: a block is the unit Ray retries, so when an engine actor dies only the
    # batches it was working on are retried (and, past --engine-retries, recorded as errors).
    size = max(cfg.batch_size, -(-len(rows) // 20_000))
    ds = ray.data.from_arrow([listing.slice(i, size) for i in range(0, len(rows), size)])
    fetcher = UrlFetcher(allowed_domains=cfg.allowed_domain_set())
    engine = cfg.engine
    if engine == "auto":
        engine = "lmdeploy" if has_gpus and _lmdeploy_installed() else "transformers"
    with quiet_ray_data_deprecations():  # ray_remote_args_fn: no named replacement in Ray 2.60
        ds = ds.map_batches(
            prepare_batch,
            batch_size=cfg.batch_size,  # keeps blocks batch-sized all the way to the engine
            batch_format="pyarrow",
            fn_kwargs=dict(filesystems=SourceFilesystems.create(plan.s3, roots=plan.read_roots), fetcher=fetcher, tiling=plan.tiling,
                           max_pixels=cfg.max_pixels, log_level=cfg.log_level, fast_jpeg=cfg.fast_jpeg_decode,
                           background=cfg.alpha_background_rgb(), tiles_dtype=tiles_dtype_for(cfg, plan, engine)),
            num_cpus=1,
            # Spread decoding over the cluster's CPUs. Passing the args through a function also keeps Ray
            # Data from fusing this stage into the engine actors: fused, the GPU actor would decode images.
            ray_remote_args_fn=_spread,
        )
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.seed, ignore_eos=cfg.ignore_eos)
    engine_options = engine_options_for(cfg, engine, has_gpus)
    tp = engine_options.get("tp", 1)
    with quiet_ray_data_deprecations():  # max_task_retries and tp's ray_remote_args_fn: no named ones in 2.60
        ds = ds.map_batches(
            GenerateStage,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            # Several calls per actor at once: without it an actor takes one batch at a time and lmdeploy's
            # continuous batching never sees more than --batch-size requests (measured: GPU 19% busy).
            # No more queued on an actor than it runs: Ray Data's default (twice as many) let the first
            # engine that was ready take every batch of a small job while the second GPU idled (2 GPUs).
            compute=ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=cfg.batches_in_flight,
                                      max_tasks_in_flight_per_actor=cfg.batches_in_flight),
            fn_constructor_kwargs=dict(
                engine=engine,
                model=cfg.model, s3=plan.s3, model_name=plan.model_name, engine_options=engine_options,
                params=params, prompts=list(cfg.prompt), use_question_column=bool(cfg.question_column),
                extra_fields=plan.extra_fields, log_level=cfg.log_level,
            ),
            **_engine_resources(cfg.gpus_per_replica if has_gpus else 0, tp),
            # A dead engine actor is restarted (Ray Data's default) and its batch retried, but only this
            # often: a batch that kills every engine it meets must not loop forever. Its rows become errors.
            max_task_retries=cfg.engine_retries,
        )
    if tp > 1:
        _no_extra_placement_groups(ds.context)
    # A batch that still fails is dropped here and its rows are recorded as errors by the driver
    # (`record_lost_rows`), so the job finishes and no row goes missing.
    ds.context.max_errored_blocks = -1
    return ds, engine


def _check_cpus_left_for_preprocessing(cfg: CaptionJobConfig, resources: dict) -> None:
    """Each engine actor holds ENGINE_ACTOR_CPUS for its whole life; the prepare tasks need at least one more. With
    none left the job waits for ever without a word (seen: --replicas 2 on a 2-CPU machine), so on a
    fixed-size instance that is a usage error, and on a cluster (which may autoscale) a warning."""
    from jobs.caption_runtime import LOCAL, ray_address

    cpus = resources.get("CPU", 0)
    _, most = cfg.replica_range()
    if cpus >= most * ENGINE_ACTOR_CPUS + 1:
        return
    message = (f"--replicas {cfg.replicas} engine actors take {most * ENGINE_ACTOR_CPUS:g} of the {cpus:g} CPUs Ray "
               "has, leaving none to read and decode images")
    if ray_address(cfg.ray_address, os.environ) == LOCAL:
        raise UsageError(f"{message}: use --replicas {max(1, int((cpus - 1) // ENGINE_ACTOR_CPUS))} or fewer here")
    logger.warning("%s; the job waits until the cluster adds CPUs", message)


def record_lost_rows(plan: JobPlan, writer: ShardWriter, rows: list[dict]) -> None:
    """Rows of batches that failed for good (engine actor died past its retries): written as errors."""
    import pyarrow as pa

    from jobs.caption_stages import BATCH_FAILED, output_row, prompts_of, stage_output_schema

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
            output_row(r, j, prompt, model=plan.model_name, extra_names=extra_names, error=message,
                       error_kind=BATCH_FAILED, stage="engine", num_tiles=0)
            for r in rows if r["__shard"] == shard
            for j, prompt in enumerate(prompts_of(r, plan.config.prompt, bool(plan.config.question_column)))
            if (r["id"], j) not in seen
        ]
        writer.add(pa.Table.from_pylist(lost, schema=schema))


def tiles_dtype_for(cfg: CaptionJobConfig, plan: JobPlan, engine: str) -> str | None:
    """What the CPU stage normalises tiles into with --tiles-on-cpu (None: the engine makes them): float32 for the
    transformers engine, which computes its inputs in float32 first; the checkpoint's dtype otherwise (lmdeploy
    feeds the vision tower in it). An engine given tiles in another dtype than its own makes them again from the
    pixels, so a wrong guess costs time, never a different answer."""
    if not cfg.tiles_on_cpu:
        return None
    dtype = "float32" if engine == "transformers" else plan.model_dtype
    return dtype if dtype in TILE_DTYPES else "float32"


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
    in_flight = cfg.batch_size * cfg.batches_in_flight
    if engine == "lmdeploy" and isinstance(options.get("max_batch_size"), int) and options["max_batch_size"] < in_flight:
        # lmdeploy lets in one request per free handle, so the rest wait outside its scheduler and reach it one
        # at a time as others finish: session 9 measured 90.6 against 129.4 images/s (docs/benchmarks.md).
        logger.warning("--engine-args max_batch_size %d is below the %d requests each engine holds (--batch-size %d x "
                       "--batches-in-flight %d): the rest wait outside lmdeploy's scheduler and reach it one at a time",
                       options["max_batch_size"], in_flight, cfg.batch_size, cfg.batches_in_flight)
    return options


ENGINE_ACTOR_CPUS = 1  # what an engine actor holds while it lives (the engine loop; the GPU does the rest)


def _engine_resources(gpus: float, tp: int) -> dict:
    """Ray resources of one engine actor.

    With tensor parallelism lmdeploy starts its own GPU workers with Ray and places them in the placement
    group of the actor that builds the engine (notes/lmdeploy.md 4.2). So the actor itself holds no GPU
    and runs inside a fresh group of `tp` GPU bundles that captures its child tasks; an actor holding the
    GPUs itself would make lmdeploy wait for `tp` more.
    """
    if tp <= 1:
        return {"num_gpus": gpus, "num_cpus": ENGINE_ACTOR_CPUS}
    return {"num_gpus": 0, "num_cpus": ENGINE_ACTOR_CPUS, "ray_remote_args_fn": lambda: _tp_placement(tp)}


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


def summarize(plan: JobPlan, this_run: dict, previous: dict | None = None) -> dict:
    """The job's summary: counts from what was written (the output is the truth, not the driver's
    memory), and the runs' figures. `runs` keeps one record per run (this one added to `previous`'s);
    `wall_s`, `processed_images`, `images_per_s` and `engine` cover the runs that processed images, so a
    rerun with nothing to do keeps the figures of the runs that did the work."""
    rows = failed = 0
    by_kind: dict[str, int] = {}
    unreadable = []
    for name, table in iter_part_columns(plan.out_fs, plan.out_root, plan.manifest, ["error", "error_kind"]):
        if table is None:
            unreadable.append(name)
            continue
        rows += table.num_rows
        for error, kind in zip(table.column("error").to_pylist(), table.column("error_kind").to_pylist()):
            if error is not None:
                failed += 1
                key = kind or error.split(":", 1)[0]
                by_kind[key] = by_kind.get(key, 0) + 1
    runs = [r for r in (previous or {}).get("runs", []) if isinstance(r, dict)] + [this_run]
    runs = runs[-MAX_RUN_RECORDS:]
    worked = [r for r in runs if r.get("processed_images")]
    wall_s = sum(r.get("wall_s") or 0 for r in worked)
    processed = sum(r["processed_images"] for r in worked)
    return {
        "rows": rows,
        "inputs": len(plan.items),
        "prompts": len(plan.config.prompt),
        "succeeded": rows - failed,
        "failed": failed,
        "errors_by_kind": dict(sorted(by_kind.items())),
        "unreadable_parts": unreadable,
        "wall_s": round(wall_s, 3),
        "processed_images": processed,
        "images_per_s": round(processed / wall_s, 3) if wall_s > 0 else None,
        "model": plan.model_name,
        "engine": worked[-1].get("engine") if worked else this_run.get("engine"),
        "runs": runs,
        "config": plan.config.to_dict(),
    }


def read_summary(plan: JobPlan) -> dict | None:
    """The previous run's `_summary.json`, or None when there is none or it cannot be read."""
    path = posixpath.join(plan.out_root, SUMMARY_FILE)
    try:
        with plan.out_fs.open_input_stream(path) as f:
            summary = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("%s cannot be read (%s); its run records are lost", SUMMARY_FILE, exc)
        return None
    return summary if isinstance(summary, dict) else None


def main(plan: JobPlan) -> dict:
    """Run the pipeline for a resolved plan; returns the summary (also written to _summary.json).

    Starts or joins Ray as `jobs.caption_runtime.connect` says, unless Ray is already initialised or
    there is nothing to do."""
    from jobs.caption_runtime import connect, engine_start_failures_reported_once
    from jobs.caption_stages import output_schema

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    start = time.perf_counter()
    previous = read_summary(plan)
    rows, expected = pending_rows(plan)
    engine, written = None, 0
    if rows:
        connect(plan.config.ray_address, log_level=plan.config.log_level)
        print(f"{len(expected)} of {plan.manifest.num_shards} shards to do ({len(rows)} images)", flush=True)
        ds, engine = build_dataset(plan, rows)
        writer = ShardWriter(plan.out_fs, plan.out_root, plan.config.format, expected, output_schema(plan.extra_fields))
        with engine_start_failures_reported_once(plan.config.log_level in ("WARNING", "ERROR")):
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                with _writing_output(plan):
                    writer.add(batch)
        with _writing_output(plan):
            record_lost_rows(plan, writer, rows)
        written = len(writer.written)
    else:
        print("every shard is already written; nothing to do", flush=True)
    wall_s = time.perf_counter() - start
    this_run = {"started": started, "wall_s": round(wall_s, 3), "processed_images": len(rows),
                "images_per_s": round(len(rows) / wall_s, 3) if rows and wall_s > 0 else None,
                "engine": engine, "shards_written": written}
    with _writing_output(plan):
        summary = summarize(plan, this_run, previous)
        write_atomically(plan.out_fs, posixpath.join(plan.out_root, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    return summary


def run(argv: list[str] | None = None) -> int:
    """The CLI: exit 0 done; 1 nothing processed, too many errors, no engine, the output refused a write or
    Ray failed; 2 bad flags, --input, --output, --model or an unreachable --ray-address. Every failure is
    one line on stderr."""
    from jobs.caption_runtime import (
        RayUnavailable,
        check_reachable,
        configure_logging,
        engine_start_failure,
        failure_message,
        ray_address,
    )

    config = CaptionJobConfig.from_args(argv, description=__doc__)
    configure_logging(config.log_level)
    try:
        check_reachable(ray_address(config.ray_address, os.environ))  # before a long listing, not after
        plan = setup(config)
    except (UsageError, FileNotFoundError, RayUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if plan.uses_demo_model:
        print(DEMO_NOTICE, flush=True)
    print(f"captioning {len(plan.items)} images from {config.input} -> {config.output}", flush=True)
    try:
        summary = main(plan)
    except (RayUnavailable, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OutputWriteError as exc:
        print(f"error: {exc} (the finished shards are kept: rerun the same command to resume)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001
        cause = engine_start_failure(exc)
        if cause is not None:
            print(f"error: the engine could not start: {cause}\n(check --model, --engine and --engine-args; "
                  "finished shards are kept and a rerun resumes)", file=sys.stderr)
            return 1
        if not _is_ray_failure(exc):
            raise
        logger.debug("Ray failed during the run", exc_info=exc)
        print(f"error: {failure_message(ray_address(config.ray_address, os.environ), exc)}", file=sys.stderr)
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


def _is_ray_failure(exc: BaseException) -> bool:
    """A failure of Ray itself (a cluster or node that died, lost objects), not of raylens' code."""
    from ray.exceptions import RayError, RayTaskError

    return (isinstance(exc, RayError) and not isinstance(exc, RayTaskError)) or isinstance(exc, ConnectionError)


if __name__ == "__main__":
    sys.exit(run())
