"""What trains: LoRA on the LLM (InternVL's recipe), optionally on the vision tower and the projector, or
everything (full fine-tuning); and merging the result back into plain weights.

Why peft on the transformers-native model: every checkpoint raylens loads becomes an
`InternVLForConditionalGeneration` (`raylens.checkpoints.loading`), whose LLM linear layers are named
the Llama/Qwen2 way (InternLM2's fused `wqkv` is split into q/k/v at load, its w1/w3/w2 become
gate/up/down). So one set of names covers every InternVL2 size; `--lora-targets` also accepts InternLM2's
and InternViT's original names and maps them. The vision tower has linear layers of the same names, so
targets are regular expressions anchored at `model.language_model.` (or `model.vision_tower.`).

Defaults are the official InternVL2 LoRA recipe (notes/serve-train-deploy.md E): r 16, alpha 2r, dropout
0.05, every linear layer of the LLM, vision tower and projector frozen. Merging (`merge_trained`) adds
`alpha / r * B @ A` to each adapted weight (peft's `merge_and_unload`), after which
`raylens.checkpoints.tiny.save_original` writes the original format (re-fusing q/k/v into `wqkv` for
InternLM2), so lmdeploy, the batch job and the endpoint load the result like any hub checkpoint.

A checkpoint stores only the trainable tensors (`trainable_state`), under the parameter names of the
model as `make_trainable` wrapped it; `load_trainable_state` needs the same `TrainableSpec`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

LLM_PREFIX = "model.language_model."
VISION_PREFIX = "model.vision_tower."
PROJECTOR = "multi_modal_projector"
# Original InternLM2 / InternViT names -> the transformers-native names they became (convert.py).
TARGET_ALIASES = {
    "wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w1": ("gate_proj",), "w3": ("up_proj",),
    "w2": ("down_proj",), "qkv": ("q_proj", "k_proj", "v_proj"), "proj": ("projection_layer",),
}
# InternVL's `wrap_backbone_lora`: attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of InternViT.
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")


@dataclass(frozen=True)
class TrainableSpec:
    """Which parameters train. `full`: all of them. Otherwise LoRA of rank `lora_r` on the LLM's `lora_targets`
    (empty: every linear layer), LoRA of rank `vision_lora_r` on the vision tower, the projector in full."""

    full: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()
    vision_lora_r: int = 0
    vision_lora_alpha: int = 0
    train_projector: bool = False

    def __post_init__(self) -> None:
        if self.full and (self.lora_r or self.vision_lora_r or self.train_projector):
            raise ValueError("full fine-tuning trains every weight: LoRA ranks and --train-projector do not apply")
        if not self.full and not (self.lora_r or self.vision_lora_r or self.train_projector):
            raise ValueError("nothing would train: give a LoRA rank, --vision-lora, --train-projector or --full")
        if self.lora_r < 0 or self.vision_lora_r < 0:
            raise ValueError("LoRA ranks must be >= 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def uses_lora(self) -> bool:
        return bool(self.lora_r or self.vision_lora_r)

    def describe(self) -> str:
        if self.full:
            return "full fine-tuning (every weight)"
        parts = []
        if self.lora_r:
            targets = ",".join(self.lora_targets) or "all linear"
            parts.append(f"LLM LoRA r={self.lora_r} alpha={self.lora_alpha} dropout={self.lora_dropout} ({targets})")
        if self.vision_lora_r:
            parts.append(f"vision LoRA r={self.vision_lora_r} alpha={self.vision_lora_alpha}")
        if self.train_projector:
            parts.append("projector (full)")
        return " + ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainableSpec":
        return cls(**{**d, "lora_targets": tuple(d.get("lora_targets", ()))})


def _linear_names(model: torch.nn.Module, prefix: str) -> list[str]:
    """Leaf names (`q_proj`) of the nn.Linear modules under `prefix`, in first-seen order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if name.startswith(prefix) and isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def llm_targets(model: torch.nn.Module, requested: Iterable[str] = ()) -> list[str]:
    """The LLM linear layer names LoRA adapts: `requested` (aliases mapped), or all of them."""
    available = _linear_names(model, LLM_PREFIX)
    if not available:
        raise ValueError(f"the model has no linear layers under {LLM_PREFIX!r}: is it an InternVL model?")
    requested = list(requested)
    if not requested:
        return available
    targets: list[str] = []
    for name in requested:
        for mapped in TARGET_ALIASES.get(name, (name,)):
            if mapped not in available:
                raise ValueError(f"--lora-targets {name!r}: the LLM has no linear layer {mapped!r}; it has {available}")
            if mapped not in targets:
                targets.append(mapped)
    return targets


def _pattern(prefix: str, leaves: Iterable[str]) -> str:
    return re.escape(prefix) + r".*\.(?:" + "|".join(re.escape(leaf) for leaf in leaves) + ")"


def lora_config(model: torch.nn.Module, spec: TrainableSpec):
    """The peft LoraConfig of `spec` for this model, or None when no LoRA is asked for."""
    from peft import LoraConfig

    if not spec.uses_lora:
        return None
    patterns = []
    if spec.lora_r:
        patterns.append(_pattern(LLM_PREFIX, llm_targets(model, spec.lora_targets)))
    vision_pattern = _pattern(VISION_PREFIX, VISION_TARGETS)
    if spec.vision_lora_r:
        patterns.append(vision_pattern)
    base_r = spec.lora_r or spec.vision_lora_r
    base_alpha = spec.lora_alpha if spec.lora_r else spec.vision_lora_alpha
    extra = {}
    if spec.lora_r and spec.vision_lora_r:
        key = re.escape(VISION_PREFIX) + ".*"
        extra = dict(rank_pattern={key: spec.vision_lora_r}, alpha_pattern={key: spec.vision_lora_alpha})
    return LoraConfig(
        r=base_r,
        lora_alpha=base_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules="|".join(f"(?:{p})" for p in patterns),
        modules_to_save=[PROJECTOR] if spec.train_projector else None,
        bias="none",
        **extra,
    )


def make_trainable(model: torch.nn.Module, spec: TrainableSpec) -> torch.nn.Module:
    """`model` with exactly `spec`'s parameters trainable: a peft model for LoRA, else `model` itself.

    Trainable parameters are float32 (master weights), whatever dtype the frozen ones have.
    """
    if spec.full:
        model.requires_grad_(True)
    elif spec.uses_lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, spec))
    else:  # only the projector
        model.requires_grad_(False)
        getattr(model.model, PROJECTOR).requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def trainable_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The trainable tensors (CPU, contiguous) by parameter name. `full_state`: the model's state dict
    already gathered (FSDP), else read from the model."""
    names = trainable_names(model)
    source = full_state if full_state is not None else dict(model.named_parameters())
    return {name: source[name].detach().to("cpu").contiguous() for name in names}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into `model` (wrapped as when they were saved); every name must match."""
    expected = set(trainable_names(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model's trainable parameters: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]} (was it made with other LoRA settings?)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))


def merge_trained(model: torch.nn.Module, spec: TrainableSpec, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base `model` (a plain InternVLForConditionalGeneration) with the trained tensors applied and
    LoRA merged in: a plain InternVLForConditionalGeneration again, in float32."""
    model = model.float()
    wrapped = make_trainable(model, spec)
    load_trainable_state(wrapped, state)
    if spec.uses_lora:
        wrapped = wrapped.merge_and_unload()
    wrapped.requires_grad_(False)
    return wrapped.eval()
