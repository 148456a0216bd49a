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
from raylens.conversation import Conversation, Turn
from raylens.engines.base import RequestError
from raylens.images import decode_image, prepare_image

from conftest import image_bytes

pytestmark = pytest.mark.gpu
os.environ.setdefault("LMDEPLOY_SKIP_WARMUP", "1")
os.environ.setdefault("LMDEPLOY_ENABLE_CHECK_ENV", "0")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "images"


def _requests(spec, images: list[bytes], max_tiles: int | None, question: str) -> list[VLRequest]:
    max_tiles = max_tiles or spec.max_tiles
    tiling = spec.tiling(max_tiles)
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


def test_demo_model_captions_alike_with_lmdeploy_in_a_process_of_its_own():
    """`enable_mp_engine`: lmdeploy's scheduler and model in a child process (as its api_server runs them); our
    prepared inputs cross to it over ZMQ and the answers stay those of the in-process engine."""
    from raylens.engines.lmdeploy_engine import TRIM_COUNT_ENV

    images = [p.read_bytes() for p in sorted(EXAMPLES.iterdir())]
    question, params = "Provide a one-sentence caption for the provided image.", SamplingParams(max_new_tokens=16)
    here = _lmdeploy(str(DEMO_MODEL_DIR), images, None, question, params, cache_max_entry_count=0.2)
    child = _lmdeploy(str(DEMO_MODEL_DIR), images, None, question, params, cache_max_entry_count=0.2,
                      enable_mp_engine=True, memory_trim_every=4096)
    assert all(r.error is None for r in child), [r.error for r in child]
    assert [r.text for r in child] == [r.text for r in here]
    assert [r.num_input_tokens for r in child] == [r.num_input_tokens for r in here]
    assert os.environ[TRIM_COUNT_ENV] == "4096"  # what the child was started with


