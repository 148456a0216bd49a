"""raylens' model inputs against the references users move from, value for value (issue 11).

The references, each transcribed below with its source (a test oracle: the few functions needed, nothing
else), or run for real where the installed library holds it:

* MODEL CARD: the InternVL2 model cards' (OpenGVLab/InternVL2-1B/-2B README, "Quick Start") `build_transform`,
  `find_closest_aspect_ratio`, `dynamic_preprocess`, `load_image`. torchvision does not install beside
  torch 2.13 here, so its three transforms are written out exactly: `T.Resize((s, s), BICUBIC)` on a PIL
  image is PIL's `resize((s, s), BICUBIC)` (torchvision's functional resize hands PIL images to PIL);
  `ToTensor` is uint8 HWC -> float32 CHW divided by 255 in float32; `Normalize` subtracts and divides by
  float32 mean/std tensors in place. Done with torch, as torchvision does.
* LMDEPLOY: lmdeploy 0.18.0 `lmdeploy/vl/model/internvl.py`: its `find_closest_aspect_ratio` and
  `dynamic_preprocess` are the model card's (marked "copy from InternVL-Chat-V1-5", same text), called with
  the checkpoint's min/max_dynamic_patch, `vision_config.image_size` and `use_thumbnail`, and the same
  transform; images arrive through `lmdeploy/vl/media/image.py` `ImageMediaIO.load_bytes`:
  `Image.open(...).convert("RGB")` under `ImageFile.LOAD_TRUNCATED_IMAGES = True`.
* TRANSFORMERS: transformers 5.17's `GotOcr2ImageProcessorPil` (models/got_ocr2/image_processing_pil_got_ocr2.py),
  imported and run (`InternVLProcessor` calls it with `crop_to_patches=True`, processing_internvl.py `_defaults`).
* CONVERSATION: InternVL's `internvl_chat/internvl/conversation.py` (SeparatorStyle.MPT `get_prompt`) with the
  templates of the hub copies shipped beside InternVL2 (Hermes-2 / internlm2-chat / phi3-chat carry the InternVL
  system message there) and InternVL2.5/3 (`internvl2_5`), and the prompt assembly of InternVL2's
  `modeling_internvl_chat.py` `chat()`.

Intended differences, by name (each has its own test; no tolerance is loosened anywhere):
* HIGH_DEPTH_GREY: 16-bit / 32-bit / float grey is scaled to 8 bits; Pillow's `convert("RGB")` clips it.
* TRUNCATED_FILES: a truncated file is an `ImageError(truncated)` row; lmdeploy decodes what is there.
* PLACEHOLDERS_PER_IMAGE: several images with no `<image>` in the text get one placeholder each;
  `chat()` prepends one for all of them (and leaves the other images without one).
* GOTOCR2_TIE_ORDER: with min_tiles > 1, transformers enumerates candidate grids in another order than InternVL
  and can break an exact tie the other way; raylens follows InternVL (the models' own preprocessing).
"""
from __future__ import annotations

import io
import random
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from raylens.conversation import Conversation, Turn, render
from raylens.images import ImageError, TilingSpec, decode_prepared, find_grid, pixel_values_for
from raylens.prompts import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    INTERNVL2_5_SYSTEM_MESSAGE,
    INTERNVL_SYSTEM_MESSAGE,
    TEMPLATES,
    expand_image_placeholders,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------- MODEL CARD (+ LMDEPLOY)
def mc_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


@lru_cache(maxsize=None)
def mc_target_ratios(min_num, max_num):
    """`dynamic_preprocess`'s candidate list (built per call there; cached here for speed only)."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def mc_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = mc_target_ratios(min_num, max_num)
    target_aspect_ratio = mc_find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def mc_transform(img: Image.Image, input_size: int) -> torch.Tensor:
    """build_transform(input_size): Lambda(convert RGB) -> Resize((s, s), BICUBIC) -> ToTensor -> Normalize."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    img = img.resize((input_size, input_size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
    tensor = tensor.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32)
    return tensor.sub_(mean[:, None, None]).div_(std[:, None, None])


