"""Tiny checkpoints of every format x LLM, from one seed; a plugin (`pytest_plugins`) of the tests using them.

Not a conftest.py: other tests do `from conftest import ...`, which a second conftest module would shadow.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from raylens.checkpoints.formats import FORMAT_HF, FORMAT_ORIGINAL

FORMATS = (FORMAT_ORIGINAL, FORMAT_HF)
LLMS = ("qwen2", "internlm2")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(format, llm): directory}; the same seed, so both formats of one LLM hold the same weights."""
    from raylens.checkpoints.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {
        (fmt, llm): write_tiny_checkpoint(root / f"{fmt}-{llm}", format=fmt, llm=llm, seed=0, max_tiles=6)
        for fmt in FORMATS
        for llm in LLMS
    }
