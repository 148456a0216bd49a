"""The shipped demo: a synthetic shapes data set and the tiny InternVL2 model trained on it.

* `raylens.demo.shapes` draws "a {color} {shape} on a {background} background." images with exact captions;
* `MODEL_DIR` (`raylens/demo/model`) is the checkpoint `jobs/train_demo.py` trained on them, in the original
  InternVL2 hub format (Qwen2 LLM, template Hermes-2); its TRAINING.md says how, and how well it does.

The caption job uses it when no `--model` is given (`raylens.checkpoints.resolve`), so the whole pipeline
runs, and its output can be checked, without downloading any weights.
"""
from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"

__all__ = ["MODEL_DIR"]