def test_lmdeploy_logs_nothing_per_request_unless_asked():
    """lmdeploy's logger is left at INFO by an engine built without its pipeline(): lines for every request.
    In a fresh process, as in an engine actor: lmdeploy's first import is what sets INFO."""
    import re
    import subprocess
    import sys

    code = (
        "import asyncio, logging, sys\n"
        "from raylens.checkpoints.resolve import DEMO_MODEL_DIR\n"
        "from raylens.engines.base import SamplingParams, VLRequest\n"
        "from raylens.engines.lmdeploy_engine import LMDeployEngine\n"
        "from raylens.images import decode_image, prepare_image\n"
        "kw = {} if sys.argv[1] == 'default' else {'log_level': sys.argv[1]}\n"
        "lm = LMDeployEngine(str(DEMO_MODEL_DIR), max_batch_size=4, eager_mode=True, cache_max_entry_count=0.2, **kw)\n"
        "image = prepare_image(decode_image(open(sys.argv[2], 'rb').read()), lm.spec.tiling())\n"
        "(r,) = asyncio.run(lm.generate([VLRequest('r0', 'Describe the image.', image)], SamplingParams(max_new_tokens=4)))\n"
        "lm.close()\n"
        "print('RESULT', r.error, logging.getLevelName(logging.getLogger('lmdeploy').getEffectiveLevel()))\n"
    )
    image = str(sorted(EXAMPLES.iterdir())[0])
    for asked, level in (("default", "WARNING"), ("info", "INFO")):
        done = subprocess.run([sys.executable, "-c", code, asked, image], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"RESULT None {level}" in done.stdout, done.stdout[-2000:]
        per_request = re.search(r"session \d+ finished", done.stdout + done.stderr)  # lmdeploy's INFO line per request
        assert bool(per_request) == (level == "INFO")


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


def _chat(spec, max_tiles: int = 4) -> VLRequest:
    tiling = spec.tiling(max_tiles)
    images = [prepare_image(decode_image(image_bytes(size, color)), tiling)
              for size, color in (((64, 48), (200, 30, 30)), ((300, 100), (0, 0, 255)), ((50, 200), (0, 255, 0)))]
    conversation = Conversation((Turn("What is this?", 1, "a red box"), Turn("Compare <image> with <image>.", 2)))
    return VLRequest.chat("chat", conversation, images, max_tiles=max_tiles)


async def _stream_text(engine, request, params):
    deltas = [d async for d in engine.stream(request, params)]
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason is not None
    return "".join(d.text for d in deltas), deltas[-1]


@pytest.mark.parametrize("preprocess", ["raylens", "lmdeploy"])
@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_lmdeploy_conversations_streams_stops_and_errors(tmp_path, llm, preprocess):
    """The model-layer contract on lmdeploy: a multi-image multi-turn chat has the transformers engine's
    prompt length; stream adds up to generate; stop strings cut; a too-long prompt is a RequestError."""
    from raylens.checkpoints.tiny import write_tiny_checkpoint
    from raylens.engines.lmdeploy_engine import LMDeployEngine
    from raylens.engines.transformers_engine import TransformersEngine

    ckpt = str(write_tiny_checkpoint(tmp_path / f"tiny-{llm}", format="internvl_chat", llm=llm, seed=1, max_tiles=4))
    hf = TransformersEngine(ckpt, device="cuda", dtype="float32")
    [hf_chat] = asyncio.run(hf.generate([_chat(hf.spec)], SamplingParams(max_new_tokens=8)))
    hf.close()
    lm = LMDeployEngine(ckpt, max_batch_size=16, eager_mode=True, cache_max_entry_count=0.2, preprocess=preprocess)

    async def checks():
        params = SamplingParams(max_new_tokens=24, ignore_eos=True)
        [chat] = await lm.generate([_chat(lm.spec)], SamplingParams(max_new_tokens=8))
        assert chat.error is None and chat.num_input_tokens == hf_chat.num_input_tokens
        req = _requests(lm.spec, [image_bytes((120, 60))], 4, "Describe the image.")[0]
        [whole] = await lm.generate([req], params)
        text, last = await _stream_text(lm, req, params)
        assert text == whole.text and last.num_output_tokens == whole.num_output_tokens == 24
        stop = next(whole.text[i:i + 2] for i in range(len(whole.text) // 3, len(whole.text) - 2)
                    if not whole.text[i].isspace())
        cut_params = SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,))
        [cut] = await lm.generate([req], cut_params)
        assert cut.text == whole.text[: whole.text.find(stop)].strip() and cut.finish_reason == "stop"
        assert cut.num_output_tokens < 24
        text, last = await _stream_text(lm, req, cut_params)
        assert (text, last.finish_reason) == (cut.text, "stop")
        with pytest.raises(RequestError):
            await _stream_text(lm, VLRequest("long", "word " * 5000), SamplingParams(max_new_tokens=4))
        [too_long] = await lm.generate([VLRequest("long", "word " * 5000)], SamplingParams(max_new_tokens=4))
        assert too_long.error.startswith("RequestError")

    try:
        asyncio.run(checks())
    finally:
        lm.close()


def test_answers_cut_inside_a_character_keep_their_text(tmp_path):
    """Random weights emit byte tokens that are not whole UTF-8 characters, so max_tokens often ends an answer
    inside one. lmdeploy's own response text dropped such a tail (generate returned "" for it, and a stream
    whose steps all ended so lost the rest): the engine decodes the token ids itself. At every length the
    answer grows from the shorter one, and the stream adds up to it."""
    from raylens.checkpoints.tiny import write_tiny_checkpoint
    from raylens.engines.lmdeploy_engine import LMDeployEngine

    ckpt = str(write_tiny_checkpoint(tmp_path / "tiny", format="internvl_chat", llm="qwen2", seed=1, max_tiles=4))
    lm = LMDeployEngine(ckpt, max_batch_size=16, eager_mode=True, cache_max_entry_count=0.2)
    images = [image_bytes((64, 48)), image_bytes((300, 100), (0, 0, 255))]

    async def texts() -> dict[int, list[str]]:
        out = {}
        for n in range(1, 25):
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)
            requests = _requests(lm.spec, images, 4, "Describe the image.")
            answers = await lm.generate(requests, params)
            assert all(a.error is None and a.num_output_tokens == n for a in answers)
            for request, answer in zip(requests, answers):
                streamed, last = await _stream_text(lm, request, params)
                assert streamed == answer.text and last.num_output_tokens == n
            out[n] = [a.text for a in answers]
        return out

    try:
        by_length = asyncio.run(texts())
    finally:
        lm.close()
    for i in range(len(images)):
        full = by_length[24][i]
        for n in range(2, 25):
            shorter, text = by_length[n - 1][i].rstrip("\ufffd"), by_length[n][i]
            assert full.startswith(text.rstrip("\ufffd")) and len(text) >= len(shorter), (n, shorter, text)
    assert any(t.endswith("\ufffd") for ts in by_length.values() for t in ts), "no answer ended inside a character"


