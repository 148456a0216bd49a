"""raylens.demo.shapes: reproducible synthetic images whose captions match what is drawn."""
from __future__ import annotations

import random

import numpy as np
import pytest

from raylens.demo import shapes


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_samples_other_seed_other_samples():
    a = shapes.generate_dataset(12, seed=3)
    b = shapes.generate_dataset(12, seed=3)
    c = shapes.generate_dataset(12, seed=4)
    assert [s[1:] for s in a] == [s[1:] for s in b]
    assert all(np.array_equal(_pixels(x[0]), _pixels(y[0])) for x, y in zip(a, b))
    assert [s[2] for s in a] != [s[2] for s in c]


def test_generate_sample_uses_only_the_rng_it_is_given():
    random.seed(0)
    np.random.seed(0)
    first = shapes.generate_sample(random.Random(7))
    random.seed(1)  # changing the global RNGs changes nothing
    np.random.seed(1)
    second = shapes.generate_sample(random.Random(7))
    assert first[1:] == second[1:]
    assert np.array_equal(_pixels(first[0]), _pixels(second[0]))


def test_held_out_split_never_repeats_training_samples():
    train = {s[2] for s in shapes.generate_dataset(300, seed=0, split="train")}
    warmup = {s[2] for s in shapes.generate_dataset(300, seed=0, split="warmup")}
    held_out = {s[2] for s in shapes.held_out_dataset(300, seed=0)}
    assert not (train | warmup) & held_out
    assert not train & warmup
    with pytest.raises(ValueError, match="split"):
        shapes.split_rng(0, "test")


@pytest.mark.parametrize(
    ("color", "shape", "background", "caption"),
    [
        ("red", "circle", "blue", "a red circle on a blue background."),
        ("orange", "star", "white", "an orange star on a white background."),
        ("green", "triangle", "orange", "a green triangle on an orange background."),
    ],
)
def test_caption_format(color, shape, background, caption):
    assert shapes.format_caption(color, shape, background) == caption


def test_captions_match_attributes_and_the_pixels():
    for image, caption, attrs in shapes.generate_dataset(200, seed=11):
        assert caption == attrs.caption()
        assert caption.split() == [
            "an" if attrs.color[0] in "aeiou" else "a", attrs.color, attrs.shape, "on",
            "an" if attrs.background[0] in "aeiou" else "a", attrs.background, "background.",
        ]
        assert attrs.color != attrs.background
        assert attrs.color in shapes.SHAPE_COLORS and attrs.background in shapes.BACKGROUND_COLORS
        assert attrs.shape in shapes.SHAPES
        pixels = _pixels(image)
        # The shape's centre has the shape's colour, the corner farthest from it the background's.
        cx, cy = attrs.center
        assert tuple(pixels[cy, cx]) == shapes.PALETTE[attrs.color]
        far_x = 0 if cx > attrs.width / 2 else attrs.width - 1
        far_y = 0 if cy > attrs.height / 2 else attrs.height - 1
        assert tuple(pixels[far_y, far_x]) == shapes.PALETTE[attrs.background]
        # Only the two palette colours are drawn (no anti-aliasing blends).
        colours = {tuple(c) for c in pixels.reshape(-1, 3)[:: max(1, pixels.size // 3 // 5000)]}
        assert colours <= {shapes.PALETTE[attrs.color], shapes.PALETTE[attrs.background]}


def test_sizes_aspects_and_shape_extent_in_range():
    samples = shapes.generate_dataset(400, seed=5)
    aspects = set()
    for image, _, attrs in samples:
        width, height = image.size
        assert image.mode == "RGB"
        assert (width, height) == (attrs.width, attrs.height)
        assert shapes.MIN_SIDE <= min(width, height) and max(width, height) <= shapes.MAX_SIDE
        ratio = width / height
        matches = [(w, h) for w, h in shapes.ASPECTS if abs(ratio - w / h) < 0.05]
        assert matches, f"{width}x{height} is none of {shapes.ASPECTS}"
        aspects.add(matches[0])
        short = min(width, height)
        assert shapes.MIN_SHAPE_FRACTION * short - 1 <= attrs.extent <= shapes.MAX_SHAPE_FRACTION * short + 1
        r = attrs.extent / 2
        cx, cy = attrs.center
        assert r - 1 <= cx <= width - r + 1 and r - 1 <= cy <= height - r + 1  # the shape lies inside
    assert aspects == set(shapes.ASPECTS)
    # Every colour, shape and background shows up in a few hundred samples.
    assert {a.color for *_, a in samples} == set(shapes.SHAPE_COLORS)
    assert {a.background for *_, a in samples} == set(shapes.BACKGROUND_COLORS)
    assert {a.shape for *_, a in samples} == set(shapes.SHAPES)


def test_every_shape_stands_out_from_every_background_by_brightness():
    def luma(rgb):
        r, g, b = rgb
        return 0.299 * r + 0.587 * g + 0.114 * b

    assert not set(shapes.SHAPE_PALETTE) & set(shapes.BACKGROUND_PALETTE)
    darkest_background = min(map(luma, shapes.BACKGROUND_PALETTE.values()))
    assert all(luma(c) < darkest_background - 60 for c in shapes.SHAPE_PALETTE.values())


def test_example_samples_vary_aspect_and_shape():
    samples = shapes.example_samples(8, seed=0)
    assert len({c for _, c, _ in samples}) == 8
    assert {a.shape for *_, a in samples} == set(shapes.SHAPES)
    assert {round(a.width / a.height, 1) for *_, a in samples} == {1.0, 1.3, 0.8, 2.0}
    assert all(shapes.example_file_name(a) == f"{a.color}_{a.shape}_on_{a.background}.png" for *_, a in samples)


def test_all_captions_and_words():
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == len(shapes.SHAPE_COLORS) * len(shapes.BACKGROUND_COLORS) * len(shapes.SHAPES)
    words = set(shapes.caption_words())
    assert all(set(c[:-1].split()) | {"."} <= words for c in captions)


def test_every_shape_is_brighter_or_darker_than_every_background():
    """The contrast the demo model relies on (see the palette's comment): shapes darker than backgrounds."""
    def luma(rgb):
        r, g, b = rgb
        return 0.299 * r + 0.587 * g + 0.114 * b

    darkest_background = min(luma(c) for c in shapes.BACKGROUND_PALETTE.values())
    assert all(luma(c) < darkest_background - 40 for c in shapes.SHAPE_PALETTE.values())
