"""CPU-only benchmark, fast enough for CI machines: where the CPU side of the job spends its time.

    python -m bench.cpu --out bench/results/cpu.json

Reports (a) preprocessing images/s per core (decode + grid + downscale, and tile + normalise) for photo
sizes and tile budgets, exact (the default: equal to the reference preprocessing) and with
`--fast-jpeg-decode` (JPEG draft mode), with how far the fast path's tiles are from the exact ones, and
(b) the Ray pipeline's overhead: the job on N images with the tiny model versus the same engine called
directly in a loop. It reports; it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raylens.images import TilingSpec, decode_prepared, make_tiles, pixel_values_for


def _jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    pixels = np.kron(small, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rate(data: bytes, spec: TilingSpec, seconds: float, fast_jpeg: bool):
    """(decode+grid+downscale per s, tile+normalise per s, the last PreparedImage) per core: CPU seconds of
    this process (`time.process_time`), so a machine shared with other work still gives per-core figures."""
    n, t0 = 0, time.perf_counter()
    prep_s = tile_s = 0.0
    while time.perf_counter() - t0 < seconds or n == 0:
        a = time.process_time()
        prepared = decode_prepared(data, spec, fast_jpeg=fast_jpeg)  # what the job's CPU tasks run
        b = time.process_time()
        pixel_values_for(prepared)
        prep_s += b - a
        tile_s += time.process_time() - b
        n += 1
    return round(n / max(prep_s, 1e-9), 1), round(n / max(tile_s, 1e-9), 1), prepared


def _difference(fast, exact) -> dict:
    """How far the fast path's tiles are from the exact ones: grey levels (uint8) and normalised values."""
    a = np.stack([np.asarray(t) for t in make_tiles(fast)]).astype(np.int16)
    b = np.stack([np.asarray(t) for t in make_tiles(exact)]).astype(np.int16)
    levels = np.abs(a - b)
    values = np.abs(pixel_values_for(fast) - pixel_values_for(exact))
    return {"fast_max_levels": int(levels.max()), "fast_mean_levels": round(float(levels.mean()), 3),
            "fast_values_off_pct": round(100 * float((levels > 0).mean()), 1),
            "fast_max_abs_normalised": round(float(values.max()), 3)}


def preprocessing(seconds: float = 2.0) -> list[dict]:
    rows = []
    for size in [(640, 480), (1920, 1080), (4032, 3024)]:
        data = _jpeg(size)
        for max_tiles in (1, 6, 12):
            spec = TilingSpec(tile_size=448, max_tiles=max_tiles)
            exact_rate, tile_rate, exact = _rate(data, spec, seconds, fast_jpeg=False)
            fast_rate, _, fast = _rate(data, spec, seconds, fast_jpeg=True)
            rows.append({"image": f"{size[0]}x{size[1]}", "max_tiles": max_tiles, "tiles": exact.num_tiles,
                         "decode_grid_downscale_per_s": exact_rate, "fast_jpeg_per_s": fast_rate,
                         "tile_normalise_per_s": tile_rate, **_difference(fast, exact)})
    return rows


def pipeline_overhead(n_images: int = 48) -> dict:
    import ray

    from bench.data import write_images
    from jobs.caption import main, setup
    from jobs.caption_config import CaptionJobConfig
    from raylens.checkpoints.tiny import write_tiny_checkpoint
    from raylens.engines.base import SamplingParams, VLRequest
    from raylens.engines.transformers_engine import TransformersEngine

    work = Path(tempfile.mkdtemp(prefix="raylens-cpu-bench-"))
    ckpt = write_tiny_checkpoint(work / "tiny", format="internvl_chat", seed=0, max_tiles=1)
    paths = write_images(work / "images", n_images)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)

    engine = TransformersEngine(str(ckpt), max_batch_size=16)
    spec = engine.spec.tiling(1)
    t0 = time.perf_counter()
    for i in range(0, n_images, 16):
        reqs = [VLRequest(str(p), "Describe.", decode_prepared(p.read_bytes(), spec)) for p in paths[i : i + 16]]
        asyncio.run(engine.generate(reqs, params))
    direct = time.perf_counter() - t0

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, logging_level="ERROR")
    cfg = CaptionJobConfig(input=str(work / "images"), output=str(work / "out"), model=str(ckpt), engine="transformers",
                           max_tiles=1, max_new_tokens=16, ignore_eos=True, batch_size=16)
    summary = main(setup(cfg))
    if started:
        ray.shutdown()
    return {"images": n_images, "direct_loop_s": round(direct, 2), "direct_images_per_s": round(n_images / direct, 1),
            "ray_job_wall_s": summary["wall_s"], "ray_job_images_per_s": summary["images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1.5, help="time per preprocessing measurement")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    result = {"preprocessing_one_core": preprocessing(a.seconds), "pipeline_overhead": pipeline_overhead(a.images)}
    print("| image | max tiles | tiles | decode+grid+downscale /s | with --fast-jpeg-decode /s | tile+normalise /s "
          "| fast: max / mean grey levels off | fast: values off | fast: max abs normalised |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["preprocessing_one_core"]:
        print(f"| {r['image']} | {r['max_tiles']} | {r['tiles']} | {r['decode_grid_downscale_per_s']} | "
              f"{r['fast_jpeg_per_s']} | {r['tile_normalise_per_s']} | {r['fast_max_levels']} / {r['fast_mean_levels']} | "
              f"{r['fast_values_off_pct']}% | {r['fast_max_abs_normalised']} |")
    print(json.dumps(result["pipeline_overhead"]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