def test_demo_model_stops_where_the_transformers_engine_stops():
    from raylens.engines.lmdeploy_engine import LMDeployEngine
    from raylens.engines.transformers_engine import TransformersEngine

    images = [p.read_bytes() for p in sorted(EXAMPLES.iterdir())]
    question = "Provide a one-sentence caption for the provided image."
    params = SamplingParams(max_new_tokens=32, stop=(" on ",))
    hf = TransformersEngine(str(DEMO_MODEL_DIR), device="cuda", dtype="float32")
    expected = asyncio.run(hf.generate(_requests(hf.spec, images, None, question), params))
    hf.close()
    lm = LMDeployEngine(str(DEMO_MODEL_DIR), max_batch_size=16, eager_mode=True, cache_max_entry_count=0.2)
    try:
        got = asyncio.run(lm.generate(_requests(lm.spec, images, None, question), params))
    finally:
        lm.close()
    assert [r.text for r in got] == [r.text for r in expected]
    assert all(r.finish_reason == "stop" and " on " not in r.text for r in got)


def _save_hf_processor(ckpt) -> None:
    """lmdeploy's InternVL3-hf path loads AutoProcessor: save the processor the official -hf repos ship."""
    pytest.importorskip("torchvision", reason="InternVLVideoProcessor (part of InternVLProcessor) needs torchvision")
    from transformers import AutoTokenizer, GotOcr2ImageProcessorFast, InternVLProcessor, InternVLVideoProcessor

    from raylens.checkpoints.formats import ModelSpec
    from raylens.checkpoints.tiny import HF_CHAT_TEMPLATE

    spec = ModelSpec.from_dir(ckpt)
    image_processor = GotOcr2ImageProcessorFast(size={"height": spec.tile_size, "width": spec.tile_size},
                                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                                min_patches=spec.min_tiles, max_patches=spec.max_tiles)
    # The official -hf tokenizers name a video token too (InternVLProcessor reads it); ours names the image ones.
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt), extra_special_tokens={"video_token": "<video>"})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), chat_template=HF_CHAT_TEMPLATE,
                                  image_seq_length=spec.image_tokens_per_tile)
    processor.save_pretrained(str(ckpt))


@pytest.mark.parametrize("fmt", ["internvl_chat", "internvl_hf"])
@pytest.mark.parametrize("family,llm", [("internvl2_5", "internlm2"), ("internvl3", "qwen2")])
def test_lmdeploy_runs_internvl2_5_and_internvl3_checkpoints(tmp_path, family, llm, fmt):
    """Both formats of both families: lmdeploy sees the transformers engine's prompt for one-image requests and
    a multi-image chat (the -hf ones without a system message, as their chat template says)."""
    from raylens.checkpoints.tiny import write_tiny_checkpoint
    from raylens.engines.lmdeploy_engine import LMDeployEngine
    from raylens.engines.transformers_engine import TransformersEngine

    ckpt = write_tiny_checkpoint(tmp_path / f"{family}-{fmt}", format=fmt, family=family, llm=llm, seed=3, max_tiles=4)
    if fmt == "internvl_hf":
        _save_hf_processor(ckpt)
    images = [image_bytes((64, 48)), image_bytes((300, 100), (0, 0, 255))]
    params = SamplingParams(max_new_tokens=8)
    hf = TransformersEngine(str(ckpt), device="cuda", dtype="float32")
    expected = asyncio.run(hf.generate(_requests(hf.spec, images, 4, "Describe the image.") + [_chat(hf.spec)], params))
    hf.close()
    lm = LMDeployEngine(str(ckpt), max_batch_size=16, eager_mode=True, cache_max_entry_count=0.2)
    try:
        got = asyncio.run(lm.generate(_requests(lm.spec, images, 4, "Describe the image.") + [_chat(lm.spec)], params))
    finally:
        lm.close()
    for a, b in zip(got, expected):
        assert a.error is None, a.error
        assert a.num_input_tokens == b.num_input_tokens and a.num_output_tokens >= 1
