"""The optimiser and learning-rate schedule every raylens training run uses (LoRA fine-tunes and the demo model).

AdamW with weight decay on matrices only (not on norms, biases, layer scales or embeddings), and a schedule
of linear warm-up then cosine decay to `min_lr_ratio` of the peak (InternVL's recipe: warm-up 3% and cosine
to 0; the demo model: 100 steps and 5%). The schedule is a pure function of the step, so a resumed run needs
no scheduler state.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate of step `step` (from 0): `peak * (step + 1) / warmup` during warm-up, then cosine from
    `peak` down to `peak * min_lr_ratio` at the last step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices that are not embeddings."""
    return param.ndim >= 2 and "embed" not in name


def adamw(named_parameters: Iterable[tuple[str, torch.Tensor]], *, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the given (trainable) parameters, in two groups: decayed and not."""
    named = list(named_parameters)
    decay = [p for n, p in named if decays(n, p)]
    no_decay = [p for n, p in named if not decays(n, p)]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
