"""The offline BPE tokenizer: special tokens, chat template = raylens.prompts, save/load."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from raylens.checkpoints.tokenizer import INTERNVL_TOKENS, build_tokenizer
from raylens.prompts import INTERNVL_SYSTEM_MESSAGE, build_prompt, get_template

CORPUS = ["a red circle above a small blue square", "two green triangles on a white background",
          INTERNVL_SYSTEM_MESSAGE, "Describe the image."] * 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=400)


def test_special_tokens(tokenizer):
    names = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
    assert list(ids.values()) == list(range(len(ids)))  # specials first, in a fixed order
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert len(tokenizer) <= 400
    # Special tokens are atomic, and skipped when decoding.
    text = "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nred"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded[:4] == [ids["<img>"], ids["<IMG_CONTEXT>"], ids["<IMG_CONTEXT>"], ids["</img>"]]
    assert tokenizer.decode(encoded) == text
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "\nred"


def test_any_text_round_trips(tokenizer):
    text = "Zebra ünïcode 你好 🚀 <ref>box</ref>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_named_image_tokens(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.context_image_token == "<IMG_CONTEXT>"
    assert loaded.start_image_token == "<img>" and loaded.end_image_token == "</img>"
    assert loaded.context_image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert loaded.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("template", ["Hermes-2", "internlm2-chat", "phi3-chat"])
def test_chat_template_matches_prompts(template):
    tok = build_tokenizer(CORPUS, vocab_size=400, template=template)
    chat = get_template(template)
    messages = [{"role": "user", "content": "<image>\nWhat is this?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        build_prompt(chat, "What is this?")
    history = [{"role": "user", "content": "<image>\nQ1"}, {"role": "assistant", "content": "A1"},
               {"role": "user", "content": "Q2"}]
    assert tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == \
        build_prompt(chat, "Q2", history=[("<image>\nQ1", "A1")])
    assert tok.eos_token == chat.sep


def test_chat_template_system_and_list_content(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nDescribe.<|im_end|>"
                        "<|im_start|>assistant\n")


def test_deterministic_and_bounded():
    a = build_tokenizer(CORPUS, vocab_size=400)
    b = build_tokenizer(CORPUS, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(CORPUS, vocab_size=100)


def test_padding_adds_unreachable_placeholders():
    base = build_tokenizer(CORPUS, vocab_size=400)
    padded = build_tokenizer(CORPUS, vocab_size=400, pad_to=1000)
    assert len(padded) == 1000
    assert padded.convert_ids_to_tokens(999) == "<|unused_999|>"
    text = "a red circle <|unused_600|> above"
    assert padded(text, add_special_tokens=False)["input_ids"] == base(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="pad"):
        build_tokenizer(CORPUS, vocab_size=400, pad_to=10)
