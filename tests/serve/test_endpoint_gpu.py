"""The endpoint on a GPU with the lmdeploy engine (run by the lead: `python -m pytest -q -m gpu tests/serve`).

What the CPU tests cannot show: lmdeploy's async engine running inside the Serve replica's event loop
(notes/lmdeploy.md 3.5, 4.3), concurrent requests sharing its continuous batching, streamed text equal
to the plain answer, and the batch job's answer for the same image (both on the GPU, half of it each).
Every test runs against both layouts (`layout: split` and `single`).
"""
from __future__ import annotations

import base64
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
CAPTION = "Provide a one-sentence caption for the provided image."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _message(name: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode((EXAMPLES / name).read_bytes()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": CAPTION}]}


@pytest.fixture(scope="module", params=["split", "single"])
def gpu_endpoint(request, ray_local, tiny_checkpoint):
    """The endpoint in each layout (`single`: lmdeploy's engine inside the HTTP replica's event loop)."""
    import openai
    from ray import serve

    from serve.app import bind
    from serve.config import ServeConfig

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(model=str(tiny_checkpoint), engine="lmdeploy", num_gpus=0.5, max_tokens_limit=64,
                         default_max_tokens=16, stream_interval_ms=0, ingress_num_cpus=0, num_cpus=0,
                         engine_args={"max_batch_size": 32, "cache_max_entry_count": 0.2}, layout=request.param)
    try:
        serve.run(bind(config.with_engine_resolved(1)), name="gpu", route_prefix="/")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        serve.shutdown()


def test_concurrent_streams_share_the_engine_and_match_plain_answers(gpu_endpoint):
    model = gpu_endpoint.models.list().data[0].id
    names = sorted(p.name for p in EXAMPLES.glob("*.png"))
    plain = {n: gpu_endpoint.chat.completions.create(model=model, messages=[_message(n)], temperature=0,
                                                     max_tokens=16).choices[0].message.content for n in names}

    def streamed(name: str) -> str:
        chunks = gpu_endpoint.chat.completions.create(model=model, messages=[_message(name)], temperature=0,
                                                      max_tokens=16, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(streamed, names * 4))
    assert together == [plain[n] for n in names * 4]


def test_multi_turn_multi_image_on_lmdeploy(gpu_endpoint):
    model = gpu_endpoint.models.list().data[0].id
    first = _message("red_triangle_on_yellow.png")
    messages = [first, {"role": "assistant", "content": "a triangle."},
                {"role": "user", "content": [first["content"][0], _message("blue_star_on_pink.png")["content"][0],
                                             {"type": "text", "text": "And these?"}]}]
    answer = gpu_endpoint.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 0


def test_same_answer_as_the_batch_job_on_the_gpu(gpu_endpoint, tiny_checkpoint, tmp_path):
    import pyarrow.parquet as pq

    from jobs.caption import main, setup
    from jobs.caption_config import CaptionJobConfig

    names = ["black_circle_on_yellow.png", "green_star_on_white.png"]
    src = tmp_path / "in"
    src.mkdir()
    for name in names:
        (src / name).write_bytes((EXAMPLES / name).read_bytes())
    main(setup(CaptionJobConfig(input=str(src), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                                engine="lmdeploy", gpus_per_replica=0.4, max_new_tokens=16,
                                engine_args='{"cache_max_entry_count": 0.2}')))
    written = {r["id"]: r["text"] for r in pq.read_table(tmp_path / "out").to_pylist()}
    model = gpu_endpoint.models.list().data[0].id
    for name in names:
        answer = gpu_endpoint.chat.completions.create(model=model, messages=[_message(name)], temperature=0, max_tokens=16)
        assert answer.choices[0].message.content == written[name]
