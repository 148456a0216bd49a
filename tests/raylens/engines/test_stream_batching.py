"""The stream batcher's rules without a model: which rows share a batch, how long a batch waits to fill,
withdrawn rows, closing (pure asyncio and threads; the engine's use of it is in test_transformers_engine_streams)."""
from __future__ import annotations

import asyncio
import time

import pytest

from raylens.engines.base import EngineDeadError, SamplingParams
from raylens.engines.stream_batching import StreamBatcher, StreamRow, batch_key


def test_batch_keys():
    greedy = SamplingParams(max_new_tokens=8)
    assert batch_key(greedy) == batch_key(SamplingParams(max_new_tokens=8, stop=("x",), seed=3, top_p=0.5))
    assert batch_key(greedy) != batch_key(SamplingParams(max_new_tokens=9))
    assert batch_key(greedy) != batch_key(SamplingParams(max_new_tokens=8, ignore_eos=True))
    sampled = SamplingParams(max_new_tokens=8, temperature=0.7)
    assert batch_key(sampled) == batch_key(SamplingParams(max_new_tokens=8, temperature=0.7, stop=("x",)))
    assert batch_key(sampled) != batch_key(SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9))
    assert batch_key(SamplingParams(temperature=0.7, seed=1)) is None  # runs alone


class Recorder:
    """A `run_batch` that records each batch (payloads and start time) and ends its rows."""

    def __init__(self) -> None:
        self.batches: list[tuple[list, float]] = []

    def __call__(self, rows: list[StreamRow]) -> None:
        self.batches.append(([row.payload for row in rows], time.monotonic()))
        for row in rows:
            row.post(None)


def _run(batcher: StreamBatcher, submissions, *, before_wait=None):
    """Submit (payload, params) rows from one event loop and wait until every row ended."""
    async def main():
        loop = asyncio.get_running_loop()
        rows = [StreamRow(payload, params, loop) for payload, params in submissions]
        for row in rows:
            batcher.submit(row)
        if before_wait is not None:
            await before_wait(rows)
        return await asyncio.wait_for(asyncio.gather(*(row.queue.get() for row in rows)), 10)

    return asyncio.run(main())


def test_rows_group_by_settings_up_to_the_batch_size_oldest_first():
    record = Recorder()
    a, b = SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=5)
    batcher = StreamBatcher(record, max_batch_size=2, wait_s=5.0)
    _run(batcher, [("a1", a), ("b1", b), ("a2", a), ("b2", b), ("a3", SamplingParams(max_new_tokens=4, stop=("!",))),
                   ("a4", a)])
    assert [payloads for payloads, _ in record.batches] == [["a1", "a2"], ["b1", "b2"], ["a3", "a4"]]
    batcher.close()


def test_a_short_batch_waits_its_window_and_a_seeded_sample_does_not():
    record = Recorder()
    batcher = StreamBatcher(record, max_batch_size=4, wait_s=0.3)
    started = time.monotonic()
    _run(batcher, [("alone", SamplingParams())])
    assert record.batches[0][1] - started >= 0.3
    slow = StreamBatcher(record, max_batch_size=4, wait_s=30.0)
    started = time.monotonic()
    _run(slow, [("seeded", SamplingParams(temperature=1.0, seed=4))])
    assert record.batches[1][0] == ["seeded"] and record.batches[1][1] - started < 5
    batcher.close()
    slow.close()


def test_withdrawn_rows_never_run_and_closing_runs_the_rest_at_once():
    record = Recorder()
    batcher = StreamBatcher(record, max_batch_size=2, wait_s=30.0)

    async def withdraw_first(rows):
        await asyncio.sleep(0.1)
        batcher.withdraw(rows[0])
        rows[0].post(None)  # (its consumer would have gone; end it here so the gather completes)
        batcher.close()

    started = time.monotonic()
    _run(batcher, [("gone", SamplingParams()), ("kept", SamplingParams(max_new_tokens=3))], before_wait=withdraw_first)
    assert [payloads for payloads, _ in record.batches] == [["kept"]]
    assert time.monotonic() - started < 10
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(EngineDeadError):
        batcher.submit(StreamRow("late", SamplingParams(), loop))
