"""Throughput benchmark on the GPU machine: raylens vs a plain lmdeploy pipeline vs plain transformers.

    python -m bench.throughput --sizes 1b --tiles 1 12 --out bench/results/h100-1b.json
    python -m bench.throughput table a.json b.json     # one table over several runs' results

For each checkpoint size (random weights, real InternVL2 layer sizes) and tile budget, each contender runs
in its own process on the same JPEGs (640x480) with greedy decoding, `ignore_eos` and 64 new tokens, while
nvidia-smi samples GPU utilisation. Prints a Markdown table (images/s, output tokens/s, GPU util, ratio to
the pipeline, startup) and writes the raw JSON. See bench/contenders.py for what each contender does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.bound import Shapes, bound_images_per_s, flops_per_image, measure_bf16_tflops
from bench.data import OUTPUT_LENGTHS, output_length, write_images, write_mixed_images
from bench.gpu_monitor import GpuMonitor


def ensure_checkpoint(root: Path, size: str) -> Path:
    from raylens.checkpoints.tiny import write_tiny_checkpoint

    path = root / f"internvl2-{size}-random"
    if not (path / "config.json").exists():
        t = time.perf_counter()
        llm = "internlm2" if size == "2b" else "qwen2"
        write_tiny_checkpoint(path, format="internvl_chat", size=size, llm=llm, seed=0, max_tiles=12)
        print(f"wrote {path} in {time.perf_counter() - t:.1f}s", flush=True)
    return path


def workload_bound(model_dir: Path, images: Path, n: int, max_tiles: int, new_tokens: int | None,
                   tflops: float | None) -> dict:
    """Mean matmul FLOPs per image of this workload (tiles from each image's size, its answer length) and
    the images/s that `tflops` allows (bench/bound.py); the prompt's text tokens counted with the model's
    own tokenizer and template."""
    from PIL import Image

    from raylens.checkpoints.formats import read_model_spec
    from raylens.images import find_grid, num_tiles_for

    spec = read_model_spec(model_dir)
    tiling = spec.tiling(max_tiles)
    shapes = Shapes.from_dir(model_dir)
    text = _prompt_text_tokens(model_dir, spec)
    flops = []
    for path in sorted(images.glob("*.jpg"))[:n]:
        with Image.open(path) as im:
            tiles = num_tiles_for(find_grid(*im.size, tiling), tiling)
        flops.append(flops_per_image(shapes, tiles=tiles, text_tokens=text,
                                     new_tokens=new_tokens or output_length(path.name)))
    mean = sum(flops) / len(flops)
    return {"flops_per_image": mean, "bound_images_per_s": bound_images_per_s(tflops, mean)}


def _prompt_text_tokens(model_dir: Path, spec) -> int:
    """Tokens of the prompt around the image: system message, roles, question, <img></img>."""
    from transformers import AutoTokenizer

    from bench.contenders import PROMPT
    from raylens.prompts import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    prompt = build_prompt(spec.chat_template(), PROMPT, num_images=1,
                          system_message=spec.system_message).replace("<image>", "<img></img>")
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc): what a contender started, and only that."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_contender(name: str, args: dict, workdir: Path, timeout: int, profile_dir: Path | None = None,
                  gpu_sample_ms: int = 500, profile_gil: bool = False) -> dict:
    out = workdir / f"{name.replace('@', '-')}-{args['size']}-t{args['max_tiles']}.json"
    label, name = name, name.split("@")[0]
    command = [sys.executable, "-m", "bench.contenders", name, json.dumps(args), str(out)]
    if profile_dir is not None:  # py-spy samples the contender and every process it starts (Ray workers too)
        profile_dir.mkdir(parents=True, exist_ok=True)
        trace = profile_dir / f"{label.replace('@', '-')}-{args['size']}-t{args['max_tiles']}.txt"
        command = ["py-spy", "record", "--subprocesses", "--rate", "20", "--format", "raw", "--output", str(trace),
                   *(["--gil"] if profile_gil else []), "--", *command]
    log = out.with_suffix(".log")  # the whole output; the JSON keeps only its tail
    # Output to files, not pipes: Ray's daemons inherit them and outlive a killed contender, and reading a
    # pipe to its end would then wait for them (a timed-out run used to hang its caller).
    with GpuMonitor(interval_ms=gpu_sample_ms) as gpu, open(log.with_suffix(".out"), "w+") as out_f, \
            open(log.with_suffix(".err"), "w+") as err_f:
        t = time.perf_counter()
        # Its own session, so that a contender past its time limit goes down with every process it started.
        proc = subprocess.Popen(command, stdout=out_f, stderr=err_f, text=True, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            started = descendants(proc.pid)  # Ray's daemons among them: they leave the contender's group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pid in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        wall = time.perf_counter() - t
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read() + (f"\ntimed out after {timeout} s" if timed_out else "")
    log.write_text(stdout + "\n" + stderr)
    if proc.returncode != 0 or not out.exists():  # (py-spy exits 0 whatever its child did)
        return {"contender": label, "error": (stdout[-2000:] + stderr[-4000:]), "wall_s": round(wall, 1), "log": str(log)}
    r = json.loads(out.read_text())
    r.update(contender=label, wall_s=round(wall, 1))
    r["images_per_s"] = round(r["images"] / r["steady_s"], 2) if r["steady_s"] > 0 else None
    r["output_tokens_per_s"] = round(r["output_tokens"] / r["steady_s"], 1) if r["steady_s"] > 0 else None
    r["gpu_util_mean"] = gpu.mean_between(r["t_start"], r["t_end"])
    # Samples of the measured window (seconds from its start), for plots and for reading the GPU's idle gaps.
    r["gpu_util_samples"] = [(round(t - r["t_start"], 2), u) for t, u in gpu.samples if r["t_start"] <= t <= r["t_end"]][-3000:]
    if "t0" in r:  # the whole run on the contender's own clock, start-up included (timelines use it too)
        r["gpu_util_all"] = [(round(t - r["t0"], 2), u) for t, u in gpu.samples][-6000:]
    return r


def _parse_layout(label: str) -> tuple[str, int, int]:
    """(kind, engines, GPUs per engine) of a contender label; ("", 1, 1) for one without a layout."""
    if "@" not in label:
        return "", 1, 1
    layout = label.split("@", 1)[1]
    match = re.fullmatch(r"(?:(r|x|tp)([1-9][0-9]*)|x([1-9][0-9]*)tp([1-9][0-9]*))", layout)
    if match is None:
        raise ValueError(f"unknown layout {layout!r} in contender {label!r} (use @rN, @xN, @tpN or @xNtpK)")
    if match[3]:
        return "xtp", int(match[3]), int(match[4])
    kind, n = match[1], int(match[2])
    return kind, (1 if kind == "tp" else n), (n if kind == "tp" else 1)


def contender_layout(label: str) -> dict:
    """How a raylens label lays engines out on GPUs: `raylens@r2` two engines sharing one GPU, `raylens@x2`
    two engines on a GPU each, `raylens@tp2` one engine spanning two GPUs (lmdeploy tensor parallelism),
    `raylens@x4tp2` four engines of two GPUs each."""
    kind, engines, gpus = _parse_layout(label)
    if not kind:
        return {}
    if kind == "r":  # the job itself gives each engine its share of the KV cache (jobs.caption.engine_options_for)
        return dict(replicas=engines, gpus_per_replica=round(1 / engines, 3))
    return dict(replicas=engines, gpus_per_replica=float(gpus))


def gpus_used(label: str) -> int:
    """GPUs a contender occupies (a shared GPU counts once)."""
    kind, engines, gpus = _parse_layout(label)
    return 1 if kind in ("", "r") else engines * gpus


def _scaling(r: dict, results: list[dict]) -> str:
    """Speed-up over `raylens` on one GPU (same shape and tiles) and the per-GPU efficiency, for contenders
    on several GPUs: issue 5's target is 90% of linear."""
    n = gpus_used(r["contender"])
    base = next((x for x in results if x["contender"] == "raylens" and x["size"] == r["size"]
                 and x["max_tiles"] == r["max_tiles"] and x.get("workload") == r.get("workload")
                 and x.get("images_per_s")), None)
    if n == 1 or base is None:
        return "-"
    speedup = r["images_per_s"] / base["images_per_s"]
    return f"{speedup:.2f}x on {n} GPUs ({100 * speedup / n:.0f}%)"


def table(results: list[dict]) -> str:
    lines = ["| size | max tiles | contender | images | images/s | output tok/s | GPU util % | vs pipeline "
             "| vs raylens on 1 GPU (efficiency) | FLOP bound images/s (share) | startup s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        base = next((x for x in results if x["contender"] == "pipeline" and x["size"] == r["size"]
                     and x["max_tiles"] == r["max_tiles"] and x.get("workload") == r.get("workload")
                 and x.get("images_per_s")), None)
        if "error" in r:
            lines.append(f"| {r['size']} | {r['max_tiles']} | {r['contender']} | | failed | | | | | | |")
            continue
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        bound = r.get("bound_images_per_s")
        share = f"{bound} ({100 * r['images_per_s'] / bound / gpus_used(r['contender']):.0f}%)" if bound else "-"
        lines.append(f"| {r['size']} | {r['max_tiles']} | {r['contender']} | {r['images']} | {r['images_per_s']} | {r['output_tokens_per_s']} "
                     f"| {r['gpu_util_mean']} | {ratio} | {_scaling(r, results)} | {share} | {r['startup_s']:.0f} |")
    return "\n".join(lines)


