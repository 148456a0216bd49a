"""The lmdeploy engine's request inputs (token ids and lmdeploy's `multimodal` entries), on CPU: tiles the CPU
stage made ahead (--tiles-on-cpu) must reach lmdeploy as the very tensors the engine would have made itself.
lmdeploy needs CUDA to build an engine, so the engine object is assembled from its parts here; the GPU tests
run the whole engine (tests/raylens/engines/test_lmdeploy_engine.py, tests/jobs)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from raylens.checkpoints.formats import ModelSpec
from raylens.checkpoints.resolve import DEMO_MODEL_DIR
from raylens.conversation import Conversation, Turn
from raylens.engines.base import SamplingParams, VLRequest
from raylens.engines.encoding import CachedPromptTokenizer
from raylens.engines.lmdeploy_engine import LMDeployEngine
from raylens.images import pixel_values_for, prepare_image, with_pixel_values


def _engine(dtype: str) -> LMDeployEngine:
    engine = object.__new__(LMDeployEngine)
    engine.spec = ModelSpec.from_dir(str(DEMO_MODEL_DIR))
    engine.template = engine.spec.chat_template()
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    engine._prompt_tokenizer = CachedPromptTokenizer(tokenizer)
    engine._image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    engine._feature_dtype, engine._feature_dtype_name = getattr(torch, dtype), dtype
    engine._engine = SimpleNamespace(session_len=4096)
    return engine


def _images(spec, max_tiles: int = 6):
    rng = np.random.default_rng(0)
    tiling = spec.tiling(max_tiles)
    return [prepare_image(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), tiling)
            for h, w in ((120, 300), (60, 40))]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tiles_made_by_the_cpu_stage_reach_lmdeploy_as_the_engine_would_make_them(dtype):
    engine = _engine(dtype)
    images = _images(engine.spec)
    conversation = Conversation((Turn("What is this?", 1, "a box"), Turn("And <image>?", 1)))
    params = SamplingParams(max_new_tokens=8)
    made_here = engine._ready_inputs(VLRequest.chat("r", conversation, images), params)
    ready = [with_pixel_values(image, dtype) for image in images]
    forwarded = engine._ready_inputs(VLRequest.chat("r", conversation, ready), params)
    assert forwarded[0] == made_here[0]  # the same token ids
    assert len(forwarded[1]) == len(made_here[1]) == 2
    for a, b, image in zip(forwarded[1], made_here[1], ready):
        assert a.keys() == b.keys() and a["offset"] == b["offset"] and a["image_tokens"] == b["image_tokens"]
        assert a["pixel_values"].dtype == b["pixel_values"].dtype == getattr(torch, dtype)
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        # both equal the reference: float32 values, then torch's own conversion
        reference = torch.from_numpy(pixel_values_for(image)).to(getattr(torch, dtype))
        assert torch.equal(b["pixel_values"], reference)
        assert a["pixel_values"].data_ptr() == torch.from_numpy(image.pixel_values).data_ptr()  # forwarded, not copied


def test_tiles_in_another_dtype_than_the_engines_are_made_again():
    engine = _engine("bfloat16")
    images = _images(engine.spec)
    params = SamplingParams(max_new_tokens=8)
    made_here = engine._ready_inputs(VLRequest("r", "Describe <image>.", images[0]), params)
    other = engine._ready_inputs(VLRequest("r", "Describe <image>.", with_pixel_values(images[0], "float16")), params)
    assert other[0] == made_here[0]
    assert other[1][0]["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(other[1][0]["pixel_values"], made_here[1][0]["pixel_values"])


def test_a_text_only_request_has_no_multimodal_entries():
    engine = _engine("bfloat16")
    ids, multimodal = engine._ready_inputs(VLRequest("r", "Hello"), SamplingParams(max_new_tokens=8))
    assert multimodal is None and ids
