"""The transformers engine behind the VLEngine protocol, on a tiny random checkpoint (CPU)."""
from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from raylens.engines import VLEngine, create_engine, resolve_engine_name
from raylens.engines.base import SamplingParams, VLRequest
from raylens.images import TilingSpec, decode_image, prepare_image

from conftest import image_bytes


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = create_engine("transformers", str(tiny_checkpoint), max_batch_size=4)
    yield eng
    eng.close()


def _request(engine, rid: str, size=(64, 48), color=(200, 30, 30), question="Describe.", max_tiles=2) -> VLRequest:
    spec = TilingSpec(tile_size=engine.spec.tile_size, max_tiles=max_tiles, use_thumbnail=engine.spec.use_thumbnail)
    prepared = prepare_image(decode_image(image_bytes(size, color)), spec)
    return VLRequest(rid, question, prepared, max_tiles=max_tiles)


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, VLEngine)
    assert resolve_engine_name("auto") == "transformers"  # no CUDA here


def test_results_come_back_in_request_order_with_token_counts(engine):
    reqs = [_request(engine, f"r{i}", size=(40 + 30 * i, 40), color=(10 * i, 100, 200)) for i in range(6)]
    results = asyncio.run(engine.generate(reqs, SamplingParams(max_new_tokens=5)))
    assert [r.request_id for r in results] == [f"r{i}" for i in range(6)]
    for r in results:
        assert r.error is None and r.text is not None
        assert r.num_input_tokens > engine.spec.image_tokens_per_tile
        assert 1 <= r.num_output_tokens <= 5
        assert r.finish_reason in ("stop", "length")


def test_batching_does_not_change_greedy_output(engine):
    reqs = [_request(engine, f"r{i}", size=(48 + 50 * i, 64), color=(250 - 40 * i, 20 * i, 90)) for i in range(5)]
    params = SamplingParams(max_new_tokens=6)
    together = asyncio.run(engine.generate(reqs, params))
    alone = [asyncio.run(engine.generate([r], params))[0] for r in reqs]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.num_input_tokens for r in together] == [r.num_input_tokens for r in alone]


def test_ignore_eos_generates_exactly_max_new_tokens(engine):
    [res] = asyncio.run(engine.generate([_request(engine, "x")], SamplingParams(max_new_tokens=7, ignore_eos=True)))
    assert res.num_output_tokens == 7 and res.finish_reason == "length"


def test_sampling_with_a_seed_is_repeatable(engine):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=123)
    a = asyncio.run(engine.generate([_request(engine, "x")], params))[0].text
    b = asyncio.run(engine.generate([_request(engine, "x")], params))[0].text
    assert a == b


def test_more_tiles_mean_more_input_tokens(engine):
    small, large = asyncio.run(engine.generate(
        [_request(engine, "a", size=(100, 100), max_tiles=1), _request(engine, "b", size=(400, 200), max_tiles=2)],
        SamplingParams(max_new_tokens=2),
    ))
    per_tile = engine.spec.image_tokens_per_tile
    assert large.num_input_tokens - small.num_input_tokens == 2 * per_tile  # 2 tiles + thumbnail vs 1 tile


def test_text_only_request_works(engine):
    [res] = asyncio.run(engine.generate([VLRequest("t", "hello")], SamplingParams(max_new_tokens=3)))
    assert res.error is None and res.num_input_tokens > 0


def test_an_over_long_request_fails_alone(engine):
    too_long = VLRequest("long", "word " * 5000, None)
    ok = _request(engine, "ok")
    results = asyncio.run(engine.generate([too_long, ok], SamplingParams(max_new_tokens=3)))
    assert results[0].error.startswith("ValueError:") and "positions" in results[0].error
    assert results[0].text is None
    assert results[1].error is None


def test_unknown_engine_name_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("vllm", str(tiny_checkpoint))
