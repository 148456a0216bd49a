"""The lmdeploy engine on a GPU, checked against the transformers engine (skipped without CUDA).

Run on the GPU machine (see docs/benchmarks.md):
    source .devsite/activate.sh && python -m pytest -m gpu -v tests
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from raylens.checkpoints.resolve import DEMO_MODEL_DIR
from raylens.engines.base import SamplingParams, VLRequest
from raylens.images import TilingSpec, decode_image, prepare_image

from conftest import image_bytes

pytestmark = pytest.mark.gpu
os.environ.setdefault("LMDEPLOY_SKIP_WARMUP", "1")
os.environ.setdefault("LMDEPLOY_ENABLE_CHECK_ENV", "0")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "images"


def _requests(spec, images: list[bytes], max_tiles: int | None, question: str) -> list[VLRequest]:
    max_tiles = max_tiles or spec.max_tiles
    tiling = TilingSpec(tile_size=spec.tile_size, max_tiles=max_tiles, use_thumbnail=spec.use_thumbnail)
    return [VLRequest(f"r{i}", question, prepare_image(decode_image(b), tiling), max_tiles=max_tiles) for i, b in enumerate(images)]


def _lmdeploy(model_dir: str, images: list[bytes], max_tiles: int | None, question: str, params: SamplingParams,
              **options):
    from raylens.engines.lmdeploy_engine import LMDeployEngine

    lm = LMDeployEngine(model_dir, max_batch_size=16, eager_mode=True, **options)
    try:
        return asyncio.run(lm.generate(_requests(lm.spec, images, max_tiles, question), params))
    finally:
        lm.close()


def _both(model_dir: str, images: list[bytes], max_tiles: int | None, question: str = "Describe the image.",
          max_new_tokens: int = 16, preprocess: str = "raylens"):
    from raylens.engines.transformers_engine import TransformersEngine

    params = SamplingParams(max_new_tokens=max_new_tokens)
    lm_results = _lmdeploy(model_dir, images, max_tiles, question, params, preprocess=preprocess,
                           cache_max_entry_count=0.2)
    hf = TransformersEngine(model_dir, device="cuda", dtype="float32")
    hf_results = asyncio.run(hf.generate(_requests(hf.spec, images, max_tiles, question), params))
    hf.close()
    return lm_results, hf_results


@pytest.mark.parametrize("preprocess", ["raylens", "lmdeploy"])
@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_lmdeploy_loads_our_original_format_and_sees_the_same_prompt(tmp_path, llm, preprocess):
    from raylens.checkpoints.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / f"tiny-{llm}", format="internvl_chat", llm=llm, seed=1, max_tiles=4)
    images = [image_bytes((64, 48)), image_bytes((300, 100), (0, 0, 255)), image_bytes((50, 200), (0, 255, 0))]
    lm, hf = _both(str(ckpt), images, max_tiles=4, preprocess=preprocess)
    for a, b in zip(lm, hf):
        assert a.error is None, a.error
        # Same template, same tiles, same image tokens: lmdeploy's own preprocessing agrees with ours.
        assert a.num_input_tokens == b.num_input_tokens
        assert a.num_output_tokens >= 1


@pytest.mark.parametrize("preprocess", ["raylens", "lmdeploy"])
def test_demo_model_captions_identically_on_both_engines(preprocess):
    images = sorted(EXAMPLES.iterdir())
    lm, hf = _both(str(DEMO_MODEL_DIR), [p.read_bytes() for p in images], max_tiles=None,
                   question="Provide a one-sentence caption for the provided image.", preprocess=preprocess)
    assert [r.text for r in lm] == [r.text for r in hf]
    assert all(r.text.startswith("a ") and r.text.endswith("background.") for r in lm), [r.text for r in lm]


def test_demo_model_with_tensor_parallelism_captions_like_one_gpu():
    """tp=2 outside any Ray actor (lmdeploy starts its own Ray); the job's in-actor case is in tests/jobs."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    images = [p.read_bytes() for p in sorted(EXAMPLES.iterdir())]
    question, params = "Provide a one-sentence caption for the provided image.", SamplingParams(max_new_tokens=16)
    one = _lmdeploy(str(DEMO_MODEL_DIR), images, None, question, params)
    two = _lmdeploy(str(DEMO_MODEL_DIR), images, None, question, params, tp=2)
    assert all(r.error is None for r in two), [r.error for r in two]
    assert [r.text for r in two] == [r.text for r in one]
