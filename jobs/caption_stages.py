"""The stages of the caption job, each one `map_batches` call over Arrow batches, and their columns.

Column flow for one image `cats/a.jpg` under `--input /data` (a manifest adds its other columns, here
`label`, which every stage carries along untouched):

    listing         id: "cats/a.jpg", image: "/data/cats/a.jpg", __source: "/data/cats/a.jpg", __shard: 0,
                    __question: null, __listing_error: null, label: "cat"
    prepare (CPU)   + __pixels (raw uint8 RGB of the downscaled image), __height, __width, __grid_cols,
                      __grid_rows, __orig_width, __orig_height, __thumbnail (raw uint8 RGB tile made from the
                      original, or empty), __tile_size, __min_tiles, __max_tiles, __use_thumbnail (the tiling
                      the image was prepared with: the engine cuts it with that, --max-tiles travels only here),
                      __pixel_values, __pixel_dtype (with --tiles-on-cpu: the tiles cut and normalised in the
                      model's dtype, which the engine forwards as they are; else empty and null),
                      num_tiles, error (null, or "ImageError(kind): ..." / "SourceError(kind): ..."),
                      error_kind ("image.<kind>" / "source.<kind>"), stage
    generate (GPU)  -> one row per (image, prompt): id, prompt_index, image, prompt, text, error, error_kind, stage,
                       model, num_tiles, num_input_tokens, num_output_tokens, finish_reason, label, __shard
                       (pixels dropped; the image is decoded and tiled once for all its prompts)

Columns named "__<name>" only travel between stages (the writer drops `__shard`), so an input column
called `width` or `source` cannot collide with them.

With `--question-column` each row asks its own question instead of the `--prompt` list. A row whose
`error` is set by an earlier stage passes through later stages untouched, so every input leaves exactly
one output row per prompt. Only the engine stage holds heavy state (the model).

`error_kind` is the failure's category from a fixed vocabulary, "<domain>.<kind>", so that users can
group and filter failures without parsing messages (`errors_by_kind` in the summary counts it):

    image.<kind>          the bytes are not a usable image: empty, too_large, not_an_image, truncated, decode
    source.<kind>         the bytes could not be read: a `SourceError` kind (missing, bad_source, read,
                          too_large, blocked, bad_url, http_status, timeout, network, ...)
    input.missing_question  a --question-column row without a question
    engine.request        the engine failed this request (e.g. a prompt longer than the model's context)
    engine.failed         the engine raised on the whole batch
    engine.batch_failed   the batch failed past --engine-retries (its engine actor died each time)
    internal.<stage>      an unexpected exception while reading or decoding: a raylens bug, please report
"""
from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
import pyarrow as pa

from jobs.caption_runtime import configure_logging
from raylens.engines.base import EngineDeadError, SamplingParams, VLRequest, format_error
from raylens.errors import KindError
from raylens.fetch import UrlFetcher
from raylens.images import RGB, TILE_DTYPES, PreparedImage, TilingSpec, decode_prepared, with_pixel_values
from raylens.sources import SourceError, SourceFilesystems, read_source

logger = logging.getLogger(__name__)

# Explicit schemas: a block whose rows all succeeded must still write `error` as a string column, or
# the files of one output would disagree on types.
LISTING_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("__source", pa.string()), ("__shard", pa.int64()), ("__question", pa.string()),
    ("__listing_error", pa.string()),  # a manifest row known bad while listing (raylens.sources.InputItem.error)
])
PREPARED_FIELDS = [
    ("__pixels", pa.binary()), ("__height", pa.int32()), ("__width", pa.int32()), ("__grid_cols", pa.int32()),
    ("__grid_rows", pa.int32()), ("__orig_width", pa.int32()), ("__orig_height", pa.int32()),
    ("__thumbnail", pa.binary()), ("__tile_size", pa.int32()), ("__min_tiles", pa.int32()), ("__max_tiles", pa.int32()),
    ("__use_thumbnail", pa.bool_()), ("__pixel_values", pa.large_binary()), ("__pixel_dtype", pa.string()),
    ("num_tiles", pa.int32()), ("error", pa.string()), ("error_kind", pa.string()), ("stage", pa.string()),
]
# Columns whose bytes the engine stage reads in place (Arrow buffers), not through Python copies.
_BYTES_COLUMNS = ("__pixels", "__thumbnail", "__pixel_values")
# What an image-less (failed) row carries in those columns.
_EMPTY_PREPARED = {"__pixels": b"", "__height": 0, "__width": 0, "__grid_cols": 0, "__grid_rows": 0, "__orig_width": 0,
                   "__orig_height": 0, "__thumbnail": b"", "__tile_size": 0, "__min_tiles": 0, "__max_tiles": 0,
                   "__use_thumbnail": False, "__pixel_values": b"", "__pixel_dtype": None, "num_tiles": 0}
