"""Synthetic "coloured shape on a plain background" images with exact captions.

This is the data set the shipped demo model (`raylens/demo/model`) is trained and checked on. Every
image shows one filled shape of a dark or saturated colour (`SHAPE_PALETTE`) on a plain light background
(`BACKGROUND_PALETTE`), and its caption is exactly

    "a {color} {shape} on a {background} background."

so a model's output can be scored by exact string match (`format_caption` writes "an" before a vowel,
which none of today's colour names needs). The generator is pure: all randomness comes from the
`random.Random` passed in (no global RNG), so a seed fixes every pixel.

Splits: `generate_dataset(n, seed, split=...)` derives each split's random stream from (seed, split), so
the `"held_out"` images for any seed come from a stream the training splits (`"train"`, `"warmup"`) never
draw from. `jobs/train_demo.py` trains on those two; accuracy checks use `"held_out"` with any seed.

This module knows nothing about tiles, prompts or models.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Iterator

from PIL import Image, ImageDraw

# Shapes are dark or saturated, backgrounds light: every shape stands out from its background by
# brightness. Why: with any colour on any colour, a ViT this small (trained from scratch on 2 CPU cores)
# must first learn "differs from the background" before it can see a shape at all, which took it over
# 1000 steps to reach 40% (measured); with a brightness contrast the shape is visible to its first layer
# and it separates four shapes in a few hundred steps. Each colour is one common word.
SHAPE_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 60, 210),
    "purple": (130, 40, 170),
    "black": (15, 15, 15),
}
BACKGROUND_PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "yellow": (245, 225, 60),
    "pink": (250, 185, 205),
    "gray": (185, 185, 185),
}
PALETTE: dict[str, tuple[int, int, int]] = {**SHAPE_PALETTE, **BACKGROUND_PALETTE}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPE_COLORS: tuple[str, ...] = tuple(SHAPE_PALETTE)
BACKGROUND_COLORS: tuple[str, ...] = tuple(BACKGROUND_PALETTE)
# All four stay recognisable when the whole image is squeezed into one 112x112 tile (a 35% shape is then
# ~40 px): no pair of them is a rotation or a stretch of another.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# (width, height) ratios of the whole image.
ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (2, 1))
MIN_SIDE = 64
MAX_SIDE = 640
# Shape extent as a fraction of the image's short side.
MIN_SHAPE_FRACTION = 0.35
MAX_SHAPE_FRACTION = 0.80
SPLITS = ("train", "warmup", "held_out")  # "warmup": a second training stream (jobs/train_demo.py stage 1)

CAPTION_FORMAT = "{a_color} {color} {shape} on {a_background} {background} background."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_caption(color: str, shape: str, background: str) -> str:
    """`"a {color} {shape} on a {background} background."`, with "an" before a vowel."""
    return CAPTION_FORMAT.format(
        a_color=_article(color), color=color, shape=shape, a_background=_article(background), background=background
    )


@dataclass(frozen=True)
class ShapeAttributes:
    """What one sample shows; `caption()` is the exact target text."""

    color: str
    shape: str
    background: str
    width: int
    height: int
    center: tuple[int, int]  # shape centre, pixels
    extent: int  # shape diameter / side, pixels

    def caption(self) -> str:
        return format_caption(self.color, self.shape, self.background)

    def as_dict(self) -> dict:
        return asdict(self)


def caption_words() -> list[str]:
    """Every word (and the final '.') that can appear in a caption, e.g. for a tokenizer corpus."""
    return sorted(set(COLORS) | set(SHAPES) | {"a", "an", "on", "background", "."})


def all_captions() -> list[str]:
    return [format_caption(c, s, b) for c in SHAPE_COLORS for s in SHAPES for b in BACKGROUND_COLORS]


def sample_attributes(rng: random.Random) -> ShapeAttributes:
    """Draw colour, shape, background, image size and placement."""
    color = rng.choice(SHAPE_COLORS)
    background = rng.choice(BACKGROUND_COLORS)
    shape = rng.choice(SHAPES)
    aw, ah = rng.choice(ASPECTS)
    # Both sides within [MIN_SIDE, MAX_SIDE]: the short side bounds the long one.
    short = rng.randint(MIN_SIDE, MAX_SIDE * min(aw, ah) // max(aw, ah))
    long = short * max(aw, ah) // min(aw, ah)
    width, height = (long, short) if aw >= ah else (short, long)
    extent = max(8, round(short * rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION)))
    half = extent / 2
    cx = round(rng.uniform(half, width - half))
    cy = round(rng.uniform(half, height - half))
    return ShapeAttributes(color, shape, background, width, height, (cx, cy), extent)


def _star_points(cx: float, cy: float, r_outer: float, r_inner: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = r_outer if i % 2 == 0 else r_inner
        a = -math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _draw_shape(image: Image.Image, attrs: ShapeAttributes, fill) -> None:
    draw = ImageDraw.Draw(image)
    cx, cy = attrs.center
    r = attrs.extent / 2
    box = (cx - r, cy - r, cx + r - 1, cy + r - 1)
    if attrs.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif attrs.shape == "square":
        draw.rectangle(box, fill=fill)
    elif attrs.shape == "triangle":  # pointing up, as wide as it is tall
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif attrs.shape == "star":  # five points
        draw.polygon(_star_points(cx, cy, r, r * 0.45), fill=fill)
    else:
        raise ValueError(f"unknown shape {attrs.shape!r}; known: {SHAPES}")


def render(attrs: ShapeAttributes) -> Image.Image:
    """Draw the sample described by `attrs` (RGB, `attrs.width` x `attrs.height`)."""
    image = Image.new("RGB", (attrs.width, attrs.height), PALETTE[attrs.background])
    _draw_shape(image, attrs, PALETTE[attrs.color])
    return image


def render_mask(attrs: ShapeAttributes) -> Image.Image:
    """The shape's pixels of `render(attrs)` as an "L" image: 255 on the shape, 0 on the background."""
    mask = Image.new("L", (attrs.width, attrs.height), 0)
    _draw_shape(mask, attrs, 255)
    return mask


