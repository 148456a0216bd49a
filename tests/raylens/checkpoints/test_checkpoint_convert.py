"""Original <-> transformers conversion: exact round trips and an independent InternLM2 wqkv check."""
from __future__ import annotations

import math

import pytest
import torch

from raylens.checkpoints.convert import (
    fuse_internlm2_wqkv,
    hf_config_from_original,
    hf_to_original_state_dict,
    original_config_from_hf,
    original_to_hf_state_dict,
    split_internlm2_wqkv,
)
from raylens.checkpoints.tiny import LLM_KINDS, build_hf_model


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def tiny(request):
    model, tokenizer = build_hf_model("tiny", llm=request.param, seed=3)
    kind = LLM_KINDS[request.param]
    original_config = original_config_from_hf(model.config, template=kind.template, max_tiles=6,
                                              llm_architecture=kind.architecture)
    return model, tokenizer, kind, original_config


def test_state_dict_round_trip_is_exact(tiny):
    model, _, kind, original_config = tiny
    hf_state = model.state_dict()
    original = hf_to_original_state_dict(hf_state, model.config, llm_architecture=kind.architecture)
    back = original_to_hf_state_dict(original, original_config)
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name


def test_original_names_are_the_hub_names(tiny):
    model, _, kind, _ = tiny
    original = hf_to_original_state_dict(model.state_dict(), model.config, llm_architecture=kind.architecture)
    assert "vision_model.embeddings.class_embedding" in original
    assert "vision_model.encoder.layers.1.attn.qkv.weight" in original
    assert "vision_model.encoder.layers.0.ls1" in original
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"} <= set(original)
    if kind.architecture == "InternLM2ForCausalLM":
        assert {"language_model.model.tok_embeddings.weight", "language_model.output.weight",
                "language_model.model.layers.0.attention.wqkv.weight",
                "language_model.model.layers.0.feed_forward.w1.weight",
                "language_model.model.layers.0.attention_norm.weight"} <= set(original)
        assert original["language_model.model.layers.0.attention.wqkv.weight"].shape == ((4 + 2 * 2) * 16, 64)
    else:
        assert {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                "language_model.model.layers.0.self_attn.q_proj.bias"} <= set(original)
    assert all(k.startswith(("vision_model.", "mlp1.", "language_model.")) for k in original)


def test_config_round_trip(tiny):
    model, tokenizer, kind, original_config = tiny
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    hf = hf_config_from_original(original_config, image_token_id=image_token_id)
    ours = model.config
    assert hf.image_token_id == ours.image_token_id
    assert hf.image_seq_length == ours.image_seq_length == 16
    assert hf.tie_word_embeddings == ours.tie_word_embeddings
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "attention_bias",
                  "use_qk_norm", "norm_type", "layer_norm_eps", "image_size", "patch_size"):
        assert getattr(hf.vision_config, field) == getattr(ours.vision_config, field), field
    for field in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "eos_token_id",
                  "tie_word_embeddings"):
        assert getattr(hf.text_config, field) == getattr(ours.text_config, field), field
    assert hf.text_config.rope_parameters["rope_theta"] == ours.text_config.rope_parameters["rope_theta"]


def test_unknown_original_keys_are_refused(tiny):
    model, _, kind, original_config = tiny
    original = hf_to_original_state_dict(model.state_dict(), model.config, llm_architecture=kind.architecture)
    original["vision_model.encoder.layers.0.attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        original_to_hf_state_dict(original, original_config)


def test_v1_pixel_shuffle_is_refused(tiny):
    _, _, _, original_config = tiny
    with pytest.raises(ValueError, match="ps_version"):
        hf_config_from_original({**original_config, "ps_version": "v1"}, image_token_id=5)


def test_wqkv_split_and_fuse_are_inverse():
    wqkv = torch.randn((8 // 2 + 2) * 2 * 16, 64)
    q, k, v = split_internlm2_wqkv(wqkv, num_heads=8, num_kv_heads=2, head_dim=16)
    assert (q.shape, k.shape, v.shape) == ((128, 64), (32, 64), (32, 64))
    assert torch.equal(fuse_internlm2_wqkv(q, k, v, 8, 2, 16), wqkv)


# --- independent InternLM2 attention reference -------------------------------------------------------


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def internlm2_attention_reference(x, wqkv, wo, *, num_heads, num_kv_heads, theta):
    """One InternLM2 attention layer written from the original layout (no transformers code).

    wqkv rows are (kv_heads, q_per_kv + 2, head_dim): per KV group its query heads, then k, then v. Query head
    h = g * q_per_kv + j belongs to KV group g. RoPE is the rotate-half kind on positions 0..T-1; causal.
    """
    seq, hidden = x.shape
    head_dim = hidden // num_heads
    q_per_kv = num_heads // num_kv_heads
    qkv = (x @ wqkv.T).view(seq, num_kv_heads, q_per_kv + 2, head_dim)
    q = qkv[:, :, :q_per_kv].reshape(seq, num_heads, head_dim)
    k = qkv[:, :, q_per_kv]
    v = qkv[:, :, q_per_kv + 1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :].float()
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :].float()
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    out = torch.empty(seq, num_heads, head_dim)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for h in range(num_heads):
        g = h // q_per_kv
        scores = (q[:, h] @ k[:, g].T) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, g]
    return out.reshape(seq, hidden) @ wo.T


def test_internlm2_wqkv_layout_against_reference():
    # 8 heads over 2 KV heads: 4 query heads per group, so a wrong grouping cannot pass by symmetry.
    model, _ = build_hf_model("tiny", llm="internlm2", seed=11,
                              text_config={"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8})
    text = model.config.text_config
    original = hf_to_original_state_dict(model.state_dict(), model.config, llm_architecture="InternLM2ForCausalLM")
    wqkv = original["language_model.model.layers.0.attention.wqkv.weight"]
    wo = original["language_model.model.layers.0.attention.wo.weight"]

    x = torch.randn(7, text.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = internlm2_attention_reference(x, wqkv, wo, num_heads=8, num_kv_heads=2,
                                             theta=text.rope_parameters["rope_theta"])

    lm = model.model.language_model
    position_ids = torch.arange(7)[None]
    with torch.no_grad():
        cos_sin = lm.rotary_emb(x[None], position_ids)
        got, _ = lm.layers[0].self_attn(x[None], position_embeddings=cos_sin, attention_mask=None)
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5)
