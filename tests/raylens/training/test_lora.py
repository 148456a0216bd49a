"""What trains in each mode: InternVL's LoRA recipe on the LLM by default, vision LoRA and the projector on
request, everything for full fine-tuning; trainable tensors round-trip through a checkpoint."""
from __future__ import annotations

import pytest
import torch

from raylens.checkpoints.tiny import build_hf_model
from raylens.training.lora import (
    TrainableSpec,
    llm_targets,
    load_trainable_state,
    make_trainable,
    trainable_names,
    trainable_state,
)

LLM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(params=["qwen2", "internlm2"])
def model(request):
    return build_hf_model("tiny", llm=request.param, seed=0)[0]


def _adapted(model) -> set[str]:
    """Module names carrying a LoRA adapter."""
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


def test_default_lora_is_the_internvl_recipe_on_every_llm_linear(model):
    spec = TrainableSpec(lora_r=8, lora_alpha=16)
    assert llm_targets(model) == LLM_LINEARS
    wrapped = make_trainable(model, spec)
    adapted = _adapted(wrapped)
    layers = model.config.text_config.num_hidden_layers
    assert len(adapted) == layers * len(LLM_LINEARS)
    assert all(".language_model." in name for name in adapted)
    names = trainable_names(wrapped)
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for n, p in wrapped.named_parameters() if p.requires_grad)
    lora_a = next(m for n, m in wrapped.named_modules() if n.endswith("layers.0.self_attn.q_proj")).lora_A["default"]
    assert lora_a.weight.shape[0] == 8
    assert wrapped.peft_config["default"].lora_alpha == 16


def test_internlm2_names_map_to_the_split_layers(model):
    assert llm_targets(model, ["wqkv", "w2"]) == ["q_proj", "k_proj", "v_proj", "down_proj"]
    with pytest.raises(ValueError, match="no linear layer 'nope'"):
        llm_targets(model, ["nope"])


def test_vision_lora_with_its_own_rank_and_the_projector(model):
    spec = TrainableSpec(lora_r=8, lora_alpha=16, lora_targets=("o_proj",), vision_lora_r=4, vision_lora_alpha=8,
                         train_projector=True)
    wrapped = make_trainable(model, spec)
    adapted = _adapted(wrapped)
    vision = {n for n in adapted if ".vision_tower." in n}
    llm = adapted - vision
    assert llm and all(n.endswith("o_proj") for n in llm)
    assert {n.rsplit(".", 1)[1] for n in vision} == {"q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"}
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in wrapped.named_modules() if n in adapted}
    assert {ranks[n] for n in vision} == {4} and {ranks[n] for n in llm} == {8}
    assert any("multi_modal_projector" in n for n in trainable_names(wrapped))


def test_projector_only_and_full_fine_tuning(model):
    projector = make_trainable(model, TrainableSpec(lora_r=0, train_projector=True))
    assert trainable_names(projector) and all("multi_modal_projector" in n for n in trainable_names(projector))
    full = make_trainable(build_hf_model("tiny", seed=1)[0], TrainableSpec(full=True, lora_r=0))
    assert len(trainable_names(full)) == len(list(full.parameters()))


def test_invalid_combinations_are_refused():
    with pytest.raises(ValueError, match="nothing would train"):
        TrainableSpec(lora_r=0)
    with pytest.raises(ValueError, match="full fine-tuning"):
        TrainableSpec(full=True, lora_r=16)


def test_trainable_state_round_trips(model):
    spec = TrainableSpec(lora_r=4, lora_alpha=8, train_projector=True)
    trained = make_trainable(model, spec)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    state = trainable_state(trained)
    fresh = make_trainable(build_hf_model("tiny", llm="qwen2" if "Qwen2" in type(model.model.language_model).__name__
                                          else "internlm2", seed=0)[0], spec)
    load_trainable_state(fresh, state)
    assert all(torch.equal(state[n], p) for n, p in fresh.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="other LoRA settings"):
        load_trainable_state(make_trainable(build_hf_model("tiny", seed=0)[0], TrainableSpec(lora_r=2)), state)
