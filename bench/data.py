"""Benchmark inputs: N synthetic photos-sized JPEGs on disk, the same files for every contender."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(out_dir: str | Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0,
                 processes: int | None = None) -> list[Path]:
    """Noise-textured JPEGs (realistic decode cost: JPEG of a busy image, not a flat colour). Each image's noise
    comes from (seed, i), so the files are the same however many are written at once; more than 64 missing
    ones are written by a process pool (4096 took 80 s on one core of the GPU machine, a device call's time)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / f"img_{i:06d}.jpg", i, size, seed) for i in range(n)]
    missing = [job for job in jobs if not job[0].exists()]
    if len(missing) > 64:
        from multiprocessing import Pool

        with Pool(processes) as pool:
            pool.map(_write_textured, missing, chunksize=16)
    else:
        for job in missing:
            _write_textured(job)
    return [path for path, *_ in jobs]


def _write_textured(job: tuple[Path, int, tuple[int, int], int]) -> None:
    path, i, (w, h), seed = job
    base = np.random.default_rng(seed).integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    shifted = np.roll(base, shift=(i * 7) % (h // 8), axis=0)
    noise = np.random.default_rng([seed, i]).integers(0, 32, size=(h, w, 3), dtype=np.uint8)
    pixels = np.kron(shifted, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w] // 2 + noise * 2
    Image.fromarray(pixels).save(path, quality=90)


# A user's data, roughly: thumbnails, web images, phone photos and 12-megapixel camera photos, in
# landscape and portrait (share, (width, height) choices). Used by `bench.throughput --workload mixed`.
MIXED_SIZES = (
    (0.25, ((128, 96), (160, 120), (320, 240), (240, 320))),
    (0.35, ((640, 480), (800, 600), (1024, 768), (1280, 720), (960, 1280))),
    (0.25, ((1920, 1080), (2048, 1536), (1536, 2048))),
    (0.15, ((4000, 3000), (3000, 4000))),
)
OUTPUT_LENGTHS = (8, 128)


def mixed_size(i: int, seed: int = 0) -> tuple[int, int]:
    """The size of image `i` of the mixed set (deterministic)."""
    rng = np.random.default_rng([seed, i])
    shares = np.array([share for share, _ in MIXED_SIZES])
    group = MIXED_SIZES[int(rng.choice(len(MIXED_SIZES), p=shares / shares.sum()))][1]
    return group[int(rng.integers(len(group)))]


def output_length(name: str) -> int:
    """Tokens to generate for the image named `name` in the mixed workload: uniform over 8..128, the same
    for every contender (a random-weight model never stops by itself, so each request's length is set)."""
    import zlib

    lo, hi = OUTPUT_LENGTHS
    return lo + zlib.crc32(Path(name).name.encode()) % (hi - lo + 1)


def _write_mixed(args: tuple[Path, int, int]) -> Path:
    path, i, seed = args
    if not path.exists():
        w, h = mixed_size(i, seed)
        rng = np.random.default_rng([seed, i, 1])
        base = rng.integers(0, 256, size=(-(-h // 16), -(-w // 16), 3), dtype=np.uint8)
        pixels = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w]
        pixels = pixels // 2 + rng.integers(0, 64, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return path


def write_mixed_images(out_dir: str | Path, n: int, seed: int = 0, processes: int | None = None) -> list[Path]:
    """N JPEGs of `MIXED_SIZES` (textured, so decoding costs what a photo costs), written in parallel."""
    from multiprocessing import Pool

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / f"mix_{i:06d}.jpg", i, seed) for i in range(n)]
    with Pool(processes) as pool:
        return pool.map(_write_mixed, jobs)
