"""`VLModel`: the Serve deployment that holds one engine per replica and streams answers from it.

Why a deployment of its own (not the ingress): its `max_ongoing_requests` / `max_queued_requests` /
autoscaling are sized for the engine, so the ingress's cheap work (auth, validation, 4xx answers, image
downloads and decoding) never takes a model slot, and a full model gives a 503 at the ingress at once.

One path for every request: `chat` is an async generator of `VLDelta`s (the ingress joins them for a
non-streamed answer). Streamed text is coalesced to at most one item per `stream_interval_ms` after
the first, which keeps Ray's per-item cost off the token rate under load (Serve LLM does the same).
A request the engine refuses (`RequestError`: prompt too long for the context, ...) becomes one
`RequestFailure` item instead of an exception: the ingress answers 400 before sending a 200, and the
replica logs no traceback for a client's mistake. An `EngineDeadError` marks the replica unhealthy, so
Serve replaces it.

Engines batch concurrent requests themselves, streamed or not, so every request goes through the engine's
`stream`: lmdeploy with its continuous batching on the replica's event loop; the transformers engine by
gathering concurrent streams of equal settings into shared batched `generate` calls (at most
`max_batch_size` rows, waiting up to `batch_wait_timeout_s` for a batch to fill; see
`raylens.engines.stream_batching` for why there and not `@serve.batch` here). A non-streamed answer is the
same stream, coalesced into the first text and the rest.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator

from raylens.engines.base import EngineDeadError, RequestError, SamplingParams, VLDelta, VLRequest
from serve.config import ServeConfig

logger = logging.getLogger("raylens.serve")


@dataclass(frozen=True)
class RequestFailure:
    """The engine refused this request (the client's fault): answered 400 with `param`."""

    message: str
    param: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs from the model before its first request."""

    model_name: str
    spec: object  # raylens.checkpoints.formats.ModelSpec
    created: int
    engine: str


class VLModel:
    """One engine per replica (`serve.app.build_app` applies the deployment options from ServeConfig)."""

    def __init__(self, config: ServeConfig) -> None:
        from raylens.checkpoints.resolve import resolve_model
        from raylens.engines import create_engine

        self.config = config
        model_fs = None
        if (config.model or "").startswith("s3://"):
            import os

            from raylens.storage import S3Settings

            model_fs = S3Settings.from_env(os.environ, endpoint=config.s3_endpoint).filesystem()
        model_dir = str(resolve_model(config.model, filesystem=model_fs))
        started = time.monotonic()
        self.engine = create_engine(config.engine, model_dir, model_name=config.served_model_name, **config.engine_options())
        logger.info("engine %s ready in %.1fs", config.engine, time.monotonic() - started)
        self.info = ModelInfo(config.served_model_name, self.engine.spec, int(time.time()), config.engine)
        self._dead: BaseException | None = None
        self._interval_s = config.stream_interval_ms / 1000.0

    def describe(self) -> ModelInfo:
        return self.info

    def check_health(self) -> None:
        """Serve calls this periodically; raising replaces the replica (a dead engine never comes back)."""
        if self._dead is not None:
            raise RuntimeError(f"engine is dead: {self._dead}")

    async def chat(self, request: VLRequest, params: SamplingParams, stream: bool = True
                   ) -> AsyncIterator[VLDelta | RequestFailure]:
        """The answer to one request as deltas, or one RequestFailure (see the module docstring)."""
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}")
        interval_s = self._interval_s if stream else math.inf  # not streamed: the text in one piece
        async for item in coalesce(self._stream(request, params), interval_s):
            yield item

    async def _stream(self, request: VLRequest, params: SamplingParams) -> AsyncIterator[VLDelta | RequestFailure]:
        try:
            async for delta in self.engine.stream(request, params):
                yield delta
        except RequestError as exc:
            yield RequestFailure(str(exc), exc.param)
        except EngineDeadError as exc:
            self._dead = exc
            raise

    def engine_stats(self) -> dict:
        """How the engine batched (its `generate_calls`, where it counts them), for operators and tests."""
        return {"generate_calls": getattr(self.engine, "generate_calls", None)}


async def coalesce(source: AsyncIterator, interval_s: float) -> AsyncIterator:
    """Deltas at once until the first text has gone out, then merged so that at most one goes out per
    `interval_s`; anything that is not a plain text delta (a failure, the last delta) goes out at once."""
    pending: VLDelta | None = None
    last_sent = 0.0
    text_sent = False
    async for item in source:
        if not isinstance(item, VLDelta):
            if pending is not None:
                yield pending
                pending = None
            yield item
            continue
        pending = item if pending is None else _merge(pending, item)
        now = time.monotonic()
        if not text_sent or pending.finish_reason is not None or now - last_sent >= interval_s:
            text_sent = text_sent or bool(pending.text)
            yield pending
            pending, last_sent = None, now
    if pending is not None:
        yield pending


def _merge(a: VLDelta, b: VLDelta) -> VLDelta:
    return VLDelta(b.request_id, a.text + b.text, b.num_input_tokens, b.num_output_tokens,
                   finish_reason=b.finish_reason, error=b.error)