def generate_sample(rng: random.Random) -> tuple[Image.Image, str, ShapeAttributes]:
    """One (image, caption, attributes) triple drawn from `rng`."""
    attrs = sample_attributes(rng)
    return render(attrs), attrs.caption(), attrs


def split_rng(seed: int, split: str = "train") -> random.Random:
    """The random stream of one split: (seed, split) -> a stream no other split shares."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # A string seed is hashed with SHA-512 by random.Random (stable across runs, unlike hash()).
    return random.Random(f"raylens.demo.shapes/{split}/{int(seed)}")


def iter_samples(seed: int, split: str = "train") -> Iterator[tuple[Image.Image, str, ShapeAttributes]]:
    """An endless, reproducible stream of samples of one split."""
    rng = split_rng(seed, split)
    while True:
        yield generate_sample(rng)


def generate_dataset(n: int, seed: int, split: str = "train") -> list[tuple[Image.Image, str, ShapeAttributes]]:
    """The first `n` samples of `iter_samples(seed, split)`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_samples(seed, split)
    return [next(stream) for _ in range(n)]


def held_out_dataset(n: int, seed: int = 0) -> list[tuple[Image.Image, str, ShapeAttributes]]:
    """Fresh evaluation images: the `"held_out"` split, which training never draws from."""
    return generate_dataset(n, seed, split="held_out")


def example_samples(n: int = 8, seed: int = 0) -> list[tuple[Image.Image, str, ShapeAttributes]]:
    """`n` held-out samples for `examples/images`: aspect ratios and shapes in turn, no caption twice."""
    stream = iter_samples(seed, "held_out")
    picked: list[tuple[Image.Image, str, ShapeAttributes]] = []
    while len(picked) < n:
        i = len(picked)
        aw, ah = ASPECTS[i % len(ASPECTS)]
        shape = SHAPES[(i + i // len(ASPECTS)) % len(SHAPES)]
        image, caption, attrs = next(stream)
        if (abs(attrs.width / attrs.height - aw / ah) < 0.02 and attrs.shape == shape
                and caption not in {c for _, c, _ in picked}):
            picked.append((image, caption, attrs))
    return picked


def example_file_name(attrs: ShapeAttributes, suffix: str = ".png") -> str:
    """`red_circle_on_blue.png`: the caption, readable back from the name."""
    return f"{attrs.color}_{attrs.shape}_on_{attrs.background}{suffix}"


def main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="python -m raylens.demo.shapes",
        description="Write example shapes images named by their caption (e.g. red_circle_on_blue.png).",
    )
    parser.add_argument("out_dir", help="directory to write the images into")
    parser.add_argument("--n", type=int, default=8, help="number of images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="held-out split seed (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for image, caption, attrs in example_samples(args.n, args.seed):
        path = out / example_file_name(attrs)
        image.save(path, optimize=True)
        print(f"{path}  {attrs.width}x{attrs.height}  {caption}")


if __name__ == "__main__":
    main()
