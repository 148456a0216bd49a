"""Load benchmark of the online endpoint: a concurrency sweep of streamed image chats against the raylens
endpoint and lmdeploy's own `api_server`, same checkpoint, same requests, same machine, one run.

    python -m bench.serve_load --size 2b --tiles 12 --out r.json          # GPU machine (bench/scripts/serve_gpu.sh)
    python -m bench.serve_load --quick --url http://127.0.0.1:8000 --out r.json   # CPU smoke against a running endpoint

Each request: one 640x480 JPEG as a data URL + "Describe the image.", 64 new tokens with `ignore_eos`,
greedy, streamed with `stream_options.include_usage`. At each concurrency C, C client tasks send requests
back to back for `--level-seconds` (at least `C` requests in all); the level reports requests/s and output
tokens/s over its wall time, the steady requests/s (`steady_rate`: C / mean latency of the requests answered
before the level's end), p50/p99 latency and time to first token (TTFT), and failures by status. A last
row (`probe: max_tokens=1`) times one-token answers at C=1: the time to first token whatever that token is.
The batch job's steady-state images/s on the same checkpoint and tiles comes from `bench.throughput`'s
raylens contender (the issue's goal: >= 0.8x the batch job and >= 2x api_server at C=64).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Describe the image."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def one_request(session, url: str, headers: dict, body: dict) -> dict:
    """One streamed chat: TTFT, latency, output tokens, status."""
    started = time.perf_counter()
    ttft, tokens, status = None, 0, None
    try:
        async with session.post(url, json=body, headers=headers) as response:
            status = response.status
            if status != 200:
                await response.read()
                return {"status": status, "latency": time.perf_counter() - started}
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    status = "stream_error"
                    continue
                for choice in event.get("choices") or []:
                    if choice.get("delta", {}).get("content") and ttft is None:
                        ttft = time.perf_counter() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point
        return {"status": f"{type(exc).__name__}", "latency": time.perf_counter() - started}
    ended = time.perf_counter()
    return {"status": status, "latency": ended - started, "ttft": ttft, "tokens": tokens, "ended": ended}


def steady_rate(concurrency: int, latencies_before_deadline: list[float]) -> float | None:
    """Requests/s the server sustains with `concurrency` requests always in it: Little's law for a closed loop
    without think time, C / mean latency, over the requests that finished while every client was still sending
    (the drain after the level's end runs at falling concurrency, and the wall time counts the first wave's
    wait for its answers but none of the drain's work; both bias `requests_per_s` at short levels)."""
    if not latencies_before_deadline:
        return None
    return round(concurrency / statistics.mean(latencies_before_deadline), 3)


async def run_level(url: str, model: str, api_key: str | None, image_url: str, concurrency: int, seconds: float,
                    max_tokens: int, extra: dict) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, **extra,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": PROMPT}]}]}
    results: list[dict] = []
    deadline = time.perf_counter() + seconds
    sent = 0

    async def worker(session):
        nonlocal sent
        while time.perf_counter() < deadline or sent < concurrency:
            sent += 1
            results.append(await one_request(session, url, headers, body))

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    failures: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            failures[str(r["status"])] = failures.get(str(r["status"]), 0) + 1
    latencies = [r["latency"] for r in ok]
    full_load = [r["latency"] for r in ok if r["ended"] <= deadline]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok), "failures": failures,
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
        "steady_requests_per_s": steady_rate(concurrency, full_load), "steady_requests": len(full_load),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "mean_output_tokens": statistics.mean(r["tokens"] for r in ok) if ok else 0,
    }


async def sweep(url: str, model: str, api_key: str | None, image_url: str, levels: list[int], seconds: float,
                max_tokens: int, extra: dict) -> list[dict]:
    await run_level(url, model, api_key, image_url, 1, 0, max_tokens, extra)  # warm-up, not reported
    rows = []
    for c in levels:
        row = await run_level(url, model, api_key, image_url, c, seconds, max_tokens, extra)
        print(f"  C={c:4d}: {row['requests_per_s']:7.2f} req/s (steady {row['steady_requests_per_s']}) "
              f"{row['output_tokens_per_s']:8.1f} tok/s "
              f"latency p50 {row['latency_p50_s']} p99 {row['latency_p99_s']} TTFT p50 {row['ttft_p50_s']} "
              f"p99 {row['ttft_p99_s']} failures {row['failures']}", flush=True)
        rows.append(row)
    # Time to first token measured without the answer's text: with random weights an answer may start with tokens
    # that show no text yet (pieces of a UTF-8 character, held back by the detokenizer), and the two servers' answers
    # differ, so the first *visible* token can come several decode steps later on one than on the other. A
    # one-token answer's whole latency is prefill + first token + the way back, whatever the token is.
    row = await run_level(url, model, api_key, image_url, 1, seconds / 2, 1, extra)
    row["probe"] = "max_tokens=1"
    print(f"  one-token answers at C=1: latency p50 {row['latency_p50_s']} p99 {row['latency_p99_s']} "
          f"({row['ok']} requests)", flush=True)
    rows.append(row)
    return rows


