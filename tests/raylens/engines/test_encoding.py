"""encode_request: one question or a whole conversation -> token ids, stacked tiles, image positions, labels."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from transformers import AutoTokenizer

from raylens.checkpoints.formats import ModelSpec
from raylens.conversation import Conversation, Turn, render
from raylens.engines.base import RequestError, SamplingParams, VLRequest
from raylens.engines.encoding import IGNORE_INDEX, CachedPromptTokenizer, encode_request
from raylens.images import TilingSpec, decode_image, prepare_image
from raylens.prompts import IMG_CONTEXT, expand_image_placeholders

from conftest import image_bytes


@pytest.fixture(scope="module")
def spec(tiny_checkpoint):
    return ModelSpec.from_dir(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint))


def _image(spec, size, max_tiles=4):
    return prepare_image(decode_image(image_bytes(size)), spec.tiling(max_tiles))


def test_one_question_is_a_one_turn_conversation(spec, tokenizer):
    image = _image(spec, (300, 100))
    one = encode_request(VLRequest("a", "Describe.", image), spec=spec, tokenizer=tokenizer)
    chat = encode_request(VLRequest.chat("b", Conversation.single("Describe.", 1), [image]), spec=spec,
                          tokenizer=tokenizer)
    assert one.input_ids == chat.input_ids
    assert np.array_equal(one.pixel_values, chat.pixel_values)
    assert image.num_tiles == 4  # 3x1 grid + thumbnail
    assert one.image_tokens == 4 * spec.image_tokens_per_tile
    assert one.input_ids[one.image_offset : one.image_offset + one.image_tokens] == \
        [tokenizer.convert_tokens_to_ids(IMG_CONTEXT)] * one.image_tokens


class _Counting:
    """The tokenizer, counting its plain calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.calls += not kwargs
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_cached_prompt_tokenizer_encodes_the_same_and_tokenises_each_prompt_once(spec, tokenizer):
    counting = _Counting(tokenizer)
    cached = CachedPromptTokenizer(counting, size=2)
    small, wide = _image(spec, (64, 64)), _image(spec, (300, 100))
    requests = [VLRequest("a", "Describe.", small), VLRequest("b", "Describe.", _image(spec, (60, 50))),
                VLRequest("c", "Describe.", wide), VLRequest("d", "What colour?", small)]
    for _ in range(2):
        for req in requests:
            got = encode_request(req, spec=spec, tokenizer=cached)
            want = encode_request(req, spec=spec, tokenizer=tokenizer)
            assert got.input_ids == want.input_ids and got.images == want.images
            assert np.array_equal(got.pixel_values, want.pixel_values)
    # a, b: one prompt (1 tile each); c: 4 tiles; d: another question. Size 2: full at d, emptied, refilled.
    assert counting.calls == 3 + 3
    answered = VLRequest.chat("e", Conversation([Turn("Describe.", 1, "a star")]), [small])
    labelled = encode_request(answered, spec=spec, tokenizer=cached, with_labels=True)  # offsets: passed on
    assert labelled.labels == encode_request(answered, spec=spec, tokenizer=tokenizer, with_labels=True).labels
    assert cached.convert_tokens_to_ids(IMG_CONTEXT) == tokenizer.convert_tokens_to_ids(IMG_CONTEXT)


def test_multi_turn_multi_image_positions_counts_and_tiles(spec, tokenizer):
    images = [_image(spec, (64, 48)), _image(spec, (300, 100)), _image(spec, (50, 200))]
    conversation = Conversation((
        Turn("What is this?", 1, "A red box."),
        Turn("Left: <image> right: <image> same?", 2),
    ), system="Be brief.")
    enc = encode_request(VLRequest.chat("c", conversation, images), spec=spec, tokenizer=tokenizer)
    tiles = [i.num_tiles for i in images]
    assert [e.num_tiles for e in enc.images] == tiles
    assert [e.num_tokens for e in enc.images] == [spec.image_tokens(n) for n in tiles]
    context = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    for e in enc.images:
        run = enc.input_ids[e.offset : e.offset + e.num_tokens]
        assert run == [context] * e.num_tokens
        assert enc.input_ids[e.offset - 1] != context and enc.input_ids[e.offset + e.num_tokens] != context
    assert enc.images[0].offset < enc.images[1].offset < enc.images[2].offset
    assert enc.pixel_values.shape == (sum(tiles), 3, spec.tile_size, spec.tile_size)
    assert [p.shape[0] for p in enc.image_pixel_values()] == tiles
    # The ids are the tokenisation of the rendered, expanded prompt: one path, no surprises.
    prompt = expand_image_placeholders(render(spec.chat_template(), conversation, system_message=spec.system_message),
                                       [spec.image_tokens(n) for n in tiles])
    assert enc.prompt == prompt and enc.input_ids == tokenizer(prompt)["input_ids"]
    assert "Be brief." in prompt and spec.system_message not in prompt


def test_labels_keep_only_the_answers_and_their_end_of_turn(spec, tokenizer):
    conversation = Conversation((Turn("first?", 1, "a red circle"), Turn("second?", 0, "two <image> dots")))
    enc = encode_request(VLRequest.chat("l", conversation, [_image(spec, (64, 64))]), spec=spec, tokenizer=tokenizer,
                         with_labels=True)
    assert len(enc.labels) == len(enc.input_ids)
    kept = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "a red circle<|im_end|>two <image> dots<|im_end|>"
    # An answer's "<image>" is text, not an image: the one image is the user's.
    assert len(enc.images) == 1


def test_text_holding_image_context_tokens_is_a_request_error(spec, tokenizer):
    with pytest.raises(RequestError, match=IMG_CONTEXT) as err:
        encode_request(VLRequest("x", f"look {IMG_CONTEXT * 3}", _image(spec, (64, 64))), spec=spec, tokenizer=tokenizer)
    assert err.value.param == "messages"


def test_request_shapes_are_validated():
    image = prepare_image(decode_image(image_bytes((64, 64))), TilingSpec(tile_size=112))
    with pytest.raises(ValueError, match="2 images"):
        VLRequest.chat("r", Conversation.single("two?", 2), [image])
    with pytest.raises(ValueError, match="not question/image"):
        VLRequest("r", "q", image, conversation=Conversation.single("q", 1))
    with pytest.raises(ValueError, match="question"):
        VLRequest("r")
    conversation, images = VLRequest("r", "q", image).as_conversation()
    assert conversation == Conversation((Turn("q", 1),)) and images == (image,)
    assert VLRequest("r", "q").as_conversation() == (Conversation((Turn("q", 0),)), ())


def test_sampling_params_stop_and_errors_that_cross_processes():
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop="###").stop == ("###",)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])
    err = pickle.loads(pickle.dumps(RequestError("too long", param="max_tokens")))
    assert (str(err), err.param, isinstance(err, ValueError)) == ("too long", "max_tokens", True)
