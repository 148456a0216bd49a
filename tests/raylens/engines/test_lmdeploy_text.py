"""How the lmdeploy engine turns lmdeploy's step outputs into answer text, on CPU.

lmdeploy itself needs CUDA, so its async generator is replaced here by a scripted sequence shaped like
lmdeploy 0.18's `GenOut`s (`serve/core/async_engine.py`: each step's incremental `response` and its new
`token_ids`; the response is "" while the decoded text ends inside a UTF-8 character). The same cases run on
the GPU against the real engine in tests/raylens/engines/test_lmdeploy_engine.py
(`test_answers_cut_inside_a_character_keep_their_text`, `test_demo_model_stops_where_the_transformers_engine_stops`).
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from raylens.checkpoints.resolve import DEMO_MODEL_DIR
from raylens.engines.base import SamplingParams
from raylens.engines.lmdeploy_engine import LMDeployEngine


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))


def _steps(tokenizer, ids: list[int], finish_reason: str, per_step: int = 1) -> list[SimpleNamespace]:
    """A GenOut per `per_step` tokens (a busy engine hands over several at once), then lmdeploy's closing one
    (no new ids); a step whose decoded text ends inside a character gets no response text, as lmdeploy's
    incremental detokenizer holds it back."""
    steps, shown, done = [], "", 0
    while done < len(ids):
        k = min(done + per_step, len(ids))
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        response = "" if text.endswith("\ufffd") else text[len(shown):]
        shown += response
        steps.append(SimpleNamespace(response=response, token_ids=ids[done:k], generate_token_len=k, finish_reason=None))
        done = k
    steps.append(SimpleNamespace(response="", token_ids=[], generate_token_len=len(ids), finish_reason=finish_reason))
    return steps


def _engine(tokenizer, steps) -> LMDeployEngine:
    async def generate(prepared, stream_response):
        for step in steps:
            yield step

    engine = object.__new__(LMDeployEngine)  # the text assembly only needs lmdeploy's generator and a tokenizer
    engine._engine = SimpleNamespace(generate=generate)
    engine._tokenizer = tokenizer
    return engine


def _answer(engine, params: SamplingParams, stream: bool):
    async def collect():
        return [d async for d in engine._deltas(SimpleNamespace(request_id="r"), SimpleNamespace(input_token_len=7),
                                                params, stream)]

    deltas = asyncio.run(collect())
    return "".join(d.text for d in deltas), deltas[-1]


@pytest.mark.parametrize("per_step", [1, 3, 64])
@pytest.mark.parametrize("stream", [False, True])
def test_text_up_to_a_stop_string_is_kept(tokenizer, stream, per_step):
    ids = tokenizer.encode("a black circle on a yellow background.")
    engine = _engine(tokenizer, _steps(tokenizer, ids, "length", per_step))
    text, last = _answer(engine, SamplingParams(max_new_tokens=len(ids), stop=(" on ",)), stream)
    assert (text, last.finish_reason) == ("a black circle", "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_ending_inside_a_character_keeps_its_text(tokenizer, stream):
    ids = tokenizer.encode("a red square \u4e2d")
    cut = ids[:-1]  # the last byte of the three-byte character is missing, as when max_tokens ends the answer
    assert tokenizer.decode(cut).endswith("\ufffd")
    text, last = _answer(_engine(tokenizer, _steps(tokenizer, cut, "length")), SamplingParams(max_new_tokens=len(cut)),
                         stream)
    assert text == tokenizer.decode(cut, skip_special_tokens=True).strip() and text.startswith("a red square")
    assert (last.finish_reason, last.num_output_tokens) == ("length", len(cut))
