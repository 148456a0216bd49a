import pytest

from raylens.prompts import (
    IMG_CONTEXT,
    INTERNVL_SYSTEM_MESSAGE,
    TEMPLATES,
    build_prompt,
    expand_image_placeholders,
    get_template,
    image_block,
    split_answer,
)


def test_internlm2_single_image_prompt_matches_published_layout():
    t = get_template("internlm2-chat")
    prompt = expand_image_placeholders(build_prompt(t, "Describe the image."), [4])
    expected = (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>"
        "<|im_start|>user\n<img>" + IMG_CONTEXT * 4 + "</img>\nDescribe the image.<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert prompt == expected


def test_phi3_template_uses_its_own_roles():
    prompt = build_prompt(get_template("phi3-chat"), "hi", num_images=0)
    assert prompt == f"<|system|>\n{INTERNVL_SYSTEM_MESSAGE}<|end|><|user|>\nhi<|end|><|assistant|>\n"


def test_placeholder_kept_where_the_user_put_it():
    prompt = build_prompt(get_template("Hermes-2"), "Look: <image> what is it?")
    assert prompt.count("<image>") == 1
    assert "user\nLook: <image> what is it?" in prompt


def test_history_and_answer_close_turns_without_newlines():
    t = get_template("Hermes-2")
    prompt = build_prompt(t, "and now?", history=[("first?", "one")], answer="two")
    assert prompt.endswith("<|im_start|>user\n<image>\nfirst?<|im_end|><|im_start|>assistant\none<|im_end|>"
                           "<|im_start|>user\nand now?<|im_end|><|im_start|>assistant\ntwo<|im_end|>")


def test_multiple_images_expand_in_order():
    t = get_template("Hermes-2")
    prompt = build_prompt(t, "Image-1: <image>\nImage-2: <image>\nSame?")
    out = expand_image_placeholders(prompt, [2, 3])
    first, second = out.split("</img>")[0], out.split("</img>")[1]
    assert first.count(IMG_CONTEXT) == 2 and second.count(IMG_CONTEXT) == 3


@pytest.mark.parametrize("counts", [[], [1, 1]])
def test_placeholder_count_mismatch_is_an_error(counts):
    with pytest.raises(ValueError, match="placeholders"):
        expand_image_placeholders(build_prompt(get_template("Hermes-2"), "x"), counts)


def test_image_block_rejects_zero_tokens():
    with pytest.raises(ValueError):
        image_block(0)


def test_unknown_template_names_the_known_ones():
    with pytest.raises(ValueError, match="internlm2-chat"):
        get_template("llava")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_split_answer_cuts_at_stop_words(name):
    t = TEMPLATES[name]
    assert split_answer(" a red circle." + t.stop_words[0] + "junk", t) == "a red circle."
    assert split_answer("no stop here ", t) == "no stop here"