def table_of_files(paths: list[str]) -> str:
    """One table over the results of several runs (e.g. a pipeline and a raylens run of one device call
    given different image counts, so that each has at least 30 s of steady state). Every bound uses the
    highest bf16 rate measured among the files: it is one GPU's rate, and a lower measurement only means
    that something else shared the GPU while it was taken."""
    files = [json.loads(Path(path).read_text()) for path in paths]
    tflops = max((f["bf16_tflops"] for f in files if f.get("bf16_tflops")), default=None)
    results = []
    for f in files:
        for r in f["results"]:
            if tflops and r.get("flops_per_image"):
                r = dict(r, bound_images_per_s=bound_images_per_s(tflops, r["flops_per_image"]))
            results.append(r)
    return table(results)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["table"]:  # python -m bench.throughput table RESULT.json [RESULT.json ...]
        print(table_of_files(argv[1:]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1b"], choices=["tiny", "1b", "2b"])
    p.add_argument("--tiles", nargs="+", type=int, default=[1, 12])
    p.add_argument("--contenders", nargs="+", default=["pipeline", "raylens", "transformers"])
    p.add_argument("--images", type=int, default=512, help="images at max tiles 1 (fewer at larger budgets)")
    p.add_argument("--images-many-tiles", type=int, default=128, help="images when max tiles > 4")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches-in-flight", type=int, default=8, help="the raylens contenders' --batches-in-flight")
    p.add_argument("--engine", default="lmdeploy", help="the raylens contenders' engine (transformers: a CPU smoke run)")
    p.add_argument("--engine-options", default="{}", help="JSON PytorchEngineConfig options for lmdeploy contenders")
    from jobs.caption_config import CaptionJobConfig  # light: no torch, no ray

    p.add_argument("--tiles-on-cpu", action=argparse.BooleanOptionalAction, default=CaptionJobConfig.tiles_on_cpu,
                   help="the raylens contenders' --tiles-on-cpu (tiles cut and normalised in the CPU stage, the job's "
                   "default); --no-tiles-on-cpu: the engine actor makes them")
    p.add_argument("--workdir", default="/tmp/raylens-bench")
    p.add_argument("--timeout", type=int, default=400, help="seconds per contender run")
    p.add_argument("--out", required=True, help="JSON file for the raw results")
    p.add_argument("--gpu-sample-ms", type=int, default=500, help="GPU utilisation sampling interval")
    p.add_argument("--timeline", action="store_true", help="raylens contenders record each engine's held requests, "
                   "lmdeploy scheduler state (running/waiting) every 100 ms and batch arrivals (bench.timed_engine)")
    p.add_argument("--self-profile", default=None, metavar="DIR", help="each engine actor (and the pipeline) "
                   "py-spies itself for --self-profile-s seconds, --self-profile-after-s after its first batch")
    p.add_argument("--self-profile-after-s", type=float, default=10.0)
    p.add_argument("--self-profile-s", type=int, default=15)
    p.add_argument("--profile-gil", action="store_true", help="profile only threads holding the GIL (py-spy --gil): "
                   "who keeps the others waiting")
    p.add_argument("--profile", default=None, help="folder for py-spy profiles (collapsed stacks) of each contender; "
                   "profiled runs are slower, so their figures are not quoted")
    p.add_argument("--workload", choices=("fixed", "mixed"), default="fixed",
                   help="fixed: 640x480 JPEGs, every answer --max-new-tokens long; mixed: thumbnails to 12-MP "
                   "photos (bench.data.MIXED_SIZES), each answer 8..128 tokens (bench.data.output_length)")
    a = p.parse_args(argv)

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    mixed = a.workload == "mixed"
    images = work / ("images-mixed" if mixed else "images")
    count = max(a.images if t <= 4 else a.images_many_tiles for t in a.tiles)
    write_mixed_images(images, count) if mixed else write_images(images, count)
    tflops = measure_bf16_tflops()
    results = []
    for size in a.sizes:
        ckpt = ensure_checkpoint(work, size)
        for tiles in a.tiles:
            n = a.images if tiles <= 4 else a.images_many_tiles
            bound = workload_bound(ckpt, images, n, tiles, None if mixed else a.max_new_tokens, tflops)
            args = dict(size=size, model=str(ckpt), images=str(images), n_images=n, max_tiles=tiles,
                        workload=a.workload, max_new_tokens=OUTPUT_LENGTHS[1] if mixed else a.max_new_tokens, batch_size=a.batch_size, replicas=a.replicas,
                        gpus_per_replica=a.gpus_per_replica, engine_options=json.loads(a.engine_options),
                        engine=a.engine, batches_in_flight=a.batches_in_flight, timeline=a.timeline,
                        tiles_on_cpu=a.tiles_on_cpu,
                        self_profile=a.self_profile and {"dir": a.self_profile, "after_s": a.self_profile_after_s,
                                                         "duration_s": a.self_profile_s})
            for name in a.contenders:
                run_args = dict(args, **contender_layout(name))
                r = run_contender(name, run_args, work, a.timeout, Path(a.profile) if a.profile else None, a.gpu_sample_ms,
                                  a.profile_gil)
                r.update(size=size, max_tiles=tiles, n_images=n, workload=a.workload, settings=run_args, **bound)
                print(json.dumps({k: v for k, v in r.items() if k not in ("gpu_util_samples", "gpu_util_all", "timelines", "settings")}), flush=True)
                results.append(r)
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps({"results": results, "host": os.uname().nodename,
                                                   "bf16_tflops": tflops}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
