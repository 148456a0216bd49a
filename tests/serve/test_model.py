"""Coalescing of streamed deltas (pure asyncio, no Serve)."""
from __future__ import annotations

import asyncio

from raylens.engines.base import VLDelta
from serve.model import RequestFailure, coalesce


def _run(items, interval_s, gap_s=0.0):
    async def source():
        for item in items:
            await asyncio.sleep(gap_s)
            yield item

    async def collect():
        return [x async for x in coalesce(source(), interval_s)]

    return asyncio.run(collect())


def d(text, finish=None, n=1):
    return VLDelta("r", text, 5, n, finish_reason=finish)


def test_first_text_goes_out_at_once_then_deltas_are_merged():
    items = [d(""), d("a", n=1), d("b", n=2), d("c", n=3), d("", "stop", n=4)]
    out = _run(items, interval_s=10.0)
    assert [x.text for x in out] == ["", "a", "bc"]  # the empty start, the first text, then the rest with the finish
    assert out[-1].finish_reason == "stop" and out[-1].num_output_tokens == 4
    assert "".join(x.text for x in out) == "abc"


def test_no_interval_passes_every_delta():
    items = [d("a"), d("b"), d("c", "length")]
    assert [x.text for x in _run(items, interval_s=0.0)] == ["a", "b", "c"]


def test_failures_go_out_at_once():
    out = _run([RequestFailure("too long", "messages")], interval_s=10.0)
    assert out == [RequestFailure("too long", "messages")]
