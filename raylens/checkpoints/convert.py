"""Original InternVL2 (`InternVLChatModel`) <-> transformers `InternVLForConditionalGeneration`, both ways.

Pure functions on config dicts and `{name: tensor}` dicts: no files, no models, no remote code. The
transformers engine loads original checkpoints through `original_to_hf_*`; the tiny-checkpoint writer and
fine-tuning save through `*_to_original`, so what lmdeploy reads is built from the same tables.

Name map (original -> transformers), N = layer index:

    vision_model.embeddings.class_embedding        model.vision_tower.embeddings.cls_token
    vision_model.embeddings.position_embedding     model.vision_tower.embeddings.position_embeddings
    vision_model.embeddings.patch_embedding.*      model.vision_tower.embeddings.patch_embeddings.projection.*
    vision_model.encoder.layers.N.attn.qkv.*       ...encoder.layer.N.attention.{q,k,v}_proj.*  (3 equal row blocks)
    ...layers.N.attn.proj.* / attn.{q,k}_norm.*    ...layer.N.attention.projection_layer.* / attention.{q,k}_norm.*
    ...layers.N.norm1.* / norm2.*                  ...layer.N.layernorm_before.* / layernorm_after.*
    ...layers.N.ls1 / ls2                          ...layer.N.lambda_1 / lambda_2
    ...layers.N.mlp.fc1.* / mlp.fc2.*              ...layer.N.mlp.fc1.* / mlp.fc2.*
    mlp1.0.* / mlp1.1.* / mlp1.3.*                 model.multi_modal_projector.layer_norm.* / linear_1.* / linear_2.*
    language_model.model.*                         model.language_model.*   (Qwen2, Llama, Phi-3: same names)
    language_model.lm_head.weight                  lm_head.weight

InternLM2 has no transformers class; it is the same math as Llama (RMSNorm, SwiGLU, rotate-half RoPE, GQA),
so it becomes a Llama text model:

    language_model.model.tok_embeddings.weight     model.language_model.embed_tokens.weight
    ...layers.N.attention.wqkv.*                   ...layers.N.self_attn.{q,k,v}_proj.*   (see below)
    ...layers.N.attention.wo.*                     ...layers.N.self_attn.o_proj.*
    ...layers.N.feed_forward.w1 / w3 / w2          ...layers.N.mlp.gate_proj / up_proj / down_proj
    ...layers.N.attention_norm / ffn_norm          ...layers.N.input_layernorm / post_attention_layernorm
    language_model.model.norm.weight               model.language_model.norm.weight
    language_model.output.weight                   lm_head.weight

`wqkv` is grouped per KV head: its rows are `(num_kv_heads, q_per_kv + 2, head_dim)`, i.e. for each KV head
its `q_per_kv` query heads, then its key head, then its value head. Llama's GQA maps query head i to KV head
i // q_per_kv, so taking the first `q_per_kv` slots of every group, in order, gives q_proj directly.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from transformers import InternVLConfig

QWEN2 = "Qwen2ForCausalLM"
INTERNLM2 = "InternLM2ForCausalLM"
LLAMA = "LlamaForCausalLM"
PHI3 = "Phi3ForCausalLM"
# LLMs whose original weight names are already transformers' names.
NATIVE_LLM_TYPES = {QWEN2: "qwen2", LLAMA: "llama", PHI3: "phi3"}

# Keys of an LLM config dict that describe a file or a library rather than the model.
_NON_MODEL_KEYS = {"auto_map", "transformers_version", "_name_or_path", "name_or_path", "model_type",
                   "torch_dtype", "dtype", "_attn_implementation_autoset", "attn_implementation"}
# Buffers some old checkpoints carry; recomputed by the model, never loaded.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")

_VISION_PREFIX_ORIG = "vision_model."
_VISION_PREFIX_HF = "model.vision_tower."
_LLM_PREFIX_ORIG = "language_model."

# (original suffix, transformers suffix) inside one vision encoder layer; qkv is handled separately.
_VISION_LAYER_RENAMES = (
    ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
_VISION_EXACT_RENAMES = {
    f"vision_model.embeddings.{old}": f"model.vision_tower.embeddings.{new}"
    for old, new in (
        ("class_embedding", "cls_token"),
        ("position_embedding", "position_embeddings"),
        ("patch_embedding.weight", "patch_embeddings.projection.weight"),
        ("patch_embedding.bias", "patch_embeddings.projection.bias"),
    )
}
_PROJECTOR_RENAMES = {"mlp1.0.": "model.multi_modal_projector.layer_norm.",
                      "mlp1.1.": "model.multi_modal_projector.linear_1.",
                      "mlp1.3.": "model.multi_modal_projector.linear_2."}
# (original suffix, transformers suffix) inside one InternLM2 decoder layer; wqkv is handled separately.
_INTERNLM2_LAYER_RENAMES = (
    ("attention.wo.", "self_attn.o_proj."),
    ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("attention_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
)


def _invert(pairs):
    return tuple((b, a) for a, b in pairs)


def _rename_within(name: str, renames) -> str | None:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def _llm_architecture(llm_config: Mapping[str, Any]) -> str:
    architectures = llm_config.get("architectures") or []
    if not architectures:
        raise ValueError("llm_config has no 'architectures'; cannot tell which LLM the checkpoint holds")
    arch = architectures[0]
    if arch != INTERNLM2 and arch not in NATIVE_LLM_TYPES:
        raise ValueError(f"unsupported LLM architecture {arch!r}; "
                         f"raylens converts {INTERNLM2} and {sorted(NATIVE_LLM_TYPES)}")
    return arch


def _head_layout(hidden_size: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None = None):
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    return num_kv_heads, num_heads // num_kv_heads, head_dim


# --- configs ----------------------------------------------------------------------------------------


def _rope_parameters_from_internlm2(llm: Mapping[str, Any]) -> dict[str, Any]:
    theta = float(llm.get("rope_theta", 10000.0))
    scaling = llm.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta}
    if rope_type != "default":
        params["factor"] = float(scaling["factor"])
    return params


def _llama_text_config_from_internlm2(llm: Mapping[str, Any]) -> dict[str, Any]:
    hidden, heads = llm["hidden_size"], llm["num_attention_heads"]
    kv_heads = llm.get("num_key_value_heads") or heads
    return {
        "model_type": "llama",
        "architectures": [LLAMA],
        "vocab_size": llm["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": llm["intermediate_size"],
        "num_hidden_layers": llm["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": llm.get("hidden_act", "silu"),
        "max_position_embeddings": llm.get("max_position_embeddings", 2048),
        "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
        "initializer_range": llm.get("initializer_range", 0.02),
        "attention_bias": bool(llm.get("bias", True)),  # InternLM2 `bias` covers wqkv and wo, as Llama's does
        "mlp_bias": False,  # InternLM2's feed-forward never has biases
        "rope_parameters": _rope_parameters_from_internlm2(llm),
        "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
        "pad_token_id": llm.get("pad_token_id"),
        "bos_token_id": llm.get("bos_token_id"),
        "eos_token_id": llm.get("eos_token_id"),
    }


def hf_config_from_original(original_config: Mapping[str, Any], *, image_token_id: int) -> InternVLConfig:
    """The transformers InternVLConfig for an original config.json (as a dict).

    `image_token_id` is the tokenizer's id of `<IMG_CONTEXT>`: the original format does not store it (its
    model code looks it up at chat time), transformers needs it in the config.
    """
    cfg = original_config
    if cfg.get("ps_version", "v1") != "v2":
        raise ValueError(f"ps_version {cfg.get('ps_version', 'v1 (default)')!r} is not supported: transformers' "
                         "InternVL implements the v2 pixel shuffle that every InternVL2 checkpoint uses")
    vision = cfg["vision_config"]
    llm = cfg["llm_config"]
    arch = _llm_architecture(llm)
    image_size = cfg.get("force_image_size") or vision["image_size"]
    patch_size = vision["patch_size"]
    ratio = float(cfg.get("downsample_ratio", 0.5))
    vision_config = {
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "hidden_act": vision.get("hidden_act", "gelu"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "attention_bias": bool(vision.get("qkv_bias", False)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": vision.get("num_channels", 3),
        "attention_dropout": vision.get("attention_dropout", 0.0),
        "projection_dropout": vision.get("dropout", 0.0),
        "initializer_range": vision.get("initializer_range", 0.02),
        "layer_scale_init_value": vision.get("initializer_factor", 0.1),
        "use_mean_pooling": True,  # InternViT has no final norm; mean pooling makes it an Identity
        "use_absolute_position_embeddings": True,
    }
    if arch == INTERNLM2:
        text_config = _llama_text_config_from_internlm2(llm)
    else:
        text_config = {k: v for k, v in llm.items() if k not in _NON_MODEL_KEYS}
        text_config["model_type"] = NATIVE_LLM_TYPES[arch]
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or llm.get("torch_dtype")
    tokens_per_tile = int((image_size // patch_size) ** 2 * ratio**2)
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
        dtype=dtype,
    )


def _rope_fields_to_internlm2(rope: Mapping[str, Any] | None) -> dict[str, Any]:
    rope = dict(rope or {})
    fields: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", 10000.0)), "rope_scaling": None}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        if rope_type not in ("dynamic", "linear"):
            raise ValueError(f"InternLM2 supports dynamic or linear RoPE scaling, not {rope_type!r}")
        fields["rope_scaling"] = {"type": rope_type, "factor": float(rope["factor"])}
    return fields


def _internlm2_config_from_llama(text, dtype: str) -> dict[str, Any]:
    from raylens.checkpoints.remote_code import INTERNLM2_AUTO_CONFIG_CLASS

    if getattr(text, "mlp_bias", False):
        raise ValueError("an InternLM2 LLM has no MLP biases, but text_config.mlp_bias is set")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim * text.num_attention_heads != text.hidden_size:
        raise ValueError("InternLM2 needs head_dim * num_attention_heads == hidden_size")
    return {
        "architectures": [INTERNLM2],
        "model_type": "internlm2",
        "auto_map": {"AutoConfig": INTERNLM2_AUTO_CONFIG_CLASS},
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "initializer_range": text.initializer_range,
        "bias": bool(text.attention_bias),
        **_rope_fields_to_internlm2(text.rope_parameters),
        "tie_word_embeddings": bool(text.tie_word_embeddings),
        "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def _native_llm_config(text, arch: str, dtype: str) -> dict[str, Any]:
    expected = NATIVE_LLM_TYPES[arch]
    if text.model_type != expected:
        raise ValueError(f"llm_architecture {arch} needs a {expected!r} text config, got {text.model_type!r}")
    llm = text.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "output_attentions"):
        llm.pop(key, None)
    llm["architectures"] = [arch]
    llm["torch_dtype"] = dtype
    # Older readers (transformers 4.x, lmdeploy's own code) look for rope_theta at the top level.
    rope = llm.get("rope_parameters") or {}
    if "rope_theta" in rope:
        llm["rope_theta"] = rope["rope_theta"]
    return llm


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "bfloat16"
    return str(dtype).removeprefix("torch.")


def original_config_from_hf(hf_config: InternVLConfig, *, template: str, max_tiles: int, llm_architecture: str,
                            torch_dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """The original (hub-format) config.json dict for a transformers InternVLConfig.

    `llm_architecture` names the LLM to write: "Qwen2ForCausalLM" for a qwen2 text config, "InternLM2ForCausalLM"
    for a Llama text config that should be stored as InternLM2 (fused wqkv), "LlamaForCausalLM" to keep Llama.
    `torch_dtype` is the dtype the weights are saved in (default: the config's own).
    """
    vision = hf_config.vision_config
    text = hf_config.text_config
    dtype = _dtype_name(torch_dtype or hf_config.dtype or text.dtype)
    if llm_architecture == INTERNLM2:
        if text.model_type != "llama":
            raise ValueError(f"{INTERNLM2} is written from a llama text config, got {text.model_type!r}")
        llm = _internlm2_config_from_llama(text, dtype)
    elif llm_architecture in NATIVE_LLM_TYPES:
        llm = _native_llm_config(text, llm_architecture, dtype)
    else:
        raise ValueError(f"unsupported llm_architecture {llm_architecture!r}")
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError("InternVL2 drops the CLS token (vision_feature_select_strategy 'default')")
    image_size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch_size = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    from raylens.checkpoints.remote_code import AUTO_CONFIG_CLASS

    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": AUTO_CONFIG_CLASS},
        "template": template,
        "force_image_size": image_size,
        "downsample_ratio": hf_config.downsample_ratio,
        "dynamic_image_size": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": max_tiles,
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": hf_config.vision_feature_layer,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,  # as the InternVL repo forces; the LLM's own flag is in llm_config
        "torch_dtype": dtype,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "hidden_act": vision.hidden_act,
            "layer_norm_eps": vision.layer_norm_eps,
            "norm_type": vision.norm_type,
            "qkv_bias": bool(vision.attention_bias),
            "qk_normalization": bool(vision.use_qk_norm),
            "image_size": image_size,
            "patch_size": patch_size,
            "num_channels": vision.num_channels,
            "dropout": vision.projection_dropout,
            "attention_dropout": vision.attention_dropout,
            "drop_path_rate": 0.0,
            "initializer_range": vision.initializer_range,
            "initializer_factor": vision.layer_scale_init_value,
            "use_flash_attn": False,
            "torch_dtype": dtype,
        },
        "llm_config": llm,
    }


# --- state dicts --------------------------------------------------------------------------------------


def _split_rows(tensor: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] % parts:
        raise ValueError(f"cannot split {tuple(tensor.shape)} into {parts} equal row blocks")
    return tuple(t.contiguous() for t in tensor.chunk(parts, dim=0))


def split_internlm2_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """(q, k, v) from an InternLM2 fused wqkv weight (or bias), rows grouped (kv_heads, q_per_kv + 2, head_dim)."""
    q_per_kv = num_heads // num_kv_heads
    grouped = wqkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, *wqkv.shape[1:])
    q = grouped[:, :q_per_kv].reshape(num_heads * head_dim, *wqkv.shape[1:])
    k = grouped[:, q_per_kv].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    v = grouped[:, q_per_kv + 1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_internlm2_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                        head_dim: int) -> torch.Tensor:
    """The inverse of `split_internlm2_wqkv`."""
    q_per_kv = num_heads // num_kv_heads
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(num_kv_heads, q_per_kv, head_dim, *rest),
         k.reshape(num_kv_heads, 1, head_dim, *rest),
         v.reshape(num_kv_heads, 1, head_dim, *rest)],
        dim=1,
    )
    return grouped.reshape(num_kv_heads * (q_per_kv + 2) * head_dim, *rest)


def _vision_to_hf(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    if name in _VISION_EXACT_RENAMES:
        out[_VISION_EXACT_RENAMES[name]] = tensor
        return True
    m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.+)$", name)
    if not m:
        return False
    layer, rest = m.groups()
    prefix = f"{_VISION_PREFIX_HF}encoder.layer.{layer}."
    if rest.startswith("attn.qkv."):
        kind = rest[len("attn.qkv."):]
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), _split_rows(tensor, 3), strict=True):
            out[f"{prefix}attention.{proj}.{kind}"] = part
        return True
    if rest in ("ls1", "ls2"):
        out[prefix + ("lambda_1" if rest == "ls1" else "lambda_2")] = tensor
        return True
    renamed = _rename_within(rest, _VISION_LAYER_RENAMES)
    if renamed is None:
        return False
    out[prefix + renamed] = tensor
    return True


def _internlm2_to_hf(name: str, tensor: torch.Tensor, llm: Mapping[str, Any], out: dict[str, torch.Tensor]) -> bool:
    if name == "model.tok_embeddings.weight":
        out["model.language_model.embed_tokens.weight"] = tensor
    elif name == "output.weight":
        out["lm_head.weight"] = tensor
    elif name == "model.norm.weight":
        out["model.language_model.norm.weight"] = tensor
    else:
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            return False
        layer, rest = m.groups()
        prefix = f"model.language_model.layers.{layer}."
        if rest.startswith("attention.wqkv."):
            kind = rest[len("attention.wqkv."):]
            layout = _head_layout(llm["hidden_size"], llm["num_attention_heads"], llm.get("num_key_value_heads"))
            kv_heads, _, head_dim = layout
            q, k, v = split_internlm2_wqkv(tensor, llm["num_attention_heads"], kv_heads, head_dim)
            out[f"{prefix}self_attn.q_proj.{kind}"] = q
            out[f"{prefix}self_attn.k_proj.{kind}"] = k
            out[f"{prefix}self_attn.v_proj.{kind}"] = v
            return True
        renamed = _rename_within(rest, _INTERNLM2_LAYER_RENAMES)
        if renamed is None:
            return False
        out[prefix + renamed] = tensor
    return True


def _native_llm_to_hf(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    if name == "lm_head.weight":
        out["lm_head.weight"] = tensor
    elif name.startswith("model."):
        out["model.language_model." + name[len("model."):]] = tensor
    else:
        return False
    return True


def original_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor],
                              original_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename (and split fused qkv / wqkv) an original InternVL2 state dict into transformers' names.

    Raises ValueError listing every key it does not know, so a new checkpoint variant fails loudly.
    A checkpoint with tied embeddings may lack the LM head; the result then lacks `lm_head.weight` too.
    """
    llm = original_config["llm_config"]
    arch = _llm_architecture(llm)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state_dict.items():
        if _IGNORED.search(name):
            continue
        if name.startswith(_VISION_PREFIX_ORIG):
            ok = _vision_to_hf(name, tensor, out)
        elif name.startswith("mlp1."):
            renamed = _rename_within(name, tuple(_PROJECTOR_RENAMES.items()))
            ok = renamed is not None
            if ok:
                out[renamed] = tensor
        elif name.startswith(_LLM_PREFIX_ORIG):
            inner = name[len(_LLM_PREFIX_ORIG):]
            ok = (_internlm2_to_hf(inner, tensor, llm, out) if arch == INTERNLM2
                  else _native_llm_to_hf(inner, tensor, out))
        else:
            ok = False
        if not ok:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        raise ValueError(f"{len(unknown)} weights have names an InternVL2 {arch} checkpoint should not have: {shown}")
    return out


def _vision_to_original(name: str, tensor: torch.Tensor, state_dict, out: dict[str, torch.Tensor]) -> bool:
    inverse_exact = {v: k for k, v in _VISION_EXACT_RENAMES.items()}
    if name in inverse_exact:
        out[inverse_exact[name]] = tensor
        return True
    m = re.match(r"model\.vision_tower\.encoder\.layer\.(\d+)\.(.+)$", name)
    if not m:
        return False
    layer, rest = m.groups()
    prefix = f"{_VISION_PREFIX_ORIG}encoder.layers.{layer}."
    qkv = re.match(r"attention\.(q|k|v)_proj\.(weight|bias)$", rest)
    if qkv:
        if qkv.group(1) == "q":  # written once, from all three parts
            kind = qkv.group(2)
            hf_prefix = name[: -len(rest)] + "attention."
            parts = [state_dict[f"{hf_prefix}{p}_proj.{kind}"] for p in "qkv"]
            out[f"{prefix}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
        return True
    if rest in ("lambda_1", "lambda_2"):
        out[prefix + ("ls1" if rest == "lambda_1" else "ls2")] = tensor
        return True
    renamed = _rename_within(rest, _invert(_VISION_LAYER_RENAMES))
    if renamed is None:
        return False
    out[prefix + renamed] = tensor
    return True


def _llama_to_internlm2(name: str, tensor: torch.Tensor, state_dict, text, out: dict[str, torch.Tensor]) -> bool:
    if name == "model.language_model.embed_tokens.weight":
        out["language_model.model.tok_embeddings.weight"] = tensor
    elif name == "lm_head.weight":
        out["language_model.output.weight"] = tensor
    elif name == "model.language_model.norm.weight":
        out["language_model.model.norm.weight"] = tensor
    else:
        m = re.match(r"model\.language_model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            return False
        layer, rest = m.groups()
        prefix = f"language_model.model.layers.{layer}."
        qkv = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
        if qkv:
            if qkv.group(1) == "q":
                kind = qkv.group(2)
                hf_prefix = name[: -len(rest)] + "self_attn."
                kv_heads, _, head_dim = _head_layout(text.hidden_size, text.num_attention_heads,
                                                     text.num_key_value_heads, getattr(text, "head_dim", None))
                q, k, v = (state_dict[f"{hf_prefix}{p}_proj.{kind}"] for p in "qkv")
                out[f"{prefix}attention.wqkv.{kind}"] = fuse_internlm2_wqkv(
                    q, k, v, text.num_attention_heads, kv_heads, head_dim)
            return True
        renamed = _rename_within(rest, _invert(_INTERNLM2_LAYER_RENAMES))
        if renamed is None:
            return False
        out[prefix + renamed] = tensor
    return True


def _native_llm_to_original(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    if name == "lm_head.weight":
        out["language_model.lm_head.weight"] = tensor
    elif name.startswith("model.language_model."):
        out["language_model.model." + name[len("model.language_model."):]] = tensor
    else:
        return False
    return True


def hf_to_original_state_dict(state_dict: Mapping[str, torch.Tensor], hf_config: InternVLConfig, *,
                              llm_architecture: str) -> dict[str, torch.Tensor]:
    """The exact inverse of `original_to_hf_state_dict` (tensors are reused, except fused qkv / wqkv).

    With tied embeddings the LM head is still written (as its own entry): lmdeploy's InternLM2 always loads
    `output.weight`, and a missing key there would be silently left uninitialised.
    """
    if llm_architecture != INTERNLM2 and llm_architecture not in NATIVE_LLM_TYPES:
        raise ValueError(f"unsupported llm_architecture {llm_architecture!r}")
    text = hf_config.text_config
    state = dict(state_dict)
    if "lm_head.weight" not in state and "model.language_model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    projector = {v: k for k, v in _PROJECTOR_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if _IGNORED.search(name):
            continue
        if name.startswith(_VISION_PREFIX_HF):
            ok = _vision_to_original(name, tensor, state, out)
        elif name.startswith("model.multi_modal_projector."):
            renamed = _rename_within(name, tuple(projector.items()))
            ok = renamed is not None
            if ok:
                out[renamed] = tensor
        elif name.startswith("model.language_model.") or name == "lm_head.weight":
            ok = (_llama_to_internlm2(name, tensor, state, text, out) if llm_architecture == INTERNLM2
                  else _native_llm_to_original(name, tensor, out))
        else:
            ok = False
        if not ok:
            unknown.append(name)
    if unknown:
        raise ValueError(f"cannot map {len(unknown)} transformers weights to the original format: {unknown[:10]}")
    return out