def mc_load_image(data: bytes, input_size=448, min_num=1, max_num=12, use_thumbnail=True) -> np.ndarray:
    """load_image (the card passes use_thumbnail=True and min 1; lmdeploy passes the config's values)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    images = mc_dynamic_preprocess(image, min_num=min_num, max_num=max_num, image_size=input_size,
                                   use_thumbnail=use_thumbnail)
    return torch.stack([mc_transform(im, input_size) for im in images]).numpy()


def lmdeploy_load_bytes(data: bytes) -> Image.Image:
    """lmdeploy 0.18 ImageMediaIO.load_bytes, with the module-level LOAD_TRUNCATED_IMAGES it sets."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def ours(data: bytes, tiling: TilingSpec) -> np.ndarray:
    return pixel_values_for(decode_prepared(data, tiling))


def gotocr2(data: bytes, tiling: TilingSpec) -> np.ndarray:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    processor = GotOcr2ImageProcessorPil(size={"height": tiling.tile_size, "width": tiling.tile_size},
                                         image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                                         crop_to_patches=True, min_patches=tiling.min_tiles, max_patches=tiling.max_tiles)
    out = processor(images=[Image.open(io.BytesIO(data))], return_tensors=None)
    return np.stack(out["pixel_values"])


# ------------------------------------------------------------------------------------------ grid choice
GRID_SIDES = sorted({1, 2, 3, 5, 7, 10, 13, 28, 50, 99, 100, 112, 150, 224, 300, 333, 448, 500, 640, 672, 896,
                     1000, 1080, 1344, 1500, 1920, 2000, 2240, 3000, 3024, 4000, 4032, 6000, 8000}
                    | set(range(17, 4000, 131)))


