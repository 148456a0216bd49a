"""Engines behind one protocol (`VLEngine`); `create_engine` picks one by name.

`auto` means lmdeploy where CUDA and lmdeploy are both present, transformers otherwise. A name of the
form `package.module:Class` loads a user's own engine class (anything implementing `VLEngine`, built as
`Class(model_dir, **options)`). Engine modules import their libraries lazily, so importing this package is
cheap and CUDA-free.
"""
from __future__ import annotations

import importlib.util
from typing import Any

from raylens.engines.base import (
    EngineDeadError,
    RequestError,
    SamplingParams,
    VLDelta,
    VLEngine,
    VLRequest,
    VLResult,
    format_error,
)

ENGINE_NAMES = ("auto", "transformers", "lmdeploy")


def resolve_engine_name(name: str) -> str:
    """`auto` -> the engine this process can run."""
    if ":" in name:
        return name
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {ENGINE_NAMES}")
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("lmdeploy") is not None:
        return "lmdeploy"
    return "transformers"


def create_engine(name: str, model_dir: str, **options: Any) -> VLEngine:
    """Build an engine; `options` go to its constructor (e.g. max_batch_size, tp, device)."""
    name = resolve_engine_name(name)
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)(model_dir, **options)
    if name == "lmdeploy":
        from raylens.engines.lmdeploy_engine import LMDeployEngine

        return LMDeployEngine(model_dir, **options)
    from raylens.engines.transformers_engine import TransformersEngine

    return TransformersEngine(model_dir, **options)


__all__ = ["EngineDeadError", "RequestError", "SamplingParams", "VLDelta", "VLEngine", "VLRequest", "VLResult",
           "create_engine", "format_error", "resolve_engine_name"]
