"""Conversations (several turns, several images, a system message) render as InternVL's templates do."""
from __future__ import annotations

import itertools
import random

import pytest

from raylens.conversation import Conversation, Turn, render, render_spans
from raylens.prompts import INTERNVL2_5_SYSTEM_MESSAGE, INTERNVL_SYSTEM_MESSAGE, TEMPLATES, build_prompt, get_template


def test_two_turns_with_images_on_each_turn_hermes():
    conversation = Conversation((Turn("What is this?", 1, "A cat."), Turn("And these?", 2)))
    assert render(get_template("Hermes-2"), conversation) == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\n<image>\n<image>\nAnd these?<|im_end|><|im_start|>assistant\n"
    )


def test_internvl2_5_closes_every_turn_with_a_newline():
    conversation = Conversation((Turn("Hi", 0, "Hello."), Turn("<image> what?", 1)))
    assert render(get_template("internvl2_5"), conversation) == (
        f"<|im_start|>system\n{INTERNVL2_5_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n<image> what?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("system,expected_prefix", [
    (None, f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>"),
    ("Be brief.", "<|im_start|>system\nBe brief.<|im_end|>"),
    ("", ""),
])
def test_system_message_default_own_or_none(system, expected_prefix):
    text = render(get_template("internlm2-chat"), Conversation.single("q", system=system))
    assert text == expected_prefix + "<|im_start|>user\nq<|im_end|><|im_start|>assistant\n"


def test_the_checkpoints_system_message_replaces_the_templates_but_not_the_conversations():
    t = get_template("Hermes-2")
    assert render(t, Conversation.single("q"), system_message="From config.").startswith(
        "<|im_start|>system\nFrom config.<|im_end|>")
    assert render(t, Conversation.single("q", system="Mine."), system_message="From config.").startswith(
        "<|im_start|>system\nMine.<|im_end|>")


def test_placeholders_stay_where_the_user_put_them():
    text = render(get_template("Hermes-2"), Conversation.single("Image-1: <image>\nImage-2: <image>\nSame?", 2))
    assert "user\nImage-1: <image>\nImage-2: <image>\nSame?<|im_end|>" in text


@pytest.mark.parametrize("user,num_images", [("a <image> b", 2), ("<image><image>", 1), ("<image>", 0)])
def test_placeholders_must_number_the_turns_images(user, num_images):
    with pytest.raises(ValueError, match="placeholders"):
        Turn(user, num_images)


def test_only_the_last_turn_may_be_unanswered():
    with pytest.raises(ValueError, match="turn 0"):
        Conversation((Turn("a"), Turn("b")))
    with pytest.raises(ValueError, match="at least one turn"):
        Conversation(())
    with pytest.raises(ValueError):
        Turn("a", -1)
    assert Conversation([Turn("a", 0, "x")]).turns == (Turn("a", 0, "x"),)  # lists become tuples


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_build_prompt_is_the_one_turn_shorthand(name):
    t = TEMPLATES[name]
    assert build_prompt(t, "Describe.") == render(t, Conversation.single("Describe.", 1))
    assert build_prompt(t, "Now?", history=[("First?", "One.")], answer="Two.") == render(
        t, Conversation((Turn("First?", 1, "One."), Turn("Now?", 0, "Two."))))


def _random_conversation(rng: random.Random) -> Conversation:
    words = ["a", "red", "<|im_end|>", "图", "\n", " ", "x" * 5]
    turns = []
    n = rng.randint(1, 4)
    for i in range(n):
        k = rng.randint(0, 2)
        user = " ".join(rng.choice(words) for _ in range(rng.randint(0, 4)))
        if k and rng.random() < 0.5:
            user = " <image> ".join([user] * (k + 1))  # k placeholders inline
        answer = None if i == n - 1 and rng.random() < 0.5 else "".join(rng.choice(words) for _ in range(rng.randint(0, 3)))
        turns.append(Turn(user, k, answer))
    return Conversation(tuple(turns), system=rng.choice([None, "", "sys"]))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_spans_always_join_to_the_rendered_string(name):
    t = TEMPLATES[name]
    rng = random.Random(name)
    for _ in range(300):
        conversation = _random_conversation(rng)
        spans = render_spans(t, conversation)
        assert "".join(s for s, _ in spans) == render(t, conversation)
        assert all(s for s, _ in spans) and all(a != b for (_, a), (_, b) in itertools.pairwise(spans))
        answers = [turn.assistant for turn in conversation.turns if turn.assistant is not None]
        assert [s for s, flag in spans if flag] == [a + t.end_of_turn for a in answers if a + t.end_of_turn]


def test_the_newline_after_an_internvl2_5_answer_carries_no_loss():
    spans = render_spans(get_template("internvl2_5"), Conversation((Turn("q", 0, "yes"), Turn("again", 0, "no"))))
    assert [s for s, flag in spans if flag] == ["yes<|im_end|>", "no<|im_end|>"]
    assert spans[-1] == ("\n", False)