# Sizes whose aspect ratio is exactly a simple fraction: where exact ties between grids happen.
TIE_SIZES = sorted({(h * num // den, h) for h in (400, 500, 800, 1000, 1200, 2000) for num in range(1, 40)
                    for den in range(1, 13) if (h * num) % den == 0})
MIN_MAX = [(1, 1), (1, 6), (1, 12), (1, 40), (2, 4), (2, 6), (3, 12), (4, 4), (4, 12), (4, 24), (9, 9)]


@pytest.mark.parametrize("min_tiles,max_tiles", MIN_MAX)
def test_grid_choice_equals_the_model_card_over_thousands_of_sizes(min_tiles, max_tiles):
    tiling = TilingSpec(tile_size=448, min_tiles=min_tiles, max_tiles=max_tiles)
    candidates = mc_target_ratios(min_tiles, max_tiles)
    sizes = [(w, h) for w in GRID_SIDES for h in GRID_SIDES] + TIE_SIZES
    for w, h in sizes:
        assert find_grid(w, h, tiling) == mc_find_closest_aspect_ratio(w / h, candidates, w, h, 448), (w, h)
    assert len(sizes) > 5000


def test_transformers_grid_choice_agrees_except_tie_order_with_min_tiles_above_one():
    """GOTOCR2_TIE_ORDER: transformers' candidate order differs from InternVL's; with min 1 no tie depends on it."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    differ = []
    for min_tiles, max_tiles in [m for m in MIN_MAX if m != (1, 40)]:
        tiling = TilingSpec(tile_size=448, min_tiles=min_tiles, max_tiles=max_tiles)
        for w, h in TIE_SIZES + [(w, h) for w in GRID_SIDES[::3] for h in GRID_SIDES[::3]]:
            theirs = get_optimal_tiled_canvas((h, w), (448, 448), min_tiles, max_tiles)
            mine = find_grid(w, h, tiling)
            if theirs != mine:
                assert min_tiles > 1, (w, h, min_tiles, max_tiles)
                assert theirs[0] * theirs[1] == mine[0] * mine[1]  # an exact tie between grids of one size
                differ.append((w, h, min_tiles, max_tiles))
    assert (1000, 400, 4, 4) in differ  # e.g. transformers picks 2x2 there, InternVL 4x1


# ----------------------------------------------------------------------------------------------- pixels
def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """Photo-like uint8 RGB: smooth gradients, texture, a few hard edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / max(w, 1) * 255, y / max(h, 1) * 255, (x + y) / max(w + h, 1) * 255], axis=-1)
    base += rng.normal(0, 12, base.shape)
    base[: h // 3, : w // 4] = rng.integers(0, 256, 3)
    return np.clip(base, 0, 255).astype(np.uint8)


def _exif_rotated_jpeg(w, h, seed) -> bytes:
    image = Image.fromarray(_photo(w, h, seed))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display; no reference applies it, nor do we
    return _encode(image, "JPEG", quality=90, exif=exif)


def _palette(w, h, seed) -> Image.Image:
    """A "P" image: 64 colours, indices from the photo (cheaper than Pillow's quantizer)."""
    image = Image.fromarray((_photo(w, h, seed)[..., 0] // 4).astype(np.uint8), mode="P")
    image.putpalette(np.random.default_rng(seed).integers(0, 256, 64 * 3, dtype=np.uint8).tobytes())
    return image


def _palette_with_transparency(w, h, seed) -> bytes:
    return _encode(_palette(w, h, seed), "PNG", transparency=5)


def _cmyk_jpeg(w, h, seed) -> bytes:
    return _encode(Image.fromarray(_photo(w, h, seed)).convert("CMYK"), "JPEG", quality=90)


MAKERS = {
    "RGB png": lambda w, h, s: _encode(Image.fromarray(_photo(w, h, s)), "PNG"),
    "RGB jpeg": lambda w, h, s: _encode(Image.fromarray(_photo(w, h, s)), "JPEG", quality=88),
    "RGBA png": lambda w, h, s: _encode(Image.fromarray(np.dstack([_photo(w, h, s), _photo(w, h, s + 1)[..., 0]])), "PNG"),
    "LA png": lambda w, h, s: _encode(Image.fromarray(_photo(w, h, s)[..., :2], mode="LA"), "PNG"),
    "P png with transparency": _palette_with_transparency,
    "P gif": lambda w, h, s: _encode(_palette(w, h, s), "GIF"),
    "L png": lambda w, h, s: _encode(Image.fromarray(_photo(w, h, s)[..., 0]), "PNG"),
    "1 png": lambda w, h, s: _encode(Image.fromarray(_photo(w, h, s)[..., 0]).convert("1"), "PNG"),
    "CMYK jpeg": _cmyk_jpeg,
    "EXIF-rotated jpeg": _exif_rotated_jpeg,
    "RGBA webp": lambda w, h, s: _encode(Image.fromarray(np.dstack([_photo(w, h, s), _photo(w, h, s + 2)[..., 1]])),
                                         "WEBP", lossless=True, method=0),
}


def _sweep_cases(n: int, seed: int):
    """(mode, width, height) over tiny, ordinary and extreme-aspect sizes, every mode many times."""
    rng = random.Random(seed)
    sizes = [(1, 1), (2, 3), (3, 2), (7, 5), (1, 90), (200, 1), (600, 9), (9, 400), (57, 56), (56, 57)]
    sizes += [(rng.randint(1, 400), rng.randint(1, 400)) for _ in range(n - len(sizes))]
    modes = sorted(MAKERS)
    return [(modes[i % len(modes)], w, h) for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("tiling", [TilingSpec(tile_size=28, max_tiles=6), TilingSpec(tile_size=56, max_tiles=12),
                                    TilingSpec(tile_size=28, min_tiles=2, max_tiles=6)], ids=str)
def test_pixels_equal_the_model_card_and_transformers_in_every_mode(tiling):
    """Hundreds of generated images per tiling, all modes, small tiles to keep it fast: equal, not close."""
    for i, (mode, w, h) in enumerate(_sweep_cases(120, seed=tiling.tile_size + tiling.min_tiles)):
        data = MAKERS[mode](w, h, i)
        mine = ours(data, tiling)
        reference = mc_load_image(data, tiling.tile_size, tiling.min_tiles, tiling.max_tiles)
        assert mine.dtype == np.float32 and mine.shape == reference.shape, (mode, w, h)
        assert np.array_equal(mine, reference), (mode, w, h, float(np.abs(mine - reference).max()))
        if tiling.min_tiles == 1:  # GOTOCR2_TIE_ORDER aside, transformers agrees too
            assert np.array_equal(mine, gotocr2(data, tiling)), (mode, w, h)


@pytest.mark.parametrize("mode,size,max_tiles", [
    ("RGB jpeg", (4000, 3000), 6),    # a huge photo: the thumbnail comes from the original, full decode
    ("RGB jpeg", (2400, 1800), 12),
    ("EXIF-rotated jpeg", (1200, 900), 12),
    ("CMYK jpeg", (1600, 1000), 6),
    ("RGBA png", (900, 700), 12),
    ("P png with transparency", (640, 480), 6),
    ("LA png", (300, 1200), 6),
    ("RGB png", (8000, 40), 12),      # extreme aspect ratio
    ("RGB png", (3, 2), 12),          # tiny
])
def test_real_tile_size_images_equal_the_model_card_and_lmdeploy(mode, size, max_tiles):
    tiling = TilingSpec(tile_size=448, max_tiles=max_tiles)
    data = MAKERS[mode](*size, 7)
    mine = ours(data, tiling)
    assert np.array_equal(mine, mc_load_image(data, 448, 1, max_tiles))
    # lmdeploy: the same functions, fed by its own loader.
    image = lmdeploy_load_bytes(data)
    lmdeploy = torch.stack([mc_transform(t, 448) for t in mc_dynamic_preprocess(
        image, min_num=1, max_num=max_tiles, image_size=448, use_thumbnail=True)]).numpy()
    assert np.array_equal(mine, lmdeploy)


def test_high_depth_grey_is_scaled_not_clipped():
    """HIGH_DEPTH_GREY: the references' convert("RGB") clips 16-bit grey to white; raylens scales it by 1/257.
    Apart from that conversion, the pipeline is the reference's."""
    tiling = TilingSpec(tile_size=56, max_tiles=6)
    grey16 = (_photo(120, 70, 3)[..., 0].astype(np.uint16) * 257)
    data = _encode(Image.fromarray(grey16), "PNG")
    mine = ours(data, tiling)
    reference = mc_load_image(data, 56, 1, 6)
    clipped = _encode(Image.fromarray(np.clip(grey16, 0, 255).astype(np.uint8)), "PNG")
    assert np.array_equal(reference, mc_load_image(clipped, 56, 1, 6))  # what the references see: nearly all white
    scaled = _encode(Image.fromarray((grey16 // 257).astype(np.uint8)), "PNG")
    assert np.array_equal(mine, mc_load_image(scaled, 56, 1, 6))  # what raylens sees: the picture
    assert not np.array_equal(mine, reference)


def test_truncated_files_are_errors_not_grey_images():
    """TRUNCATED_FILES: lmdeploy loads with LOAD_TRUNCATED_IMAGES (the missing part comes out grey)."""
    data = _encode(Image.fromarray(_photo(640, 480, 1)), "JPEG", quality=90)
    cut = data[: len(data) // 2]
    assert lmdeploy_load_bytes(cut).size == (640, 480)
    with pytest.raises(ImageError) as err:
        decode_prepared(cut, TilingSpec(tile_size=448, max_tiles=6))
    assert err.value.kind == "truncated"


def test_fast_jpeg_decoding_is_the_only_path_that_leaves_the_reference():
    """--fast-jpeg-decode is opt-in: the default equals the reference on a large textured JPEG, the option
    does not (its speed-up and difference are measured by bench.cpu, docs/benchmarks.md)."""
    tiling = TilingSpec(tile_size=448, max_tiles=1)
    data = MAKERS["RGB jpeg"](3000, 2000, 11)
    reference = mc_load_image(data, 448, 1, 1)
    assert np.array_equal(ours(data, tiling), reference)
    fast = pixel_values_for(decode_prepared(data, tiling, fast_jpeg=True))
    assert fast.shape == reference.shape and not np.array_equal(fast, reference)


# ---------------------------------------------------------------------------------------------- prompts
class MPTConversation:
    """conversation.py's Conversation, SeparatorStyle.MPT branch of get_prompt (the only style used here)."""

    def __init__(self, system_template, system_message, roles, sep):
        self.system_template, self.system_message, self.roles, self.sep = system_template, system_message, roles, sep
        self.messages = []

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        system_prompt = self.system_template.format(system_message=self.system_message)
        ret = system_prompt + self.sep
        for role, message in self.messages:
            if message:
                if type(message) is tuple:
                    message, _, _ = message
                ret += role + message + self.sep
            else:
                ret += role
        return ret


# The hub copies' templates (conversation.py shipped in OpenGVLab/InternVL2-* and InternVL2_5-*/InternVL3-*).
HUB_TEMPLATES = {
    "Hermes-2": ("<|im_start|>system\n{system_message}", INTERNVL_SYSTEM_MESSAGE,
                 ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "internlm2-chat": ("<|im_start|>system\n{system_message}", INTERNVL_SYSTEM_MESSAGE,
                       ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    "phi3-chat": ("<|system|>\n{system_message}", INTERNVL_SYSTEM_MESSAGE, ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
    "internvl2_5": ("<|im_start|>system\n{system_message}", INTERNVL2_5_SYSTEM_MESSAGE,
                    ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>\n"),
}


def chat_prompt(template_name, question, num_patches_list, history=None, system_message=None, num_image_token=256):
    """modeling_internvl_chat.py chat(): the query string it tokenises (pixel_values given when there are patches)."""
    if history is None and num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    system_template, default_system, roles, sep = HUB_TEMPLATES[template_name]
    template = MPTConversation(system_template, default_system, roles, sep)
    template.system_message = default_system if system_message is None else system_message
    history = [] if history is None else history
    for (old_question, old_answer) in history:
        template.append_message(template.roles[0], old_question)
        template.append_message(template.roles[1], old_answer)
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    query = template.get_prompt()
    for num_patches in num_patches_list:
        image_tokens = IMG_START + IMG_CONTEXT * num_image_token * num_patches + IMG_END
        query = query.replace("<image>", image_tokens, 1)
    return query


def _random_chat(rng: random.Random):
    """A conversation as chat() sees it: images in the first turn (placeholders in its text when several, as
    the model card does), earlier turns as `history` whose first question kept the `<image>\\n` chat() put
    there on the first call."""
    words = ["Describe", "this", "图片", "what", "colour?", "\n", "a", "cat.", " "]
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))  # noqa: E731
    n_images = rng.choice([0, 1, 1, 2, 3])
    patches = [rng.randint(1, 13) for _ in range(n_images)]
    first = say()
    if n_images > 1 or (n_images == 1 and rng.random() < 0.3):
        first = "".join(f"Image-{k + 1}: <image>\n" for k in range(n_images)) + first
    if rng.random() < 0.5:
        return None, first, patches
    if n_images and "<image>" not in first:
        first = "<image>\n" + first
    history = [(first, say())] + [(say(), say()) for _ in range(rng.randint(0, 2))]
    return history, say(), patches


@pytest.mark.parametrize("name", sorted(HUB_TEMPLATES))
def test_prompts_equal_internvl_chat_for_every_template(name):
    rng = random.Random(name)
    template = TEMPLATES[name]
    for _ in range(400):
        history, question, patches = _random_chat(rng)
        system = rng.choice([None, "You caption images."])
        reference = chat_prompt(name, question, patches, history=history, system_message=system, num_image_token=16)
        if history is None:
            placed = question.count("<image>")
            turns = [Turn(question, placed or len(patches))]
        else:
            turns = [Turn(q, q.count("<image>"), a) for q, a in history] + [Turn(question, 0)]
        mine = render(template, Conversation(tuple(turns)), system_message=system)
        assert expand_image_placeholders(mine, [16 * p for p in patches]) == reference


def test_several_images_without_placeholders_get_one_each():
    """PLACEHOLDERS_PER_IMAGE: chat() would prepend a single <image> for two images."""
    reference = chat_prompt("Hermes-2", "Compare.", [1, 1], num_image_token=1)
    assert reference.count(IMG_START) == 1
    mine = render(TEMPLATES["Hermes-2"], Conversation.single("Compare.", 2))
    assert mine.count("<image>") == 2 and "user\n<image>\n<image>\nCompare." in mine
