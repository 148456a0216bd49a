"""Concurrent streamed requests gathered into shared batches for an engine that runs one `generate` at a time.

Why: the transformers engine's `generate` cannot admit a request into a running batch (no continuous
batching, unlike lmdeploy), so N concurrent streams would otherwise run N generate calls in turn. Each
`stream` call instead hands its encoded request to a `StreamBatcher` as a `StreamRow` and reads its own
tokens back from an asyncio queue; one worker thread takes the pending rows that can share a generate
(same settings, at most `max_batch_size`), waits up to `wait_s` for a batch to fill, and runs them
together. Rows that arrive while a batch runs wait for it to end and then go together.

Why here and not `@serve.batch` in the Serve deployment: the engine needs a batched-stream primitive in
either design (one generate whose tokens fan out per row); doing the gathering here too is one mechanism
for every caller (the endpoint's streamed and non-streamed requests, tests, benchmarks), keeps
cancellation a per-row flag instead of Serve's batch-generator protocol, and lets rows that differ only
in their stop strings share a batch (stop strings are checked per row by each consumer).

This module knows nothing of models: the engine gives the batcher a `run_batch(rows)` callable that runs in
the worker thread and must end every row it is given with `row.post(None)` or `row.post(exception)`.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable

from raylens.engines.base import EngineDeadError, SamplingParams


def batch_key(params: SamplingParams) -> Hashable | None:
    """What rows must share to run in one generate: every setting that changes the generate call; not the
    stop strings (each consumer checks its own), nor what greedy decoding ignores (seed, top_p). None: the
    row runs alone. A sampled row with a seed runs alone, because its seed promises a repeatable answer and
    a batch's random draws depend on the other rows."""
    if params.greedy:
        return replace(params, stop=(), seed=None, top_p=1.0)
    if params.seed is not None:
        return None
    return replace(params, stop=())


@dataclass(eq=False)
class StreamRow:
    """One streamed request: waiting for, or inside, a batched generate.

    The worker thread hands it token ids, then None (the generate ended) or the exception that ended it,
    through `post`. `done` says no more tokens are wanted: set by the consumer (it saw a stop string, or went
    away) or by the worker (the row's stop token); a running generate ends a done row at its next step."""

    payload: Any  # what the engine runs (its encoded request)
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    done: bool = False

    def __post_init__(self) -> None:
        self.key = batch_key(self.params)

    def post(self, item) -> None:
        """Hand `item` to the consumer (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
            self.done = True


class StreamBatcher:
    """Pending rows and the one worker thread that runs them in batches (see the module docstring).

    Every `submit` queues one drain on the worker; a drain takes the oldest pending row and the rows that
    can share its batch, so each row is taken by some drain, and a drain that finds nothing (its row was
    taken by an earlier one, or withdrawn) returns at once."""

    def __init__(self, run_batch: Callable[[list[StreamRow]], None], *, max_batch_size: int, wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._pending: list[StreamRow] = []
        self._changed = threading.Condition()
        self._closed = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="raylens-stream-batch")

    def submit(self, row: StreamRow) -> None:
        with self._changed:
            if self._closed:
                raise EngineDeadError("the engine is closed")
            self._pending.append(row)
            self._changed.notify_all()
        self._worker.submit(self._drain)

    def withdraw(self, row: StreamRow) -> None:
        """The row's consumer is gone: drop the row if its batch has not started."""
        with self._changed:
            if row in self._pending:
                self._pending.remove(row)
                self._changed.notify_all()

    def close(self) -> None:
        """No new rows; pending ones go at once (the engine, closed, fails them with EngineDeadError)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.shutdown(wait=False)

    def _drain(self) -> None:
        batch = self._take()
        if batch:
            self._run_batch(batch)

    def _take(self) -> list[StreamRow]:
        """The next batch: the oldest row and those that may join it, once the batch is full or the
        oldest row has waited `wait_s`."""
        with self._changed:
            while True:
                if not self._pending:
                    return []
                oldest = self._pending[0]
                if oldest.key is None:
                    group = [oldest]
                else:
                    group = [r for r in self._pending if r.key == oldest.key][: self.max_batch_size]
                left = oldest.arrived + self.wait_s - time.monotonic()
                if oldest.key is None or len(group) == self.max_batch_size or left <= 0 or self._closed:
                    break
                self._changed.wait(left)
            for row in group:
                self._pending.remove(row)
            return group
