"""How `ChatIngress` reaches the model: through the `VLModel` deployment's handle (`layout: split`, the
default) or to a `VLModel` in its own replica (`layout: single`).

Why two: the split layout keeps HTTP, validation and image decoding on cheap ingress replicas, apart from
the engine's process and its admission limits, but every request crosses one more Ray hop each way, which
time to first token pays at low concurrency. The single layout removes that hop; image decoding then shares
the model replica's CPU. Both give the ingress the same two calls, `describe()` and `chat()` (an async
iterator of the model's items with a `cancel()`), and both refuse at once with a 503 past capacity.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from raylens.engines.base import SamplingParams, VLRequest
from serve.config import ServeConfig
from serve.errors import overloaded
from serve.model import ModelInfo, VLModel


class HandleModel:
    """The model deployment behind its handle; Serve's router does admission (`max_queued_requests`)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def describe(self) -> ModelInfo:
        return await self.handle.describe.remote()

    def chat(self, request: VLRequest, params: SamplingParams, stream: bool):
        return self.handle.options(stream=True).chat.remote(request, params, stream)

    def check_health(self) -> None:
        """Serve checks the model deployment's replicas itself."""


class InProcessModel:
    """A `VLModel` in the ingress's own replica. Serve's queue is in front of every route (a 401 or a /health
    must not wait behind model work), so admission is here: past `max_ongoing_requests + max_queued_requests`
    requests in the engine, a new one is refused at once with the split layout's 503."""

    def __init__(self, config: ServeConfig) -> None:
        self.model = VLModel(config)
        self.capacity = config.max_ongoing_requests + config.max_queued_requests
        self.retry_after_s = config.retry_after_s
        self.in_flight = 0
        self.closing: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    async def describe(self) -> ModelInfo:
        return self.model.describe()

    def chat(self, request: VLRequest, params: SamplingParams, stream: bool) -> "InProcessStream":
        if self.in_flight >= self.capacity:
            raise overloaded(self.retry_after_s)
        return InProcessStream(self, self.model.chat(request, params, stream))

    def check_health(self) -> None:
        self.model.check_health()


class InProcessStream:
    """The model's items for one request; holds a place in `InProcessModel.in_flight` until it ends or is
    cancelled (cancelling closes the engine's stream, which aborts its generation)."""

    def __init__(self, owner: InProcessModel, source: AsyncIterator) -> None:
        self._owner = owner
        self._source = source
        self._open = True
        owner.in_flight += 1

    def __aiter__(self) -> "InProcessStream":
        return self

    async def __anext__(self):
        try:
            return await self._source.__anext__()
        except BaseException:  # the end, a failure or a cancelled reader: the place is free again
            self._release()
            raise

    def cancel(self) -> None:
        if self._open:
            self._release()
            task = asyncio.get_running_loop().create_task(_close(self._source))
            self._owner.closing.add(task)
            task.add_done_callback(self._owner.closing.discard)

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._owner.in_flight -= 1


async def _close(source) -> None:
    with contextlib.suppress(Exception):
        await source.aclose()
