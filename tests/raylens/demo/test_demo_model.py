"""The shipped demo model really captions held-out shapes images, through the loading path users get.

Generation is done with the model directly (`_caption`, through `jobs.train_demo.caption_images`), building
inputs the way inference does: image bytes -> `raylens.images` tiles with the checkpoint's tiling -> Hermes-2
prompt with the image tokens expanded -> greedy `generate` -> cut at the stop words.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

from jobs.train_demo import caption_images
from raylens.checkpoints.formats import FORMAT_ORIGINAL, read_model_spec
from raylens.checkpoints.loading import load_hf_model
from raylens.demo import MODEL_DIR, shapes
from raylens.images import decode_image

EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples" / "images"
HELD_OUT_IMAGES = 120
RANDOM_MODEL_IMAGES = 40  # a random model runs to max_new_tokens on every image: keep its share of the time small
HELD_OUT_SEED = 20240  # any seed: the "held_out" split is a stream training never draws from


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _caption(model, tokenizer, spec, images_bytes) -> list[str]:
    """Greedy captions of encoded images: decoded the way the job decodes them, then captioned by the
    demo trainer's own evaluation (left-padded batches, the default caption prompt, cut at the stop words)."""
    tiling = spec.tiling()
    images = [decode_image(data) for data in images_bytes]
    return caption_images(model, tokenizer, tiling, spec.image_tokens_per_tile, images, batch_size=40)


def _accuracy(predictions, expected) -> float:
    return sum(p == e for p, e in zip(predictions, expected)) / len(expected)


@pytest.fixture(scope="module")
def demo_model():
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"the shipped demo model is missing from {MODEL_DIR}: python -m jobs.train_demo --out {MODEL_DIR}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_hf_model(MODEL_DIR)


@pytest.fixture(scope="module")
def held_out():
    samples = shapes.held_out_dataset(HELD_OUT_IMAGES, seed=HELD_OUT_SEED)
    return [_png_bytes(image) for image, _, _ in samples], [caption for _, caption, _ in samples]


def test_shipped_checkpoint_is_a_small_original_format_qwen2_model():
    spec = read_model_spec(MODEL_DIR)
    assert spec.format == FORMAT_ORIGINAL
    assert spec.template == "Hermes-2"
    assert spec.llm_architecture == "Qwen2ForCausalLM"
    assert (spec.tile_size, spec.image_tokens_per_tile, spec.use_thumbnail) == (112, 16, True)
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"demo model is {size / 2**20:.1f} MiB"
    assert (MODEL_DIR / "TRAINING.md").is_file()


def test_demo_model_captions_held_out_images(demo_model, held_out):
    model, tokenizer, spec = demo_model
    images, captions = held_out
    predictions = _caption(model, tokenizer, spec, images)
    accuracy = _accuracy(predictions, captions)
    mistakes = [(e, p) for e, p in zip(captions, predictions) if e != p][:5]
    assert accuracy >= 0.9, f"exact-match accuracy {accuracy:.2f} on {len(captions)} images; e.g. {mistakes}"


def test_a_random_model_of_the_same_config_does_not(demo_model, held_out):
    model, tokenizer, spec = demo_model
    torch.manual_seed(0)
    random_model = type(model)(model.config).eval()
    random_model.generation_config = model.generation_config
    images, captions = (part[:RANDOM_MODEL_IMAGES] for part in held_out)
    assert _accuracy(_caption(random_model, tokenizer, spec, images), captions) < 0.1


def _caption_from_file_name(path: Path) -> str:
    match = re.fullmatch(r"([a-z]+)_([a-z]+)_on_([a-z]+)", path.stem)
    assert match, f"example {path.name} is not named COLOR_SHAPE_on_BACKGROUND"
    return shapes.format_caption(*match.groups())


def test_example_images_are_captioned_as_named(demo_model):
    model, tokenizer, spec = demo_model
    paths = sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix in (".png", ".jpg", ".jpeg"))
    assert 6 <= len(paths) <= 8
    predictions = _caption(model, tokenizer, spec, [p.read_bytes() for p in paths])
    assert predictions == [_caption_from_file_name(p) for p in paths]
