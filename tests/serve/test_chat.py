"""The request rules of the endpoint as pure functions: OpenAI chats -> Conversation + images + SamplingParams."""
from __future__ import annotations

import pytest

from raylens.conversation import render
from raylens.prompts import DEFAULT_CAPTION_PROMPT, build_prompt, get_template
from serve.chat import parse_request, plan_chat, reserved_markers, validation_param
from serve.config import ServeConfig
from serve.errors import ApiError

TEMPLATE = get_template("Hermes-2")
CONFIG = ServeConfig(max_images=2, max_tokens_limit=100, default_max_tokens=20, max_tiles=6)
IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def plan(body: dict):
    return plan_chat(parse_request(__import__("json").dumps(body).encode()), CONFIG, TEMPLATE, "m")


def refused(body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        plan(body)
    return info.value


def test_one_image_and_the_caption_prompt_render_as_the_batch_job_does():
    p = plan({"messages": [{"role": "user", "content": [IMG, {"type": "text", "text": DEFAULT_CAPTION_PROMPT}]}]})
    assert render(TEMPLATE, p.conversation) == build_prompt(TEMPLATE, DEFAULT_CAPTION_PROMPT, num_images=1)
    assert [i.url for i in p.images] == ["data:image/png;base64,AAAA"]
    assert p.images[0].param == "messages[0].content[0].image_url.url"


def test_system_history_and_images_per_turn():
    p = plan({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [IMG, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And"},
        {"role": "user", "content": [{"type": "text", "text": "this one?"}, {**IMG, "image_url": {"url": "data:,x", "detail": "low"}}]},
    ]})
    conv = p.conversation
    assert conv.system == "Be brief."
    assert [(t.user, t.num_images, t.assistant) for t in conv.turns] == [("What?", 1, "A cat."), ("And\nthis one?", 1, None)]
    assert [i.max_tiles for i in p.images] == [6, 1]  # detail "low" is one tile
    text = render(TEMPLATE, conv)
    assert text.count("<image>") == 2 and "Be brief." in text and text.endswith("<|im_start|>assistant\n")


def test_sampling_defaults_and_values():
    p = plan({"messages": [{"role": "user", "content": "hi"}]})
    assert (p.params.max_new_tokens, p.params.temperature, p.params.top_p) == (20, 1.0, 1.0)
    p = plan({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 7,
              "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "END", "stream": True,
              "stream_options": {"include_usage": True}, "n": 1, "presence_penalty": 0})
    assert (p.params.max_new_tokens, p.params.greedy, p.params.top_p, p.params.seed, p.params.stop) == (7, True, 0.5, 3, ("END",))
    assert p.stream and p.include_usage


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}, "messages[1].role"),
    ({"messages": [{"role": "system", "content": [IMG]}, {"role": "user", "content": "a"}]}, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [IMG]}, {"role": "user", "content": "b"}]},
     "messages[1].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [IMG, IMG, IMG]}]}, "messages[0].content[2].image_url.url"),
    ({"messages": [{"role": "user", "content": [IMG, {"type": "text", "text": "<image> and <image>"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "<IMG_CONTEXT>"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a</img>"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 101}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tiles": 7}, "max_tiles"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "not an object"}]}]}, "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}, "temperature"),
])
def test_refusals_name_the_field(body, param):
    error = refused(body)
    assert error.status == 400 and error.param == param, (error.param, error.message)


def test_unknown_fields_are_ignored_and_unknown_models_are_404():
    assert plan({"messages": [{"role": "user", "content": "a"}], "store": True, "metadata": {"x": 1}}).params
    error = refused({"model": "other", "messages": [{"role": "user", "content": "a"}]})
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")


def test_bad_json_is_a_400():
    for raw in (b"{", b"[]", b"\xff", b"null", b'"text"'):
        with pytest.raises(ApiError) as info:
            parse_request(raw)
        assert info.value.status == 400


def test_reserved_markers_cover_the_template_and_the_image_block():
    markers = reserved_markers(TEMPLATE)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>"} <= set(markers)
    assert set(reserved_markers(get_template("phi3-chat"))) >= {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}


def test_validation_param_drops_union_branch_names():
    assert validation_param(("messages", 0, "content", "list[tagged-union[TextPart,ImagePart]]", 1, "image_url",
                             "image_url", "url")) == "messages[0].content[1].image_url.url"
    assert validation_param(("messages", 0, "content", "str")) == "messages[0].content"
    assert validation_param(()) is None