# Exit status of an engine actor whose engine died: Ray sees an unexpected exit and restarts the actor.
ENGINE_DEAD_EXIT = 70
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_index", pa.int32()), ("image", pa.string()), ("prompt", pa.string()),
    ("text", pa.string()), ("error", pa.string()), ("error_kind", pa.string()), ("stage", pa.string()), ("model", pa.string()),
    ("num_tiles", pa.int32()), ("num_input_tokens", pa.int32()), ("num_output_tokens", pa.int32()),
    ("finish_reason", pa.string()),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)

MISSING_QUESTION = "input.missing_question"
ENGINE_REQUEST = "engine.request"
ENGINE_FAILED = "engine.failed"
BATCH_FAILED = "engine.batch_failed"
# KindError subclasses -> their domain in `error_kind`
_DOMAINS = {"ImageError": "image", "SourceError": "source", "FetchError": "source"}


def output_schema(extra_fields: list[pa.Field]) -> pa.Schema:
    """What the job writes: our columns, then the input's own columns carried through."""
    return pa.schema(list(OUTPUT_SCHEMA) + list(extra_fields))


def stage_output_schema(extra_fields: list[pa.Field]) -> pa.Schema:
    """`output_schema` plus `__shard`, which the writer uses and drops."""
    return output_schema(extra_fields).append(pa.field("__shard", pa.int64()))


def prompts_of(row: dict, prompts: list[str], use_question_column: bool) -> list[str | None]:
    """The prompts one listing row asks: its own question, or every --prompt."""
    return [row["__question"]] if use_question_column else prompts


def output_row(row: dict, prompt_index: int, prompt: str | None, *, model: str, extra_names: list[str],
               error: str | None, error_kind: str | None, stage: str | None, num_tiles: int) -> dict:
    """One output row for (listing row, prompt) before the engine fills text and token counts."""
    return {
        "id": row["id"], "prompt_index": prompt_index, "image": row["image"], "prompt": prompt, "text": None,
        "error": error, "error_kind": error_kind, "stage": stage, "model": model, "num_tiles": num_tiles, "num_input_tokens": 0,
        "num_output_tokens": 0, "finish_reason": None, "__shard": row["__shard"],
        **{name: row[name] for name in extra_names},
    }


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, KindError):
        return f"{type(exc).__name__}({exc.kind}): {exc}"
    return format_error(exc)


def error_kind_of(exc: BaseException, stage: str) -> str:
    """The `error_kind` of an exception raised while reading or decoding one row (module docstring)."""
    if isinstance(exc, KindError):
        name = type(exc).__name__
        domain = _DOMAINS.get(name) or name.removesuffix("Error").lower() or "input"
        return f"{domain}.{exc.kind}"
    return f"internal.{stage}"


