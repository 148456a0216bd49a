"""Benchmark inputs: N synthetic photos-sized JPEGs on disk, the same files for every contender."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(out_dir: str | Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """Noise-textured JPEGs (realistic decode cost: JPEG of a busy image, not a flat colour)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    base = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    for i in range(n):
        path = out / f"img_{i:06d}.jpg"
        if not path.exists():
            shifted = np.roll(base, shift=(i * 7) % (h // 8), axis=0)
            noise = rng.integers(0, 32, size=(h, w, 3), dtype=np.uint8)
            pixels = np.kron(shifted, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w] // 2 + noise * 2
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths
