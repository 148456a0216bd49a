"""Load a checkpoint directory of either format as a transformers `InternVLForConditionalGeneration`.

Why one loader: the transformers engine, the demo trainer and fine-tuning all want the same model class
whatever they were pointed at. transformers-native directories go through `from_pretrained`. Original
InternVL2 directories are read as data: config.json + safetensors, converted in memory by `convert.py`.
Their remote code is never executed (it does not even import under transformers 5, notes/internvl.md 4).

The tokenizer is `AutoTokenizer.from_pretrained(dir)`; only for the original format with
trust_remote_code=True, because InternVL2-2B/8B ship InternLM2's sentencepiece tokenizer as remote code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, InternVLForConditionalGeneration
from transformers.initialization import no_init_weights

from raylens.checkpoints.convert import hf_config_from_original, original_to_hf_state_dict
from raylens.checkpoints.formats import FORMAT_ORIGINAL, ModelSpec, read_json, read_model_spec
from raylens.prompts import IMG_CONTEXT

_EMBED = "model.language_model.embed_tokens.weight"
_HEAD = "lm_head.weight"


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json` (CPU)."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {index.name} but missing")
            tensors.update(load_file(str(path)))
        return tensors
    others = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {others}: convert PyTorch .bin weights to safetensors first)" if others else ""
    raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json{hint}")


def _resolve_dtype(dtype: torch.dtype | str, spec: ModelSpec) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = spec.torch_dtype if dtype == "auto" else str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def compute_dtype(name: str | None, device_type: str) -> torch.dtype:
    """The dtype to run a model in: `name` ("bfloat16", ...), or for None and "auto" bfloat16 on CUDA and
    float32 elsewhere (CPUs have no fast bfloat16 matmul). Shared by inference and training."""
    if name in (None, "auto"):
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, name)


def _token_id(tokenizer, token: str, model_dir: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer of {model_dir} has no {token!r} token")
    return token_id


def _reconcile_lm_head(hf_config, state: dict[str, torch.Tensor]) -> None:
    """Tie the LM head only when the checkpoint really holds one matrix for both.

    InternVL2-1B's llm_config says tie_word_embeddings true, yet the InternVL repo saves an untied head, so
    the weights, not the flag, decide: a head that differs from the embeddings unties the model.
    """
    if _HEAD in state and _EMBED in state and not torch.equal(state[_HEAD], state[_EMBED]):
        hf_config.tie_word_embeddings = False
        hf_config.text_config.tie_word_embeddings = False
    elif _HEAD not in state and not hf_config.tie_word_embeddings:
        raise ValueError("the checkpoint has no LM head weights and does not tie them to the embeddings")


def _load_original(model_dir: Path, tokenizer, dtype: torch.dtype, device) -> InternVLForConditionalGeneration:
    config = read_json(model_dir / "config.json")
    hf_config = hf_config_from_original(config, image_token_id=_token_id(tokenizer, IMG_CONTEXT, model_dir))
    state = original_to_hf_state_dict(read_safetensors(model_dir), config)
    _reconcile_lm_head(hf_config, state)
    # Every parameter is overwritten below, so skip transformers' random init (slow for 2B on a CPU).
    with torch.device(device), no_init_weights():
        model = InternVLForConditionalGeneration._from_config(hf_config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if hf_config.tie_word_embeddings:
        missing = [k for k in missing if k != _HEAD]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights missing from the checkpoint {missing[:10]}, "
                         f"weights the model does not have {unexpected[:10]}")
    model.tie_weights()
    return model


def stop_token_ids(tokenizer, spec: ModelSpec) -> list[int]:
    """Ids of the template's stop words (`spec.chat_template().stop_words`, the one source of stop tokens)
    in this tokenizer; ValueError when it has none of them."""
    vocab = tokenizer.get_vocab()
    template = spec.chat_template()
    stop_ids = [vocab[w] for w in template.stop_words if w in vocab]
    if not stop_ids:
        raise ValueError(f"the tokenizer of {spec.path} has none of the {template.name} stop words {template.stop_words}")
    return stop_ids


def _set_stop_tokens(model, tokenizer, spec: ModelSpec) -> None:
    """Generation stops at the template's stop words, whatever the checkpoint's generation_config says."""
    stop_ids = stop_token_ids(tokenizer, spec)
    model.generation_config.eos_token_id = stop_ids
    pad = tokenizer.pad_token_id
    model.generation_config.pad_token_id = pad if pad is not None else stop_ids[0]


def load_hf_model(model_dir, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
                  ) -> tuple[InternVLForConditionalGeneration, object, ModelSpec]:
    """(model in eval mode, tokenizer, spec) for a checkpoint directory of either format.

    `dtype` may be a torch dtype, its name, or "auto" for the checkpoint's own.
    """
    root = Path(model_dir)
    spec = read_model_spec(root)
    dtype = _resolve_dtype(dtype, spec)
    is_original = spec.format == FORMAT_ORIGINAL
    tokenizer = AutoTokenizer.from_pretrained(str(root), trust_remote_code=is_original)
    if is_original:
        model = _load_original(root, tokenizer, dtype, device)
    else:
        model = InternVLForConditionalGeneration.from_pretrained(str(root), dtype=dtype, device_map=str(device))
    _set_stop_tokens(model, tokenizer, spec)
    return model.eval(), tokenizer, spec