def prepare_batch(batch: pa.Table, *, filesystems: SourceFilesystems, fetcher: UrlFetcher, tiling: TilingSpec,
                  max_pixels: int, log_level: str = "WARNING", fast_jpeg: bool = False,
                  background: RGB | None = None, tiles_dtype: str | None = None) -> pa.Table:
    """Read, decode, validate and downscale each image (CPU task). Failures become that row's error.
    `fast_jpeg` and `background` are `raylens.images.decode_prepared`'s options (--fast-jpeg-decode,
    --alpha-background). `tiles_dtype` (--tiles-on-cpu): also cut and normalise the tiles, in that dtype."""
    configure_logging(log_level)
    out: dict[str, list] = {name: [] for name, _ in PREPARED_FIELDS}
    listing_errors = batch.column("__listing_error").to_pylist()
    for source, listing_error in zip(batch.column("__source").to_pylist(), listing_errors):
        stage = "read"
        try:
            if listing_error is not None:
                raise SourceError("bad_row", listing_error)
            data = read_source(source, filesystems=filesystems, fetcher=fetcher)
            stage = "decode"
            prepared = decode_prepared(data, tiling, max_pixels=max_pixels, fast_jpeg=fast_jpeg, background=background)
            if tiles_dtype is not None:
                prepared = with_pixel_values(prepared, tiles_dtype, tiling)
        except Exception as exc:  # noqa: BLE001 - every failure is data about this row
            for k, v in _EMPTY_PREPARED.items():
                out[k].append(v)
            out["error"].append(_error_text(exc))
            out["error_kind"].append(error_kind_of(exc, stage))
            out["stage"].append(stage)
            continue
        pixels = np.ascontiguousarray(prepared.pixels, dtype=np.uint8)
        out["__pixels"].append(pixels.tobytes())
        out["__height"].append(pixels.shape[0])
        out["__width"].append(pixels.shape[1])
        out["__grid_cols"].append(prepared.grid[0])
        out["__grid_rows"].append(prepared.grid[1])
        out["__orig_width"].append(prepared.original_size[0])
        out["__orig_height"].append(prepared.original_size[1])
        thumbnail = prepared.thumbnail
        out["__thumbnail"].append(b"" if thumbnail is None else np.ascontiguousarray(thumbnail).tobytes())
        out["__tile_size"].append(tiling.tile_size)
        out["__min_tiles"].append(tiling.min_tiles)
        out["__max_tiles"].append(tiling.max_tiles)
        out["__use_thumbnail"].append(tiling.use_thumbnail)
        out["__pixel_values"].append(b"" if prepared.pixel_values is None else prepared.pixel_values.tobytes())
        out["__pixel_dtype"].append(prepared.pixel_dtype)
        out["num_tiles"].append(prepared.num_tiles)
        out["error"].append(None)
        out["error_kind"].append(None)
        out["stage"].append(None)
    for name, kind in PREPARED_FIELDS:
        batch = batch.append_column(pa.field(name, kind), pa.array(out[name], type=kind))
    return batch


def _prepared_from_row(row: dict) -> PreparedImage:
    h, w = int(row["__height"]), int(row["__width"])
    pixels = np.frombuffer(row["__pixels"], dtype=np.uint8).reshape(h, w, 3)
    tiling = TilingSpec(tile_size=int(row["__tile_size"]), min_tiles=int(row["__min_tiles"]),
                        max_tiles=int(row["__max_tiles"]), use_thumbnail=bool(row["__use_thumbnail"]))
    thumbnail = None
    if len(row["__thumbnail"]):
        thumbnail = np.frombuffer(row["__thumbnail"], dtype=np.uint8).reshape(tiling.tile_size, tiling.tile_size, 3)
    values, dtype = None, row.get("__pixel_dtype")
    if dtype is not None:
        t = tiling.tile_size
        values = np.frombuffer(row["__pixel_values"], dtype=TILE_DTYPES[dtype]).reshape(int(row["num_tiles"]), 3, t, t)
    return PreparedImage(pixels=pixels, grid=(int(row["__grid_cols"]), int(row["__grid_rows"])),
                         num_tiles=int(row["num_tiles"]), original_size=(int(row["__orig_width"]), int(row["__orig_height"])),
                         tiling=tiling, thumbnail=thumbnail, pixel_values=values, pixel_dtype=dtype)


def _rows_of(batch: pa.Table) -> list[dict]:
    """The batch's rows as dicts, the image bytes as Arrow buffers in place: `to_pylist` would copy every image
    (and every tile, with --tiles-on-cpu) into Python bytes, on the engine actor's event loop."""
    names = [n for n in _BYTES_COLUMNS if n in batch.column_names]
    rows = batch.drop_columns(names).to_pylist()
    for name in names:
        for row, value in zip(rows, _binary_views(batch.column(name))):
            row[name] = value
    return rows