def wait_ready(base: str, timeout_s: float, api_key: str | None = None) -> str:
    """Poll /v1/models until the server answers; its model id."""
    import urllib.request

    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            request = urllib.request.Request(f"{base}/v1/models",
                                             headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())["data"][0]["id"]
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(2)
    raise TimeoutError(f"{base} not ready after {timeout_s}s ({last})")


class RaylensServer:
    """The raylens endpoint on a private Ray instance in this process (lmdeploy engine on the GPU), in either
    layout (`serve.config.ServeConfig.layout`)."""

    def __init__(self, checkpoint: str, tiles: int, engine_args: dict, engine: str = "lmdeploy",
                 layout: str = "split", overrides: dict | None = None) -> None:
        """`overrides`: `ServeConfig` fields that replace the benchmark's own settings (`--serve-args`)."""
        import ray
        from ray import serve

        from serve.app import bind
        from serve.config import ServeConfig

        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        gpus = 1 if engine == "lmdeploy" else 0
        settings = dict(model=checkpoint, engine=engine, engine_args=engine_args, max_tiles=tiles,
                        max_tokens_limit=4096, max_ongoing_requests=512, max_queued_requests=1024,
                        target_ongoing_requests=256, max_replicas=1, num_gpus=gpus, num_cpus=0,
                        ingress_min_replicas=4 if gpus else 1, ingress_max_replicas=4 if gpus else 1,
                        ingress_num_cpus=1 if gpus else 0, layout=layout)
        config = ServeConfig(**{**settings, **(overrides or {})}).with_engine_resolved(gpus)
        self.settings = config.public_dict()  # what the endpoint ran with, for the results
        serve.run(bind(config), name="raylens", route_prefix="/")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


