"""Concurrent streams on the transformers engine share batched generate calls (CPU, tiny checkpoint and the
demo model), and each stream still answers exactly what `generate` answers for its request alone.

The batching engine here has `max_batch_size=3` and a long `batch_wait_timeout_s`: a batch starts the moment
three rows of one setting are waiting, so which rows share a generate is certain, not a matter of timing.
Tests that leave a batch short would wait the whole window: each one sends rows in threes.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raylens.engines import create_engine
from raylens.engines.base import EngineDeadError, SamplingParams, VLRequest
from raylens.images import decode_image, prepare_image
from raylens.prompts import DEFAULT_CAPTION_PROMPT

from conftest import image_bytes

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "images"
WAIT_S = 30.0


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = create_engine("transformers", str(tiny_checkpoint), max_batch_size=3, batch_wait_timeout_s=WAIT_S)
    yield eng
    eng.close()


def _request(engine, rid: str, size=(64, 48), color=(200, 30, 30), question="Describe.") -> VLRequest:
    return VLRequest(rid, question, prepare_image(decode_image(image_bytes(size, color)), engine.spec.tiling(2)))


def _requests(engine, n: int, prefix: str = "r") -> list[VLRequest]:
    return [_request(engine, f"{prefix}{i}", size=(40 + 37 * i, 90 - 7 * i), color=(30 * i, 200 - 20 * i, 90))
            for i in range(n)]


def _solo(engine, request, params):
    """What `generate` answers for the request alone (a batch of one)."""
    [result] = engine.generate_sync([request], params)
    assert result.error is None, result.error
    return result


async def _consume(engine, request, params):
    return [d async for d in engine.stream(request, params)]


def _streams(engine, pairs):
    """Streams every (request, params) at once; their deltas, and how many generate calls they took."""
    async def run():
        return await asyncio.gather(*(_consume(engine, r, p) for r, p in pairs))

    before = engine.generate_calls
    out = asyncio.run(run())
    return out, engine.generate_calls - before


def _assert_same_answer(deltas, solo):
    assert "".join(d.text for d in deltas) == solo.text
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    last = deltas[-1]
    assert (last.finish_reason, last.num_input_tokens, last.num_output_tokens) == (
        solo.finish_reason, solo.num_input_tokens, solo.num_output_tokens)


def test_six_concurrent_streams_take_two_generate_calls_and_answer_as_alone(engine):
    params = SamplingParams(max_new_tokens=10)
    reqs = _requests(engine, 5) + [VLRequest("text-only", "hello there")]  # prompts of six lengths, one without image
    solo = [_solo(engine, r, params) for r in reqs]
    streamed, calls = _streams(engine, [(r, params) for r in reqs])
    assert calls == 2  # two full batches of three, not six generate calls
    for deltas, alone in zip(streamed, solo):
        _assert_same_answer(deltas, alone)


def _stop_inside(text: str) -> str | None:
    """A short piece inside `text`, after some text, that does not start with whitespace (the tiny model's
    random text may hold U+FFFD, half characters: not a piece a client would ask for)."""
    for start in range(2, len(text) - 2):
        piece = text[start : start + 2]
        if not piece[0].isspace() and "\ufffd" not in piece and text.find(piece) == start:
            return piece
    return None


def test_a_stop_string_ends_its_own_row_only(engine):
    free = SamplingParams(max_new_tokens=20, ignore_eos=True)
    reqs = _requests(engine, 3, prefix="stop")
    solo = [_solo(engine, r, free) for r in reqs]
    stop = _stop_inside(solo[0].text)
    assert stop is not None, solo[0].text
    stopping = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,))
    cut = _solo(engine, reqs[0], stopping)
    assert cut.finish_reason == "stop" and cut.num_output_tokens < 20

    # Settings that differ only in their stop strings share one batch; the stop ends row 0 alone.
    streamed, calls = _streams(engine, [(reqs[0], stopping), (reqs[1], free), (reqs[2], free)])
    assert calls == 1
    _assert_same_answer(streamed[0], cut)
    for deltas, alone in zip(streamed[1:], solo[1:]):
        _assert_same_answer(deltas, alone)
        assert deltas[-1].num_output_tokens == 20 and deltas[-1].finish_reason == "length"


def test_rows_with_other_settings_are_not_mixed(engine):
    short, long = SamplingParams(max_new_tokens=5, ignore_eos=True), SamplingParams(max_new_tokens=7, ignore_eos=True)
    reqs = _requests(engine, 6, prefix="mix")
    pairs = [(r, short if i % 2 else long) for i, r in enumerate(reqs)]  # interleaved arrivals
    solo = [_solo(engine, r, p) for r, p in pairs]
    streamed, calls = _streams(engine, pairs)
    assert calls == 2  # one batch per setting
    for (req, params), deltas, alone in zip(pairs, streamed, solo):
        _assert_same_answer(deltas, alone)
        assert deltas[-1].num_output_tokens == params.max_new_tokens


def test_seeded_sampling_runs_alone_and_repeats(engine):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    reqs = _requests(engine, 2, prefix="seed")
    solo = [_solo(engine, r, params) for r in reqs]
    streamed, calls = _streams(engine, [(r, params) for r in reqs])  # no wait: a seeded row never waits for others
    assert calls == 2
    for deltas, alone in zip(streamed, solo):
        assert "".join(d.text for d in deltas) == alone.text


def test_a_cancelled_stream_leaves_the_others_intact(engine):
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    reqs = _requests(engine, 3, prefix="cancel")
    solo = [_solo(engine, r, params) for r in reqs]

    async def run():
        first_text = asyncio.Event()

        async def listener():  # the client that stalls after its first text, then goes away
            async for delta in engine.stream(reqs[0], params):
                assert delta.finish_reason is None, "the stream ended before it could be cancelled"
                first_text.set()
                await asyncio.Event().wait()

        gone = asyncio.create_task(listener())
        others = asyncio.gather(*(_consume(engine, r, params) for r in reqs[1:]))
        await first_text.wait()
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await others

    before = engine.generate_calls
    streamed = asyncio.run(run())
    assert engine.generate_calls - before == 1
    for deltas, alone in zip(streamed, solo[1:]):
        _assert_same_answer(deltas, alone)


def test_a_stream_cancelled_before_its_batch_starts_takes_no_place_in_it(engine):
    params = SamplingParams(max_new_tokens=6)
    reqs = _requests(engine, 4, prefix="withdrawn")
    solo = [_solo(engine, r, params) for r in reqs[1:]]

    async def run():
        waiting = asyncio.create_task(_consume(engine, reqs[0], params))
        await asyncio.sleep(0.3)  # queued, its batch waiting to fill
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await asyncio.gather(*(_consume(engine, r, params) for r in reqs[1:]))

    before = engine.generate_calls
    streamed = asyncio.run(asyncio.wait_for(run(), WAIT_S / 2))  # had it stayed, one of these would wait out the window
    assert engine.generate_calls - before == 1
    for deltas, alone in zip(streamed, solo):
        _assert_same_answer(deltas, alone)


@pytest.mark.parametrize("message,fatal", [("boom", False), ("CUDA error: an illegal memory access", True)])
def test_a_failed_batch_fails_each_of_its_streams(engine, monkeypatch, message, fatal):
    def failing_generate(**kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(engine.model, "generate", failing_generate)  # the fault a real device can have
    reqs = _requests(engine, 3, prefix="fail")
    params = SamplingParams(max_new_tokens=4)

    async def run():
        return await asyncio.gather(*(_consume(engine, r, params) for r in reqs), return_exceptions=True)

    outcomes = asyncio.run(run())
    for outcome in outcomes:
        if fatal:
            assert isinstance(outcome, EngineDeadError) and message in str(outcome)
        else:
            assert [(d.text, d.finish_reason, d.error) for d in outcome] == [("", "error", f"RuntimeError: {message}")]


def test_closing_the_engine_ends_waiting_streams_at_once(tiny_checkpoint):
    eng = create_engine("transformers", str(tiny_checkpoint), max_batch_size=3, batch_wait_timeout_s=WAIT_S)
    request = _request(eng, "waiting")

    async def run():
        waiting = asyncio.create_task(_consume(eng, request, SamplingParams(max_new_tokens=4)))
        await asyncio.sleep(0.3)
        eng.close()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(EngineDeadError):
            await _consume(eng, request, SamplingParams(max_new_tokens=4))

    asyncio.run(run())


def test_demo_model_concurrent_captions_end_on_their_own_stop_tokens_and_strings():
    """Real captions in one batch end on their end-of-turn token, as `generate` ends them; a stop string given
    to one row cuts that row only, and the others still end on their stop token."""
    from raylens.checkpoints.resolve import DEMO_MODEL_DIR

    eng = create_engine("transformers", str(DEMO_MODEL_DIR), max_batch_size=3, batch_wait_timeout_s=WAIT_S)
    try:
        names = ["black_circle_on_yellow.png", "blue_star_on_pink.png", "red_triangle_on_yellow.png"]
        tiling = eng.spec.tiling()
        reqs = [VLRequest(n, DEFAULT_CAPTION_PROMPT, prepare_image(decode_image((EXAMPLES / n).read_bytes()), tiling))
                for n in names]
        params = SamplingParams(max_new_tokens=48)
        captions = eng.generate_sync(reqs, params)
        assert all(c.finish_reason == "stop" and c.text.endswith("background.") for c in captions), captions

        streamed, calls = _streams(eng, [(r, params) for r in reqs])
        assert calls == 1
        for deltas, caption in zip(streamed, captions):
            _assert_same_answer(deltas, caption)

        stopping = SamplingParams(max_new_tokens=48, stop=(" on ",))
        cut = _solo(eng, reqs[1], stopping)
        assert cut.text == captions[1].text.split(" on ")[0] and cut.finish_reason == "stop"
        streamed, calls = _streams(eng, [(reqs[0], params), (reqs[1], stopping), (reqs[2], params)])
        assert calls == 1
        _assert_same_answer(streamed[0], captions[0])
        _assert_same_answer(streamed[1], cut)
        _assert_same_answer(streamed[2], captions[2])

        # A stop string inside a token: that token also brings the text before the stop, which is kept.
        inside = SamplingParams(max_new_tokens=48, stop=("lue",))
        cut = _solo(eng, reqs[1], inside)
        assert cut.text == captions[1].text.split("lue")[0] == "a b"
        streamed, _ = _streams(eng, [(reqs[0], params), (reqs[1], inside), (reqs[2], params)])
        _assert_same_answer(streamed[1], cut)
    finally:
        eng.close()