def _binary_views(column: pa.ChunkedArray) -> list[pa.Buffer]:
    """Each value of a binary column as a zero-copy slice of the column's data buffer (a scalar's `as_buffer()`
    copies); a null is an empty buffer."""
    views = []
    for chunk in column.chunks:
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):  # e.g. binary_view
            views += [pa.py_buffer(v or b"") for v in chunk.to_pylist()]
            continue
        _, offsets_buffer, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            start, end = int(offsets[i]), int(offsets[i + 1])
            views.append(data.slice(start, end - start) if valid[i] and data is not None else pa.py_buffer(b""))
    return views


class GenerateStage:
    """Holds one engine per actor and asks every prompt of every prepared row of a batch.

    `__call__` is a coroutine, so Ray Data keeps several batches in flight per actor and an async engine
    (lmdeploy) sees all of them at once. An engine that raises fails the batch's rows with the error
    (stage "engine") instead of killing the job. An engine that can no longer work (`EngineDeadError`)
    ends the actor's process, as a crashed engine does: Ray restarts the actor and retries its batches
    (up to --engine-retries), instead of every later batch becoming error rows.
    """

    def __init__(self, *, engine: str, model: str | None, s3, model_name: str, engine_options: dict, params: SamplingParams,
                 prompts: list[str], use_question_column: bool, extra_fields: list[pa.Field],
                 log_level: str = "WARNING") -> None:
        from raylens.checkpoints.resolve import resolve_model

        configure_logging(log_level)  # the engine's own lines (KV cache, placement) at --log-level INFO
        from raylens.engines import create_engine

        # Resolved here, on the actor's node: an s3:// or hub model is fetched where the engine runs.
        model_fs = s3.filesystem() if (model or "").startswith("s3://") else None
        model_dir = str(resolve_model(model, filesystem=model_fs))
        self.engine = create_engine(engine, model_dir, model_name=model_name, **engine_options)
        self.model_name = model_name
        self.params = params
        self.prompts = list(prompts)
        self.use_question_column = use_question_column
        self.extra_names = [f.name for f in extra_fields]
        self.schema = stage_output_schema(extra_fields)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict] = []
        requests: list[VLRequest] = []
        slots: list[int] = []
        for row in _rows_of(batch):
            prepared = _prepared_from_row(row) if row["error"] is None else None
            for j, prompt in enumerate(prompts_of(row, self.prompts, self.use_question_column)):
                out = output_row(row, j, prompt, model=self.model_name, extra_names=self.extra_names, error=row["error"],
                                 error_kind=row["error_kind"], stage=row["stage"], num_tiles=row["num_tiles"])
                if out["error"] is None and not prompt:
                    out.update(error="MissingQuestion: this row has no question in the --question-column column",
                               error_kind=MISSING_QUESTION, stage="read")
                if out["error"] is None:
                    slots.append(len(rows))
                    requests.append(VLRequest(f"{row['id']}#{j}", prompt, prepared))
                rows.append(out)
        try:
            results = await self.engine.generate(requests, self.params) if requests else []
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except EngineDeadError:
            logger.exception("the engine died; ending this actor so Ray restarts it and retries its batches")
            engine_died()
            raise
        except Exception as exc:  # noqa: BLE001
            logger.exception("engine failed on a batch of %d requests", len(requests))
            for slot in slots:
                rows[slot].update(error=format_error(exc), error_kind=ENGINE_FAILED, stage="engine")
            results = []
        for slot, res in zip(slots, results):
            rows[slot].update(text=res.text, finish_reason=res.finish_reason,
                              num_input_tokens=res.num_input_tokens, num_output_tokens=res.num_output_tokens)
            if res.error:
                rows[slot].update(error=res.error, error_kind=ENGINE_REQUEST, stage="engine")
        return pa.Table.from_pylist(rows, schema=self.schema)


def engine_died() -> None:
    """End this actor's process. Raising would only fail the batch: Ray restarts an actor whose process
    exits unexpectedly, not one whose method raised (and `ray.actor.exit_actor()` is an intended exit,
    which it does not restart)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(ENGINE_DEAD_EXIT)
