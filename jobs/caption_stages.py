"""The stages of the caption job, each one `map_batches` call, and the columns they exchange.

Column flow for one image `cats/a.jpg` under `--input /data`:

    listing         {id: "cats/a.jpg", image: "/data/cats/a.jpg"}
    prepare (CPU)   + pixels: raw uint8 bytes of the (downscaled) RGB image, height, width,
                      grid_cols, grid_rows, num_tiles, error (None, or "ImageError(kind): ..."), stage
    generate (GPU)  -> id, image, prompt, text, error, stage, model, num_tiles,
                       num_input_tokens, num_output_tokens, finish_reason   (pixels dropped)

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
    ("id", pa.string()), ("image", pa.string()), ("pixels", pa.binary()), ("height", pa.int32()),
    ("width", pa.int32()), ("grid_cols", pa.int32()), ("grid_rows", pa.int32()), ("num_tiles", pa.int32()),
    ("error", pa.string()), ("stage", pa.string()),
])
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("prompt", pa.string()), ("text", pa.string()),
    ("error", pa.string()), ("stage", pa.string()), ("model", pa.string()), ("num_tiles", pa.int32()),
    ("num_input_tokens", pa.int32()), ("num_output_tokens", pa.int32()), ("finish_reason", pa.string()),
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)


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
    columns = {"id": [str(x) for x in batch["id"]], "image": [str(x) for x in batch["image"]], **out}
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
    """Holds one engine per actor and answers the prompt for every prepared row of a batch.

    `__call__` is a coroutine, so Ray Data keeps several batches in flight per actor and an async engine
    (lmdeploy) sees all of them at once. An engine that raises fails the batch's rows with the error
    (stage "engine") instead of killing the job.
    """

    def __init__(self, *, engine: str, model_dir: str, model_name: str, engine_options: dict,
                 params: SamplingParams, prompt: str, max_tiles: int | None) -> None:
        from raylens.engines import create_engine

        self.engine = create_engine(engine, model_dir, model_name=model_name, **engine_options)
        self.model_name = model_name
        self.params = params
        self.prompt = prompt
        self.max_tiles = max_tiles

    async def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        cols: dict[str, list] = {k: [None] * n for k in ("text", "finish_reason")}
        cols["error"] = list(batch["error"])
        cols["stage"] = list(batch["stage"])
        cols["num_input_tokens"] = [0] * n
        cols["num_output_tokens"] = [0] * n
        todo = [i for i in range(n) if batch["error"][i] is None]
        requests = [
            VLRequest(request_id=str(batch["id"][i]), question=self.prompt, image=_prepared_from_row(batch, i), max_tiles=self.max_tiles)
            for i in todo
        ]
        try:
            results = await self.engine.generate(requests, self.params) if requests else []
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001
            logger.exception("engine failed on a batch of %d rows", len(requests))
            results = None
            for i in todo:
                cols["error"][i] = format_error(exc)
                cols["stage"][i] = "engine"
        for i, res in zip(todo, results or []):
            cols["text"][i] = res.text
            cols["finish_reason"][i] = res.finish_reason
            cols["num_input_tokens"][i] = res.num_input_tokens
            cols["num_output_tokens"][i] = res.num_output_tokens
            if res.error:
                cols["error"][i] = res.error
                cols["stage"][i] = "engine"
        return pa.table(
            {
                "id": [str(x) for x in batch["id"]],
                "image": [str(x) for x in batch["image"]],
                "prompt": [self.prompt] * n,
                "text": cols["text"],
                "error": cols["error"],
                "stage": cols["stage"],
                "model": [self.model_name] * n,
                "num_tiles": [int(x) for x in batch["num_tiles"]],
                "num_input_tokens": cols["num_input_tokens"],
                "num_output_tokens": cols["num_output_tokens"],
                "finish_reason": cols["finish_reason"],
            },
            schema=OUTPUT_SCHEMA,
        )
