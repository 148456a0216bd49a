"""The stages of the caption job, each one `map_batches` call, and the columns they exchange.

Column flow for one image `cats/a.jpg` under `--input /data`:

    listing         {id: "cats/a.jpg", image: "/data/cats/a.jpg", path: "/data/cats/a.jpg", shard: 0}
    prepare (CPU)   + pixels: raw uint8 bytes of the (downscaled) RGB image, height, width,
                      grid_cols, grid_rows, num_tiles, error (None, or "ImageError(kind): ..."), stage
    generate (GPU)  -> one row per (image, prompt): id, prompt_index, image, prompt, text, error, stage,
                       model, num_tiles, num_input_tokens, num_output_tokens, finish_reason, shard
                       (pixels dropped; the image is decoded and tiled once for all prompts)

A row whose `error` is set by an earlier stage passes through later stages untouched, so every input
file leaves exactly one output row. Only the engine stage holds heavy state (the model).
"""
from __future__ import annotations

import asyncio
import logging
import numpy as np
import pyarrow as pa

from raylens.engines.base import SamplingParams, VLRequest, format_error
from raylens.images import ImageError, PreparedImage, TilingSpec, decode_image, prepare_image
from raylens.storage import read_bytes

logger = logging.getLogger(__name__)

# Explicit schemas: a block whose rows all succeeded must still write `error` as a string column, or
# Parquet files of one output would disagree on types.
PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("shard", pa.int64()), ("pixels", pa.binary()), ("height", pa.int32()),
    ("width", pa.int32()), ("grid_cols", pa.int32()), ("grid_rows", pa.int32()), ("num_tiles", pa.int32()),
    ("error", pa.string()), ("stage", pa.string()),
])
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_index", pa.int32()), ("image", pa.string()), ("prompt", pa.string()), ("text", pa.string()),
    ("error", pa.string()), ("stage", pa.string()), ("model", pa.string()), ("num_tiles", pa.int32()),
    ("num_input_tokens", pa.int32()), ("num_output_tokens", pa.int32()), ("finish_reason", pa.string()),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
STAGE_OUTPUT_SCHEMA = OUTPUT_SCHEMA.append(pa.field("shard", pa.int64()))


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ImageError):
        return f"ImageError({exc.kind}): {exc}"
    return format_error(exc)


def prepare_batch(batch: dict[str, np.ndarray], *, filesystem, tiling: TilingSpec, max_pixels: int) -> pa.Table:
    """Read, decode, validate and downscale each image (CPU task). Failures become that row's error."""
    n = len(batch["id"])
    out: dict[str, list] = {k: [] for k in ("pixels", "height", "width", "grid_cols", "grid_rows", "num_tiles", "error", "stage")}
    for i in range(n):
        path = str(batch["path"][i])
        stage = "read"
        try:
            data = read_bytes(filesystem, path)
            stage = "decode"
            prepared = prepare_image(decode_image(data, max_pixels=max_pixels), tiling)
        except Exception as exc:  # noqa: BLE001 - every failure is data about this row
            for k, v in (("pixels", b""), ("height", 0), ("width", 0), ("grid_cols", 0), ("grid_rows", 0), ("num_tiles", 0)):
                out[k].append(v)
            out["error"].append(_error_text(exc))
            out["stage"].append(stage)
            continue
        pixels = np.ascontiguousarray(prepared.pixels, dtype=np.uint8)
        out["pixels"].append(pixels.tobytes())
        out["height"].append(pixels.shape[0])
        out["width"].append(pixels.shape[1])
        out["grid_cols"].append(prepared.grid[0])
        out["grid_rows"].append(prepared.grid[1])
        out["num_tiles"].append(prepared.num_tiles)
        out["error"].append(None)
        out["stage"].append(None)
    columns = {"id": [str(x) for x in batch["id"]], "image": [str(x) for x in batch["image"]],
               "shard": [int(x) for x in batch["shard"]], **out}
    return pa.table(columns, schema=PREPARED_SCHEMA)


def _prepared_from_row(batch: dict[str, np.ndarray], i: int) -> PreparedImage:
    h, w = int(batch["height"][i]), int(batch["width"][i])
    pixels = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(h, w, 3)
    return PreparedImage(
        pixels=pixels,
        grid=(int(batch["grid_cols"][i]), int(batch["grid_rows"][i])),
        num_tiles=int(batch["num_tiles"][i]),
        original_size=(w, h),
    )


class GenerateStage:
    """Holds one engine per actor and asks every prompt of every prepared row of a batch.

    `__call__` is a coroutine, so Ray Data keeps several batches in flight per actor and an async engine
    (lmdeploy) sees all of them at once. An engine that raises fails the batch's rows with the error
    (stage "engine") instead of killing the job.
    """

    def __init__(self, *, engine: str, model_dir: str, model_name: str, engine_options: dict,
                 params: SamplingParams, prompts: list[str], max_tiles: int | None) -> None:
        from raylens.engines import create_engine

        self.engine = create_engine(engine, model_dir, model_name=model_name, **engine_options)
        self.model_name = model_name
        self.params = params
        self.prompts = list(prompts)
        self.max_tiles = max_tiles

    async def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n, k = len(batch["id"]), len(self.prompts)
        rows: list[dict] = []
        for i in range(n):
            for j, prompt in enumerate(self.prompts):
                rows.append({
                    "id": str(batch["id"][i]), "prompt_index": j, "image": str(batch["image"][i]), "prompt": prompt,
                    "text": None, "error": batch["error"][i], "stage": batch["stage"][i], "model": self.model_name,
                    "num_tiles": int(batch["num_tiles"][i]), "num_input_tokens": 0, "num_output_tokens": 0,
                    "finish_reason": None, "shard": int(batch["shard"][i]),
                })
        todo = [i * k + j for i in range(n) if batch["error"][i] is None for j in range(k)]
        prepared = {i: _prepared_from_row(batch, i) for i in range(n) if batch["error"][i] is None}
        requests = [
            VLRequest(request_id=f"{rows[r]['id']}#{rows[r]['prompt_index']}", question=rows[r]["prompt"],
                      image=prepared[r // k], max_tiles=self.max_tiles)
            for r in todo
        ]
        try:
            results = await self.engine.generate(requests, self.params) if requests else []
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001
            logger.exception("engine failed on a batch of %d requests", len(requests))
            for r in todo:
                rows[r].update(error=format_error(exc), stage="engine")
            results = []
        for r, res in zip(todo, results):
            rows[r].update(text=res.text, finish_reason=res.finish_reason,
                           num_input_tokens=res.num_input_tokens, num_output_tokens=res.num_output_tokens)
            if res.error:
                rows[r].update(error=res.error, stage="engine")
        return pa.Table.from_pylist(rows, schema=STAGE_OUTPUT_SCHEMA)
