"""How much of the endpoint's time to first token is the engine's, and how much the way to it (Serve's proxy,
the ingress replica, the model replica and back): the same streamed request, one at a time, against the
engine in this process and against a running endpoint.

    serve run serve/config.yaml &                                      # the demo model on CPU
    python -m bench.ttft_split --url http://127.0.0.1:8000 --requests 40

Both sides get the same image and prompt, the same engine (`--engine`) with serve/config.yaml's batching
defaults and the same 8 greedy tokens; the engine side includes decoding and preparing the image, as the
ingress does. The first `--warmup` requests of each side are left out. Prints the p50 and minimum of each and
their difference.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import time
from pathlib import Path

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "images" / "blue_star_on_pink.png"
PROMPT = "Provide a one-sentence caption for the provided image."


def engine_ttfts(model: str, n: int, max_tokens: int, engine_name: str = "transformers") -> list[float]:
    from raylens.engines import create_engine
    from raylens.engines.base import SamplingParams, VLRequest
    from raylens.images import decode_image, prepare_image

    data = IMAGE.read_bytes()
    # lmdeploy: a small KV cache, as the endpoint's engine already holds most of the GPU's memory
    options = {"batch_wait_timeout_s": 0.01} if engine_name == "transformers" else {"cache_max_entry_count": 0.05}
    engine = create_engine(engine_name, model, max_batch_size=8, **options)

    async def run() -> list[float]:
        out = []
        for i in range(n):
            started = time.perf_counter()
            request = VLRequest(f"r{i}", PROMPT, prepare_image(decode_image(data), engine.spec.tiling()))
            deltas = engine.stream(request, SamplingParams(max_new_tokens=max_tokens))
            async for delta in deltas:
                if delta.text:
                    out.append(time.perf_counter() - started)
                    break
            async for _ in deltas:
                pass
        return out

    try:
        return asyncio.run(run())
    finally:
        engine.close()


def endpoint_ttfts(url: str, n: int, max_tokens: int, api_key: str) -> list[float]:
    import openai

    image_url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": PROMPT}]}]
    out = []
    for _ in range(n):
        started = time.perf_counter()
        stream = client.chat.completions.create(model=model, messages=messages, stream=True, max_tokens=max_tokens,
                                                temperature=0)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                out.append(time.perf_counter() - started)
                break
        for _ in stream:
            pass
    return out


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Prints the comparison; returns each side's TTFTs in seconds (warm-up left out)."""
    from raylens.checkpoints.resolve import DEMO_MODEL_DIR

    p = argparse.ArgumentParser(prog="python -m bench.ttft_split", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="a running endpoint serving --model, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="the checkpoint the endpoint serves (default: the demo)")
    p.add_argument("--engine", default="transformers", choices=["transformers", "lmdeploy"],
                   help="the engine the endpoint runs, built here for the in-process side (lmdeploy: on the GPU)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--api-key", default="none")
    args = p.parse_args(argv)
    rows = {"engine in this process": engine_ttfts(args.model, args.requests, args.max_tokens, args.engine)[args.warmup:],
            "endpoint": endpoint_ttfts(args.url, args.requests, args.max_tokens, args.api_key)[args.warmup:]}
    for name, values in rows.items():
        print(f"{name}: TTFT p50 {statistics.median(values) * 1e3:.1f} ms, min {min(values) * 1e3:.1f} ms ({len(values)} requests)")
    gap = statistics.median(rows["endpoint"]) - statistics.median(rows["engine in this process"])
    print(f"the way to the engine and back: {gap * 1e3:+.1f} ms at the p50")
    return rows


if __name__ == "__main__":
    main()
