"""InternVL2.5 and InternVL3 checkpoints in both formats: their templates, tiling, captions on the transformers
engine; and the checkpoints raylens refuses rather than serve with a guessed prompt."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from transformers import AutoTokenizer

from raylens.checkpoints.formats import FORMAT_HF, FORMAT_ORIGINAL, CheckpointError, ModelSpec
from raylens.checkpoints.tiny import HF_CHAT_TEMPLATE, write_tiny_checkpoint
from raylens.conversation import Conversation, Turn, render
from raylens.engines import create_engine
from raylens.engines.base import SamplingParams, VLRequest
from raylens.engines.encoding import encode_request
from raylens.images import decode_image, prepare_image
from raylens.prompts import INTERNVL2_5_SYSTEM_MESSAGE, TEMPLATES

from conftest import image_bytes

# InternVL2.5-2B pairs InternViT with InternLM2.5 (an InternLM2), InternVL3-1B with Qwen2.5 (a Qwen2).
FAMILY_LLM = {"internvl2_5": "internlm2", "internvl3": "qwen2"}
CASES = [(family, fmt) for family in FAMILY_LLM for fmt in (FORMAT_ORIGINAL, FORMAT_HF)]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {(family, fmt): write_tiny_checkpoint(root / f"{family}-{fmt}", format=fmt, family=family,
                                                 llm=FAMILY_LLM[family], seed=2, max_tiles=4)
            for family, fmt in CASES}


@pytest.mark.parametrize("family,fmt", CASES)
def test_spec_reads_the_family_template_and_tiling(family_dirs, family, fmt):
    spec = ModelSpec.from_dir(family_dirs[family, fmt])
    assert spec.template == "internvl2_5" and spec.eos_token == "<|im_end|>"
    assert spec.chat_template().sep == "<|im_end|>\n" and spec.chat_template().stop_words == ("<|im_end|>",)
    assert (spec.min_tiles, spec.max_tiles, spec.use_thumbnail) == (1, 4, True)
    if fmt == FORMAT_ORIGINAL:  # config.json's template: InternVL2.5's system message
        assert spec.system_message == INTERNVL2_5_SYSTEM_MESSAGE and spec.template_def is None
    else:  # the -hf chat template: no system message unless the conversation brings one
        assert spec.system_message == "" and not (family_dirs[family, fmt] / "raylens.json").exists()


@pytest.mark.parametrize("family", sorted(FAMILY_LLM))
def test_hf_prompt_is_what_transformers_renders_from_the_checkpoint(family_dirs, family):
    """The official -hf chat template, through transformers' own apply_chat_template, equals raylens' render."""
    root = family_dirs[family, FORMAT_HF]
    spec = ModelSpec.from_dir(root)
    tokenizer = AutoTokenizer.from_pretrained(str(root))
    for system in (None, "Answer briefly."):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A red box."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "And these?"}]},
        ]
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        conversation = Conversation((Turn("What is this?", 1, "A red box."), Turn("And these?", 2)), system=system)
        assert render(spec.chat_template(), conversation, system_message=spec.system_message) == theirs
    assert theirs.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<image>\n")


@pytest.mark.parametrize("family,fmt", CASES)
def test_family_checkpoints_caption_on_the_transformers_engine(family_dirs, family, fmt):
    root = family_dirs[family, fmt]
    engine = create_engine("transformers", str(root))
    try:
        spec = engine.spec
        image = prepare_image(decode_image(image_bytes((300, 100))), spec.tiling())
        request = VLRequest("a", "Describe the image.", image)
        [result] = asyncio.run(engine.generate([request], SamplingParams(max_new_tokens=5)))
        assert result.error is None and result.num_output_tokens >= 1
        prompt = encode_request(request, spec=spec, tokenizer=engine.tokenizer).prompt
        system = "" if fmt == FORMAT_HF else f"<|im_start|>system\n{INTERNVL2_5_SYSTEM_MESSAGE}<|im_end|>\n"
        assert prompt.startswith(system + "<|im_start|>user\n<img>")
        assert prompt.endswith("</img>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n")
        assert result.num_input_tokens == len(engine.tokenizer(prompt)["input_ids"])
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ refusals
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_transformers_checkpoint_without_any_template_is_refused(tmp_path, family_dirs):
    root = _copy(family_dirs["internvl3", FORMAT_HF], tmp_path / "bare")
    (root / "chat_template.jinja").unlink()
    config = json.loads((root / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not guess"):
        ModelSpec.from_dir(root)
    (root / "raylens.json").write_text(json.dumps({"template": "internvl2_5"}))  # the user says which
    assert ModelSpec.from_dir(root).system_message == INTERNVL2_5_SYSTEM_MESSAGE


@pytest.mark.parametrize("jinja", [
    # Llama-3 style headers: not a layout raylens renders.
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    # ChatML, but images after the text: raylens would put them before it.
    HF_CHAT_TEMPLATE.replace("{% for content in message['content'] %}",
                             "{% for content in message['content'] | reverse %}"),
])
def test_a_chat_template_raylens_cannot_reproduce_is_refused(tmp_path, family_dirs, jinja):
    root = _copy(family_dirs["internvl3", FORMAT_HF], tmp_path / "odd")
    (root / "chat_template.jinja").write_text(jinja)
    with pytest.raises(CheckpointError, match="will not serve it with a guessed template"):
        ModelSpec.from_dir(root)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.pop("template"), "does not guess"),
    (lambda c: c["llm_config"].update(architectures=["InternLM3ForCausalLM"]), "InternLM3ForCausalLM"),
    (lambda c: c.update(ps_version="v1"), "ps_version"),
    (lambda c: c.update(select_layer=-4), "select_layer"),
    (lambda c: c.update(template="llama3-chat"), "llama3-chat"),
])
def test_original_checkpoints_raylens_cannot_serve_are_refused(tmp_path, family_dirs, change, match):
    root = _copy(family_dirs["internvl3", FORMAT_ORIGINAL], tmp_path / "orig")
    config = json.loads((root / "config.json").read_text())
    change(config)
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        ModelSpec.from_dir(root)


def test_every_registered_template_is_recognised_from_its_own_jinja():
    """The tokenizer chat templates raylens writes derive back to the template they came from."""
    from raylens.checkpoints.chat_templates import template_from_jinja
    from raylens.checkpoints.tokenizer import chat_template_for

    for name, template in TEMPLATES.items():
        derived = template_from_jinja(chat_template_for(template))
        # Hermes-2 and internlm2-chat share one layout: the first registered is the one found.
        assert derived.system_message == template.system_message
        assert (derived.sep, derived.user_role, derived.system_template) == (template.sep, template.user_role,
                                                                            template.system_template)
