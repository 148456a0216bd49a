"""`load_hf_model`: both formats of the same weights behave identically."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from raylens.checkpoints.formats import FORMAT_HF, FORMAT_ORIGINAL
from raylens.checkpoints.loading import load_hf_model, read_safetensors
from raylens.checkpoints.tiny import write_safetensors
from raylens.prompts import build_prompt, expand_image_placeholders, get_template

pytest_plugins = ("tiny_dirs_fixture",)  # the `tiny_dirs` fixture

NUM_TILES = 2


def _inputs(tokenizer, spec, seed=0):
    """pixel_values for 2 tiles and the prompt ids with 2 x 16 <IMG_CONTEXT> tokens, as the engine builds them."""
    prompt = build_prompt(get_template(spec.template), "Describe the image.")
    prompt = expand_image_placeholders(prompt, [NUM_TILES * spec.image_tokens_per_tile])
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(NUM_TILES, 3, spec.tile_size, spec.tile_size, generator=generator)
    return input_ids, pixel_values


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_both_formats_give_identical_logits_and_generations(tiny_dirs, llm):
    loaded = {fmt: load_hf_model(tiny_dirs[fmt, llm]) for fmt in (FORMAT_ORIGINAL, FORMAT_HF)}
    (orig, tok_o, spec_o), (hf, tok_h, _) = loaded[FORMAT_ORIGINAL], loaded[FORMAT_HF]
    assert tok_o.get_vocab() == tok_h.get_vocab()
    input_ids, pixel_values = _inputs(tok_o, spec_o)
    assert (input_ids == orig.config.image_token_id).sum() == NUM_TILES * 16
    assert orig.config.image_token_id == hf.config.image_token_id

    with torch.no_grad():
        logits_o = orig(input_ids=input_ids, pixel_values=pixel_values).logits
        logits_h = hf(input_ids=input_ids, pixel_values=pixel_values).logits
        # The image matters: other pixels give other logits (so the test would see a broken vision path).
        logits_other = orig(input_ids=input_ids, pixel_values=pixel_values.flip(-1)).logits
    assert torch.equal(logits_o, logits_h)
    assert not torch.allclose(logits_o, logits_other)

    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                  max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        out_o = orig.generate(**kwargs)
        out_h = hf.generate(**kwargs)
    assert torch.equal(out_o, out_h)
    assert out_o.shape[1] > input_ids.shape[1]


def test_loaded_model_matches_the_built_one(tiny_dirs):
    """The bf16 file of the original format reloads to the bf16-rounded weights of the seed's model."""
    from raylens.checkpoints.tiny import build_hf_model

    built, _ = build_hf_model("tiny", llm="internlm2", seed=0, dtype=torch.bfloat16)
    loaded, _, _ = load_hf_model(tiny_dirs[FORMAT_ORIGINAL, "internlm2"], dtype=torch.bfloat16)
    built_state, loaded_state = built.state_dict(), loaded.state_dict()
    assert set(built_state) == set(loaded_state)
    for name, tensor in built_state.items():
        assert torch.equal(loaded_state[name], tensor), name


def test_stop_tokens_and_dtype(tiny_dirs):
    model, tokenizer, spec = load_hf_model(tiny_dirs[FORMAT_ORIGINAL, "qwen2"], dtype="auto")
    assert model.dtype == torch.bfloat16
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos  # Hermes-2 also stops on <|endoftext|>
    assert not model.training


def test_sharded_weights_load_the_same(tmp_path, tiny_dirs):
    src = tiny_dirs[FORMAT_ORIGINAL, "qwen2"]
    sharded = tmp_path / "sharded"
    shutil.copytree(src, sharded)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    paths = write_safetensors(tensors, sharded, max_shard_bytes=20_000)
    assert len(paths) > 2 and (sharded / "model.safetensors.index.json").is_file()
    assert read_safetensors(sharded).keys() == tensors.keys()
    a, _, _ = load_hf_model(src)
    b, _, _ = load_hf_model(sharded)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_tied_checkpoint_without_lm_head(tmp_path, tiny_dirs):
    """InternVL2-1B-style: llm_config ties the head, and the file may not store it separately."""
    ckpt = tmp_path / "tied"
    shutil.copytree(tiny_dirs[FORMAT_ORIGINAL, "qwen2"], ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["language_model.lm_head.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    model, _, _ = load_hf_model(ckpt)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_untied_head_wins_over_a_tie_flag(tmp_path, tiny_dirs):
    ckpt = tmp_path / "flag"
    shutil.copytree(tiny_dirs[FORMAT_ORIGINAL, "qwen2"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    model, _, _ = load_hf_model(ckpt)
    reference, _, _ = load_hf_model(tiny_dirs[FORMAT_ORIGINAL, "qwen2"])
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def test_missing_weights_are_reported(tmp_path, tiny_dirs):
    ckpt = tmp_path / "partial"
    shutil.copytree(tiny_dirs[FORMAT_ORIGINAL, "qwen2"], ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["mlp1.1.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match="multi_modal_projector.linear_1.weight"):
        load_hf_model(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_model(ckpt)