class ApiServer:
    """lmdeploy's own OpenAI server as a child process (the device has no `lmdeploy` script)."""

    def __init__(self, checkpoint: str, log: Path) -> None:
        self.port = free_port()
        code = "import sys; from lmdeploy.cli import run; sys.argv=['lmdeploy']+sys.argv[1:]; run()"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", "api_server", checkpoint, "--backend", "pytorch",
                                      "--trust-remote-code", "--server-port", str(self.port), "--server-name", "127.0.0.1"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def batch_job_images_per_s(size: str, tiles: int, n_images: int, max_tokens: int, engine: str, work: Path,
                           timeout_s: int) -> dict:
    """The batch job's steady-state images/s on the same checkpoint (same size, seed and workdir) and tiles,
    measured by `bench.throughput`'s raylens contender (engine-ready timestamps, start-up excluded)."""
    out = work / "batch-throughput.json"
    command = [sys.executable, "-m", "bench.throughput", "--sizes", size, "--tiles", str(tiles), "--contenders", "raylens",
               "--images", str(n_images), "--images-many-tiles", str(n_images), "--max-new-tokens", str(max_tokens),
               "--engine", engine, "--workdir", str(work), "--timeout", str(timeout_s), "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 120)
    if not out.exists():
        return {"error": f"bench.throughput exited {proc.returncode}: {proc.stderr[-2000:]}"}
    row = json.loads(out.read_text())["results"][0]
    return {key: row.get(key) for key in ("images_per_s", "output_tokens_per_s", "steady_s", "images", "gpu_util_mean",
                                          "startup_s", "error")}


def image_data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2b", help="random-weight checkpoint shape (raylens.checkpoints.tiny)")
    p.add_argument("--checkpoint", help="an existing checkpoint directory instead of --size")
    p.add_argument("--tiles", type=int, default=12, help="max tiles per image (+ thumbnail), both servers")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--level-seconds", type=float, default=25.0, help="time each concurrency level sends requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--contenders", nargs="+", default=["raylens", "api_server", "batch"],
                   choices=["raylens", "raylens-single", "raylens-mp", "raylens-single-mp", "api_server", "batch"],
                   help="raylens-single: the endpoint with layout single (one deployment); -mp: lmdeploy's engine in "
                        "a process of its own (enable_mp_engine, as api_server runs it)")
    p.add_argument("--batch-images", type=int, default=512, help="images the batch job captions")
    p.add_argument("--engine-args", default="{}", help="JSON options of the raylens lmdeploy engine")
    p.add_argument("--serve-args", default="{}",
                   help="JSON ServeConfig fields for the raylens contenders, over the benchmark's own (e.g. two "
                        "replicas on one GPU: '{\"min_replicas\": 2, \"max_replicas\": 2, \"num_gpus\": 0.5}')")
    p.add_argument("--engine", default="lmdeploy", choices=["lmdeploy", "transformers"],
                   help="raylens' engine (transformers: a CPU dry run of the whole script with --checkpoint)")
    p.add_argument("--url", help="measure this running endpoint only (with --quick: the CPU smoke test)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--quick", action="store_true", help="CPU smoke: --url's endpoint, C=1,2, 2 s per level, 4 tokens")
    p.add_argument("--workdir", default=None, help="where checkpoints, images and logs go (default: a temp dir)")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)

    from bench.data import write_images

    image = write_images(work / "images", 1)[0]
    image_url = image_data_url(image)
    results: dict = {"config": vars(args), "contenders": {}}
    if args.quick:
        if not args.url:
            p.error("--quick measures a running endpoint: pass --url")
        model = wait_ready(args.url, 60, args.api_key)
        rows = asyncio.run(sweep(f"{args.url}/v1/chat/completions", model, args.api_key, image_url, [1, 2], 2.0, 4, {}))
        results["contenders"]["endpoint"] = {"url": args.url, "levels": rows}
        Path(args.out).write_text(json.dumps(results, indent=2))
        return results

    from bench.throughput import ensure_checkpoint

    checkpoint = args.checkpoint or str(ensure_checkpoint(work, args.size))  # where bench.throughput finds it too
    if args.url:
        model = wait_ready(args.url, 600, args.api_key)
        rows = asyncio.run(sweep(f"{args.url}/v1/chat/completions", model, args.api_key, image_url, args.concurrency,
                                 args.level_seconds, args.max_tokens, {}))
        results["contenders"]["endpoint"] = {"url": args.url, "levels": rows}
    for name in args.contenders:
        if args.url and name != "batch":
            continue
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        if name == "batch":
            if args.checkpoint:
                results["contenders"][name] = {"error": "the batch figure needs --size (bench.throughput's checkpoints)"}
                continue
            results["contenders"][name] = batch_job_images_per_s(args.size, args.tiles, args.batch_images, args.max_tokens,
                                                                args.engine, work, 300)
            print(f"  {results['contenders'][name]}", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
            continue
        if name.startswith("raylens"):
            engine_args = json.loads(args.engine_args)
            if name.endswith("-mp"):
                engine_args["enable_mp_engine"] = True
            server = RaylensServer(checkpoint, args.tiles, engine_args, args.engine,
                                   layout="single" if "-single" in name else "split",
                                   overrides=json.loads(args.serve_args))
        else:
            server = ApiServer(checkpoint, work / "api_server.log")
        try:
            model = wait_ready(server.url, 600)
            ready = time.perf_counter() - started
            # api_server takes the tile budget per image (`max_dynamic_patch` beside the URL, lmdeploy's extension)
            extra = {}
            if name == "api_server":
                extra = {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_url, "max_dynamic_patch": args.tiles}},
                    {"type": "text", "text": PROMPT}]}]}
            rows = asyncio.run(sweep(f"{server.url}/v1/chat/completions", model, None, image_url, args.concurrency,
                                     args.level_seconds, args.max_tokens, extra))
            results["contenders"][name] = {"startup_s": round(ready, 1), "levels": rows}
            if isinstance(server, RaylensServer):
                results["contenders"][name]["serve_config"] = server.settings
        except Exception as exc:  # noqa: BLE001 - one contender failing must not lose the other's figures
            results["contenders"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  failed: {exc}", flush=True)
        finally:
            server.stop()
        Path(args.out).write_text(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
