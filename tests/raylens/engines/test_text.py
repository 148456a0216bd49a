"""AnswerText: stop strings, stripping, and streamed pieces that always add up to the final answer."""
from __future__ import annotations

import random

import pytest

from raylens.engines.text import AnswerText, cut_at_stop


def _stream(text_steps: list[str], stop=()) -> tuple[list[str], str]:
    answer = AnswerText(stop)
    deltas = []
    for text in text_steps:
        deltas.append(answer.update(text))
        if answer.stopped:
            break
    deltas.append(answer.finish(text))
    return deltas, answer.final(text_steps[-1])


def test_cut_at_the_earliest_stop_string():
    assert cut_at_stop("a. b### c", ["###", "."]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert cut_at_stop("abc", []) == ("abc", False)


def test_a_partial_stop_string_is_held_back_then_released():
    answer = AnswerText(["###"])
    assert answer.update("red #") == "red"
    assert answer.update("red ##") == ""
    assert answer.update("red ##!") == " ##!"  # not a stop after all
    assert answer.update("red ##! ###") == ""
    assert answer.stopped and answer.emitted == "red ##!"


def test_half_a_character_and_trailing_spaces_wait_for_the_next_token():
    answer = AnswerText()
    assert answer.update("  caf\ufffd") == "caf"
    assert answer.update("  café ") == "é"
    assert answer.update("  café au") == " au"
    assert answer.finish("  café au lait \n") == " lait"
    assert answer.emitted == "café au lait"


@pytest.mark.parametrize("seed", range(20))
def test_deltas_concatenate_to_the_final_answer(seed):
    rng = random.Random(seed)
    alphabet = ["a", "b", " ", "\n", "#", "\ufffd", "é", "."]
    stop = rng.choice([(), ("##",), ("b#", "."), ("a",)])
    text, steps = "", []
    for _ in range(rng.randint(1, 30)):
        piece = rng.choice(alphabet)
        if text.endswith("\ufffd"):  # the next token completes the character
            text = text[:-1] + "é"
        text += piece
        steps.append(text)
    deltas, final = _stream(steps, stop)
    assert "".join(deltas) == final
