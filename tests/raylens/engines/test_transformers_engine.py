"""The transformers engine behind the VLEngine protocol, on a tiny random checkpoint (CPU)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raylens.conversation import Conversation, Turn
from raylens.engines import VLEngine, create_engine, resolve_engine_name
from raylens.engines.base import EngineDeadError, RequestError, SamplingParams, VLRequest
from raylens.images import decode_image, prepare_image
from raylens.prompts import DEFAULT_CAPTION_PROMPT

from conftest import image_bytes

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "images"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = create_engine("transformers", str(tiny_checkpoint), max_batch_size=4)
    yield eng
    eng.close()


def _request(engine, rid: str, size=(64, 48), color=(200, 30, 30), question="Describe.", max_tiles=2) -> VLRequest:
    prepared = prepare_image(decode_image(image_bytes(size, color)), engine.spec.tiling(max_tiles))
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
    assert results[0].error.startswith("RequestError:") and "context of 4096" in results[0].error
    assert results[0].text is None
    assert results[1].error is None


def test_unknown_engine_name_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine("vllm", str(tiny_checkpoint))


# ----------------------------------------------------------------------------- conversations, streaming
def _collect(engine, request, params):
    async def run():
        return [d async for d in engine.stream(request, params)]
    return asyncio.run(run())


def _chat_request(engine, rid="chat"):
    tiling = engine.spec.tiling(2)
    images = [prepare_image(decode_image(image_bytes(size, color)), tiling)
              for size, color in (((64, 48), (200, 30, 30)), ((200, 90), (0, 0, 255)), ((40, 90), (0, 200, 0)))]
    conversation = Conversation((
        Turn("What is this?", 1, "a red box"),
        Turn("Compare <image> with <image>.", 2),
    ))
    return VLRequest.chat(rid, conversation, images, max_tiles=2)


def test_a_conversation_with_several_images_generates(engine):
    chat = _chat_request(engine)
    [res] = asyncio.run(engine.generate([chat], SamplingParams(max_new_tokens=4)))
    assert res.error is None
    tiles = sum(image.num_tiles for image in chat.images)
    assert res.num_input_tokens > tiles * engine.spec.image_tokens_per_tile


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=9, ignore_eos=True)])
def test_stream_deltas_add_up_to_generate(engine, params):
    requests = [_request(engine, "img", size=(120, 50)), VLRequest("text", "hello there"), _chat_request(engine)]
    for req in requests:
        [whole] = asyncio.run(engine.generate([req], params))
        deltas = _collect(engine, req, params)
        assert "".join(d.text for d in deltas) == whole.text
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
        last = deltas[-1]
        assert (last.finish_reason, last.num_input_tokens, last.num_output_tokens) == (
            whole.finish_reason, whole.num_input_tokens, whole.num_output_tokens)
        assert all(d.request_id == req.request_id and d.error is None for d in deltas)


def test_concurrent_streams_take_turns_and_match_generate(engine):
    params = SamplingParams(max_new_tokens=8)
    reqs = [_request(engine, f"s{i}", size=(50 + 40 * i, 60)) for i in range(3)]
    expected = [r.text for r in asyncio.run(engine.generate(reqs, params))]

    async def run():
        async def one(req):
            return "".join([d.text async for d in engine.stream(req, params)])
        return await asyncio.gather(*(one(r) for r in reqs))

    assert asyncio.run(run()) == expected


def _stop_inside(text: str) -> str | None:
    """A short piece from the middle of `text` that does not start with whitespace."""
    for start in range(len(text) // 3, len(text) - 2):
        piece = text[start : start + 2]
        if not piece[0].isspace() and text.find(piece) == start:
            return piece
    return None


def test_stop_strings_end_generation_and_are_left_out(engine):
    req = _request(engine, "stop", size=(90, 60), color=(20, 20, 220))
    free = asyncio.run(engine.generate([req], SamplingParams(max_new_tokens=24, ignore_eos=True)))[0]
    stop = _stop_inside(free.text)
    assert stop is not None, free.text
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, stop=("never appears", stop))
    [cut] = asyncio.run(engine.generate([req], params))
    assert cut.text == free.text[: free.text.find(stop)].strip()
    assert cut.finish_reason == "stop" and cut.num_output_tokens < free.num_output_tokens
    deltas = _collect(engine, req, params)
    assert "".join(d.text for d in deltas) == cut.text
    assert (deltas[-1].finish_reason, deltas[-1].num_output_tokens) == ("stop", cut.num_output_tokens)
    # Batched with a request that does not stop: each row stops on its own.
    other = _request(engine, "other", size=(40, 80), color=(250, 250, 0))
    both = asyncio.run(engine.generate([req, other], params))
    assert both[0].text == cut.text


def test_a_prompt_too_long_for_the_context_fails_the_stream_before_any_text(engine):
    async def first_delta():
        async for delta in engine.stream(VLRequest("long", "word " * 5000), SamplingParams(max_new_tokens=3)):
            return delta

    with pytest.raises(RequestError, match="context of 4096") as err:
        asyncio.run(first_delta())
    assert err.value.param == "messages"
    with pytest.raises(RequestError) as err:
        asyncio.run(_first(engine, VLRequest("q", "hi"), SamplingParams(max_new_tokens=4095)))
    assert err.value.param == "max_tokens"


async def _first(engine, req, params):
    async for delta in engine.stream(req, params):
        return delta


def test_a_closed_engine_is_dead(tiny_checkpoint):
    eng = create_engine("transformers", str(tiny_checkpoint))
    eng.close()
    with pytest.raises(EngineDeadError):
        asyncio.run(eng.generate([VLRequest("a", "hi")], SamplingParams(max_new_tokens=2)))
    with pytest.raises(EngineDeadError):
        asyncio.run(_first(eng, VLRequest("a", "hi"), SamplingParams(max_new_tokens=2)))


def test_demo_model_streams_real_captions_and_stops_where_asked():
    from raylens.checkpoints.resolve import DEMO_MODEL_DIR

    eng = create_engine("transformers", str(DEMO_MODEL_DIR))
    try:
        tiling = eng.spec.tiling()
        examples = sorted(EXAMPLES.iterdir())[:3]
        reqs = [VLRequest(p.name, DEFAULT_CAPTION_PROMPT, prepare_image(decode_image(p.read_bytes()), tiling))
                for p in examples]
        params = SamplingParams(max_new_tokens=32)
        captions = asyncio.run(eng.generate(reqs, params))
        for req, caption in zip(reqs, captions):
            assert caption.text.startswith("a ") and caption.text.endswith("background."), caption.text
            assert "".join(d.text for d in _collect(eng, req, params)) == caption.text
        stopped = asyncio.run(eng.generate(reqs, SamplingParams(max_new_tokens=32, stop=(" on ",))))
        for caption, cut in zip(captions, stopped):
            assert cut.text == caption.text.split(" on ")[0] and cut.finish_reason == "stop"
    finally:
        eng.close()
