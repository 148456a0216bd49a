"""Random-weight models: determinism, sizes (1b/2b on the meta device), saving, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from raylens.checkpoints.formats import FORMAT_HF, FORMAT_ORIGINAL, read_model_spec
from raylens.checkpoints.tiny import build_hf_model, main, write_tiny_checkpoint


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_hf_model("tiny", seed=1)
    b, _ = build_hf_model("tiny", seed=1)
    c, _ = build_hf_model("tiny", seed=2)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(torch.equal(sa[k], sc[k]) for k in sa)


def test_weights_do_not_depend_on_dtype_or_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    f32, _ = build_hf_model("tiny", seed=5)
    bf16, _ = build_hf_model("tiny", seed=5, dtype=torch.bfloat16)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    for (name, x), (_, y) in zip(f32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert y.dtype == torch.bfloat16
        assert torch.equal(x.to(torch.bfloat16), y), name


def test_no_parameter_is_constant():
    """Norms, biases and layer scales are perturbed too, so conversion tests see swapped tensors."""
    model, _ = build_hf_model("tiny", llm="internlm2")
    for name, param in model.named_parameters():
        assert param.numel() == 1 or param.std() > 0, name


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_tiny_dims(llm):
    model, tokenizer = build_hf_model("tiny", llm=llm)
    config = model.config
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers,
            config.vision_config.num_attention_heads, tuple(config.vision_config.image_size)) == (64, 2, 2, (112, 112))
    text = config.text_config
    dims = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert dims == (64, 2, 4, 2)
    assert text.model_type == {"qwen2": "qwen2", "internlm2": "llama"}[llm]
    assert text.vocab_size >= len(tokenizer)
    assert config.image_seq_length == 16
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()


def test_overrides_merge_and_unknown_ones_fail():
    model, _ = build_hf_model("tiny", text_config={"num_hidden_layers": 3}, vision_config={"hidden_size": 32},
                              tie_word_embeddings=True)
    assert model.config.text_config.num_hidden_layers == 3
    assert model.config.vision_config.hidden_size == 32
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    with pytest.raises(TypeError, match="unknown overrides"):
        build_hf_model("tiny", hidden_size=12)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_hf_model("tiny", text_config={"vocab_size": 100})
    with pytest.raises(ValueError, match="unknown size"):
        build_hf_model("7b")


@pytest.mark.parametrize("size, llm, expected_millions, vocab", [
    ("1b", "qwen2", 938.2, 151655),     # InternVL2-1B with an untied LM head (notes/internvl.md 1.5)
    ("2b", "internlm2", 2205.8, 92553),  # InternVL2-2B, the blog's 2.21B
])
def test_real_sizes_on_meta_device(size, llm, expected_millions, vocab):
    model, tokenizer = build_hf_model(size, device="meta")
    assert model.config.text_config.model_type == {"qwen2": "qwen2", "internlm2": "llama"}[llm]
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    total = sum(p.numel() for p in params)
    assert abs(total / 1e6 - expected_millions) < 0.1
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert abs(vision / 1e6 - 304.0) < 0.1
    assert model.config.text_config.vocab_size == vocab
    assert model.config.image_token_id < 512  # the image token is a real (trained) token of our tokenizer
    assert len(tokenizer) == vocab  # padded with placeholders, so any id the random model emits decodes
    assert tokenizer.decode([vocab - 1]) == f"<|unused_{vocab - 1}|>"
    assert model.config.image_seq_length == 256


@pytest.mark.parametrize("fmt", [FORMAT_ORIGINAL, FORMAT_HF])
def test_written_files(tmp_path, fmt):
    out = write_tiny_checkpoint(tmp_path / fmt, format=fmt, llm="internlm2", max_tiles=3)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    if fmt == FORMAT_ORIGINAL:
        assert {"configuration_internvl_chat.py", "configuration_intern_vit.py", "configuration_internlm2.py"} <= names
        assert config["auto_map"] == {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}
        assert config["llm_config"]["auto_map"] == {"AutoConfig": "configuration_internlm2.InternLM2Config"}
        assert config["max_dynamic_patch"] == 3
    else:
        assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
        assert json.loads((out / "raylens.json").read_text()) == {
            "template": "internlm2-chat", "min_tiles": 1, "max_tiles": 3, "use_thumbnail": True}
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert (out / "chat_template.jinja").is_file() or "chat_template" in tokenizer_config


def test_cli(tmp_path, capsys):
    out = main([str(tmp_path / "cli"), "--format", "internvl_hf", "--llm", "internlm2", "--seed", "4",
                "--max-tiles", "2", "--dtype", "float32"])
    spec = read_model_spec(out)
    assert (spec.format, spec.max_tiles, spec.torch_dtype) == (FORMAT_HF, 2, "float32")
    assert "wrote internvl_hf tiny checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--size" in capsys.readouterr().out
