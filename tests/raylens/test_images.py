"""Tests for raylens.images: the published tiling rule, tiles/normalisation, odd-but-valid formats
decoding to sensible RGB, and every broken input becoming an ImageError of the right kind."""

from __future__ import annotations

import functools
import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from raylens.images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TILE_DTYPES,
    ImageError,
    PreparedImage,
    TilingSpec,
    decode_image,
    decode_prepared,
    find_grid,
    make_tiles,
    normalize_tiles,
    num_tiles_for,
    pixel_values_for,
    prepare_image,
    with_pixel_values,
)


# ------------------------------------------------------------------------------ reference tiling
def reference_candidates(min_num: int, max_num: int, use_set: bool) -> list[tuple[int, int]]:
    """Literal transcription of the published candidate list. The original collects into a Python
    ``set``; ``use_set=False`` keeps first-enumeration order instead. The two orders only matter for
    exact same-product ties, which cannot be the winner when min_num == 1."""
    found = []
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if i * j <= max_num and i * j >= min_num:
                    found.append((i, j))
    unique = set(found) if use_set else dict.fromkeys(found)
    return sorted(unique, key=lambda x: x[0] * x[1])


def reference_pick(width, height, candidates, image_size):
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in candidates:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


SIDES = sorted(
    set(range(1, 64, 9)) | set(range(64, 5001, 97))
    | {1, 2, 3, 40, 112, 224, 336, 448, 480, 640, 672, 896, 1080, 1344, 1920, 2000, 3024, 4032, 5000}
)


@pytest.mark.parametrize("tile_size", [448, 112])
@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_find_grid_matches_published_rule(tile_size, max_tiles):
    spec = TilingSpec(tile_size=tile_size, max_tiles=max_tiles)
    cands = reference_candidates(1, max_tiles, use_set=True)
    for w in SIDES:
        for h in SIDES:
            assert find_grid(w, h, spec) == reference_pick(w, h, cands, tile_size), (w, h)


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 1), (1, 40), (2, 6), (4, 12), (10, 10), (3, 24)])
def test_find_grid_candidate_order_matches_the_published_set_order(min_tiles, max_tiles):
    """Ties with min_tiles > 1 are broken in the reference's order (issue 11, item 5)."""
    spec = TilingSpec(tile_size=448, min_tiles=min_tiles, max_tiles=max_tiles)
    cands = reference_candidates(min_tiles, max_tiles, use_set=True)
    for w in (1, 8, 50, 225, 448, 700, 1000, 1920, 4000, 8000):
        for h in (1, 8, 36, 40, 448, 600, 1080, 3000):
            assert find_grid(w, h, spec) == reference_pick(w, h, cands, 448), (w, h)


@pytest.mark.parametrize(
    "size,max_tiles,tiles",
    [
        ((448, 448), 12, 1), ((448, 448), 6, 1),
        ((640, 480), 12, 13), ((800, 600), 12, 13), ((500, 375), 12, 13), ((4032, 3024), 12, 13),
        ((3024, 4032), 12, 13), ((640, 480), 6, 7), ((4032, 3024), 6, 7),
        ((1920, 1080), 12, 9), ((1280, 720), 12, 9), ((1920, 1080), 6, 3), ((1280, 720), 6, 3),
    ],
)
def test_tile_counts_from_notes(size, max_tiles, tiles):
    spec = TilingSpec(max_tiles=max_tiles)
    assert num_tiles_for(find_grid(*size, spec), spec) == tiles


def test_tiling_spec_validation_names_field_and_value():
    with pytest.raises(ValueError, match=r"tile_size.*-4"):
        TilingSpec(tile_size=-4)
    with pytest.raises(ValueError, match=r"min_tiles.*0"):
        TilingSpec(min_tiles=0)
    with pytest.raises(ValueError, match=r"max_tiles.*3"):
        TilingSpec(min_tiles=4, max_tiles=3)
    assert num_tiles_for((1, 1), TilingSpec()) == 1
    assert num_tiles_for((3, 2), TilingSpec(use_thumbnail=False)) == 6


# ---------------------------------------------------------------------------- prepare / tiles
@pytest.mark.parametrize(
    "size,spec",
    [((100, 50), TilingSpec()), ((1, 1), TilingSpec()), ((8000, 40), TilingSpec()),
     ((4032, 3024), TilingSpec()), ((3000, 700), TilingSpec(tile_size=112, max_tiles=6)),
     ((2000, 2000), TilingSpec(max_tiles=1))],
)
def test_prepare_never_upscales_and_keeps_grid(size, spec):
    prepared = prepare_image(Image.new("RGB", size, (10, 20, 30)), spec)
    grid = find_grid(*size, spec)
    h, w, _ = prepared.pixels.shape
    assert prepared.grid == grid and prepared.original_size == size
    assert prepared.pixels.dtype == np.uint8
    assert w * h <= max(size[0] * size[1], 1)  # never more pixels than the original
    canvas = (spec.tile_size * grid[0], spec.tile_size * grid[1])
    if size[0] * size[1] > canvas[0] * canvas[1]:
        assert (w, h) == canvas
    else:
        assert (w, h) == size
    assert find_grid(w, h, spec) == grid  # an engine re-deriving the grid gets the same answer
    values = pixel_values_for(prepared, spec)
    assert values.shape == (prepared.num_tiles, 3, spec.tile_size, spec.tile_size)
    assert values.dtype == np.float32


def test_normalisation_white_and_black():
    spec = TilingSpec(tile_size=112)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for colour, expected in (((255, 255, 255), (1 - mean) / std), ((0, 0, 0), -mean / std)):
        values = pixel_values_for(prepare_image(Image.new("RGB", (112, 112), colour), spec), spec)
        assert values.shape == (1, 3, 112, 112)
        np.testing.assert_allclose(values[0].reshape(3, -1).mean(axis=1), expected, atol=1e-6)
        np.testing.assert_allclose(values[0].reshape(3, -1).std(axis=1), 0, atol=1e-6)


def test_normalize_tiles_equals_the_per_pixel_formula_exactly():
    """The table lookup must give the bits that ToTensor + Normalize give, pixel by pixel and channel by channel."""
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    out = normalize_tiles([Image.fromarray(a) for a in arrays])
    stacked = np.stack(arrays).astype(np.float32)
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    expected = ((stacked / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiles_normalised_into_a_half_type_are_the_float32_values_as_torch_rounds_them(dtype):
    """--tiles-on-cpu ships tiles in the model's dtype: they must be the bits an engine gets from
    `torch.from_numpy(float32 values).to(dtype)`, for every level of every channel and for a real image."""
    import torch

    rng = np.random.default_rng(5)
    arrays = [np.arange(256, dtype=np.uint8).repeat(3 * 16).reshape(64, 64, 3),
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    tiles = [Image.fromarray(a) for a in arrays]
    expected = torch.from_numpy(normalize_tiles(tiles)).to(getattr(torch, dtype))
    out = normalize_tiles(tiles, dtype=dtype)
    got = torch.from_numpy(out).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(out)
    assert out.dtype == TILE_DTYPES[dtype] and torch.equal(got, expected)

    spec = TilingSpec(tile_size=112, max_tiles=6)
    prepared = prepare_image(Image.fromarray(rng.integers(0, 256, (150, 300, 3), dtype=np.uint8)), spec)
    ready = with_pixel_values(prepared, dtype)
    assert ready.pixel_dtype == dtype and ready.pixel_values.shape == (prepared.num_tiles, 3, 112, 112)
    half = torch.from_numpy(ready.pixel_values)
    half = half.view(torch.bfloat16) if dtype == "bfloat16" else half
    assert torch.equal(half, torch.from_numpy(pixel_values_for(prepared)).to(getattr(torch, dtype)))
    # a half-precision copy never stands in for float32 values: those are made from the pixels again
    np.testing.assert_array_equal(pixel_values_for(ready), pixel_values_for(prepared))


def test_float32_tiles_made_ahead_are_what_the_engine_side_would_make():
    spec = TilingSpec(tile_size=112, max_tiles=6)
    prepared = prepare_image(Image.fromarray(np.random.default_rng(6).integers(0, 256, (90, 250, 3), dtype=np.uint8)), spec)
    ready = with_pixel_values(prepared, "float32")
    assert pixel_values_for(ready) is ready.pixel_values
    np.testing.assert_array_equal(ready.pixel_values, pixel_values_for(prepared))
    with pytest.raises(ValueError, match="normalised into"):
        with_pixel_values(prepared, "int8")


def test_normalize_tiles_resizes_odd_tiles():
    out = normalize_tiles([Image.new("RGB", (64, 64)), Image.new("L", (30, 10), 255)])
    assert out.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(out[1, :, 5, 5], (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD, atol=1e-5)


def _quadrants(size):
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = (255, 255, 255)
    return Image.fromarray(a)


def test_tiles_are_row_major_with_thumbnail_last():
    spec = TilingSpec(tile_size=112, max_tiles=4)
    prepared = prepare_image(_quadrants((400, 400)), spec)
    assert prepared.grid == (2, 2) and prepared.num_tiles == 5
    assert prepared.pixels.shape == (224, 224, 3)  # downscaled to the canvas
    tiles = make_tiles(prepared, spec)
    assert [t.size for t in tiles] == [(112, 112)] * 5
    centres = [t.getpixel((56, 56)) for t in tiles[:4]]
    assert centres == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    thumb = np.asarray(tiles[4])
    assert tuple(thumb[10, 10]) == (255, 0, 0) and tuple(thumb[100, 100]) == (255, 255, 255)
    no_thumb = TilingSpec(tile_size=112, max_tiles=4, use_thumbnail=False)
    assert len(make_tiles(prepare_image(_quadrants((400, 400)), no_thumb), no_thumb)) == 4
    with pytest.raises(ValueError, match="another TilingSpec"):
        make_tiles(prepared, no_thumb)


def test_the_thumbnail_is_made_from_the_original_and_travels_with_the_image():
    """The references resize the original to the thumbnail, not the shrunk canvas (issue 11, item 1)."""
    spec = TilingSpec(tile_size=112, max_tiles=4)
    original = _photo((900, 300), seed=3)
    prepared = prepare_image(original, spec)
    assert prepared.grid == (3, 1) and prepared.pixels.shape == (112, 336, 3) and prepared.tiling == spec
    expected = np.asarray(original.resize((112, 112), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(prepared.thumbnail, expected)
    np.testing.assert_array_equal(np.asarray(make_tiles(prepared)[-1]), expected)
    from_canvas = np.asarray(Image.fromarray(prepared.pixels).resize((112, 112), Image.Resampling.BICUBIC))
    assert not np.array_equal(from_canvas, expected)  # the old way was measurably different
    small = prepare_image(_photo((150, 50)), spec)  # kept at its own size: no thumbnail to carry
    assert small.thumbnail is None and small.pixels.shape == (50, 150, 3)
    np.testing.assert_array_equal(np.asarray(make_tiles(small)[-1]),
                                  np.asarray(_photo((150, 50)).resize((112, 112), Image.Resampling.BICUBIC)))
    with pytest.raises(ValueError, match="another TilingSpec"):
        pixel_values_for(prepared, TilingSpec(tile_size=224, max_tiles=4))


def test_prepared_image_validates():
    with pytest.raises(ValueError, match="uint8"):
        PreparedImage(np.zeros((4, 4, 3), np.float32), (1, 1), 1, (4, 4))
    with pytest.raises(ValueError, match="num_tiles"):
        PreparedImage(np.zeros((4, 4, 3), np.uint8), (2, 1), 5, (4, 4))
    pixels = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="go together"):
        PreparedImage(pixels, (1, 1), 1, (4, 4), pixel_values=np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="pixel_dtype must be one of"):
        PreparedImage(pixels, (1, 1), 1, (4, 4), pixel_values=np.zeros((1, 3, 4, 4), np.float32), pixel_dtype="f32")
    with pytest.raises(ValueError, match=r"uint16 \[1, 3, tile, tile\]"):  # bfloat16 travels as its bits
        PreparedImage(pixels, (1, 1), 1, (4, 4), pixel_values=np.zeros((1, 3, 4, 4), np.float32), pixel_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"\[1, 3, tile, tile\]"):
        PreparedImage(pixels, (1, 1), 1, (4, 4), pixel_values=np.zeros((2, 3, 4, 4), np.float32), pixel_dtype="float32")


# ------------------------------------------------------------------------------ valid decoding
def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _centre(image: Image.Image) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel((image.width // 2, image.height // 2))


def _close(actual, expected, tol=12):
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected)), (actual, expected)


def _frames(fmt):
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _palette_with_transparency():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    return _encode(image, "PNG", transparency=0)  # index 0 (red, right half) is transparent


VALID = {
    "rgb_jpeg": (lambda: _encode(Image.new("RGB", (40, 30), (0, 128, 255)), "JPEG"), (0, 128, 255)),
    "gif_first_frame": (lambda: _frames("GIF"), (255, 0, 0)),
    "cmyk_jpeg": (lambda: _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
    "gray_l": (lambda: _encode(Image.new("L", (9, 7), 77), "PNG"), (77, 77, 77)),
    "gray_la_half": (lambda: _encode(Image.new("LA", (9, 7), (0, 128)), "PNG"), (0, 0, 0)),  # alpha dropped
    "one_bit": (lambda: _encode(Image.new("1", (9, 7), 1), "PNG"), (255, 255, 255)),
    "gray16_png": (
        lambda: _encode(Image.fromarray(np.full((6, 5), 32896, np.uint16)), "PNG"), (128, 128, 128)),
    "gray16_png_dark": (
        lambda: _encode(Image.fromarray(np.full((6, 5), 2570, np.uint16)), "PNG"), (10, 10, 10)),
    "int32_tiff": (
        lambda: _encode(Image.fromarray(np.full((6, 5), 32896, np.int32)), "TIFF"), (128, 128, 128)),
    "float_tiff": (
        lambda: _encode(Image.fromarray(np.full((6, 5), 0.5, np.float32)), "TIFF"), (128, 128, 128)),
    "rgba_transparent_red": (
        lambda: _encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), (255, 0, 0)),  # as convert("RGB")
    "rgba_opaque_red": (
        lambda: _encode(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), "PNG"), (255, 0, 0)),
    "rgba_webp_transparent": (
        lambda: _encode(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "WEBP", lossless=True, exact=True),
        (0, 0, 255)),
    "one_by_one": (lambda: _encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), (1, 2, 3)),
    "panorama": (lambda: _encode(Image.new("RGB", (8000, 40), (200, 100, 0)), "PNG"), (200, 100, 0)),
    "bmp": (lambda: _encode(Image.new("RGB", (10, 10), (5, 6, 7)), "BMP"), (5, 6, 7)),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_unusual_images_decode_to_rgb(name):
    make, expected = VALID[name]
    image = decode_image(make())
    _close(_centre(image), expected)


def test_transparency_is_dropped_by_default_and_composited_on_request():
    """convert("RGB") semantics, as the model card, lmdeploy and transformers load images (issue 11, item 3);
    compositing onto a colour is an option."""
    image = decode_image(_palette_with_transparency())
    assert image.getpixel((2, 8)) == (0, 0, 255) and image.getpixel((12, 8)) == (255, 0, 0)
    on_white = decode_image(_palette_with_transparency(), background=(255, 255, 255))
    assert on_white.getpixel((2, 8)) == (0, 0, 255) and on_white.getpixel((12, 8)) == (255, 255, 255)
    half = _encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG")
    assert decode_image(half).getpixel((1, 1)) == (255, 0, 0)
    assert decode_image(half, background=(0, 0, 0)).getpixel((1, 1)) == (128, 0, 0)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_first_frame():
    image = decode_image(_frames("WEBP"))
    assert image.size == (32, 24)
    _close(_centre(image), (255, 0, 0), tol=20)


def test_panorama_tiles():
    spec = TilingSpec()
    prepared = prepare_image(decode_image(VALID["panorama"][0]()), spec)
    assert prepared.grid == (12, 1) and prepared.pixels.shape == (40, 8000, 3)
    assert pixel_values_for(prepared, spec).shape == (13, 3, 448, 448)


def test_accepts_bytearray_and_memoryview_and_leaves_pil_globals_alone():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    data = _encode(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG")
    for d in (bytearray(data), memoryview(data)):
        assert decode_image(d).size == (4, 4)
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2])
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


def test_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------- invalid inputs
def _png_declaring(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR is rewritten to declare width x height, with a valid CRC."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _noise(fmt):
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)), fmt)


@pytest.mark.parametrize(
    "make,kwargs,kind",
    [
        (lambda: b"", {}, "empty"),
        (lambda: b"hello", {}, "not_an_image"),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 40, {}, "not_an_image"),
        (lambda: _encode(Image.new("RGB", (4, 4)), "PPM"), {}, "not_an_image"),  # not a row format
        (lambda: _noise("PNG")[: len(_noise("PNG")) // 2], {}, "truncated"),
        (lambda: _noise("JPEG")[: len(_noise("JPEG")) // 2], {}, "truncated"),
        (lambda: _png_declaring(100_000, 100_000), {}, "too_large"),  # PIL's own bomb error
        (lambda: _png_declaring(9_000, 8_000), {}, "too_large"),  # 72M: our limit, below PIL's
        (lambda: _png_declaring(10_000, 10_000), {"max_pixels": 10**9}, "too_large"),  # PIL warning
        (lambda: _encode(Image.new("RGB", (100, 100)), "PNG"), {"max_pixels": 5_000}, "too_large"),
        (lambda: _noise("WEBP")[: len(_noise("WEBP")) // 2], {}, "decode"),
    ],
    ids=["empty", "text", "png_magic_only", "ppm_unsupported", "png_half", "jpeg_half", "bomb_1e10",
         "bomb_72m", "bomb_pil_warning", "max_pixels", "webp_half"],
)
def test_invalid_inputs_raise_image_error(make, kwargs, kind):
    with pytest.raises(ImageError) as info:
        decode_image(make(), **kwargs)
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError) and str(info.value)


def test_a_bomb_caught_by_pillow_names_the_limit_that_applies():
    with pytest.raises(ImageError, match=r"declares 10000000000 pixels, more than the limit of 40000000$"):
        decode_image(_png_declaring(100_000, 100_000), max_pixels=40_000_000)
    with pytest.raises(ImageError, match=rf"declares 100000000 pixels, more than the limit of {Image.MAX_IMAGE_PIXELS}$"):
        decode_image(_png_declaring(10_000, 10_000), max_pixels=10**9)  # Pillow's cap is the lower one


def test_image_error_pickles_with_kind():
    error = pickle.loads(pickle.dumps(ImageError("truncated", "cut short")))
    assert (error.kind, str(error)) == ("truncated", "cut short")
    with pytest.raises(ValueError):
        ImageError("weird", "x")
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ decode_prepared
def _photo(size, seed=0):
    """A smooth photo-like image (gradients plus mild texture): what draft-mode scaling is judged on."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=None)
def _photo_jpeg(size, quality=92) -> bytes:
    """A large photo-like JPEG, made once per size (making one costs seconds)."""
    return _encode(_photo(size), "JPEG", quality=quality)


def _draft_calls(monkeypatch) -> list:
    """Record the JPEG decoder's draft requests; the real draft still runs."""
    from PIL import JpegImagePlugin

    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):
        calls.append((self.size, size))
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
    return calls


@pytest.mark.parametrize("max_tiles", [1, 6])
def test_decode_prepared_scales_large_jpegs_in_the_decoder_and_keeps_the_grid(monkeypatch, max_tiles):
    spec = TilingSpec(tile_size=448, max_tiles=max_tiles)
    data = _photo_jpeg((3000, 2000))
    calls = _draft_calls(monkeypatch)
    exact = decode_prepared(data, spec)
    assert not calls  # the default decodes every pixel, as the references do
    fast = decode_prepared(data, spec, fast_jpeg=True)
    assert np.array_equal(exact.pixels, prepare_image(decode_image(data), spec).pixels)
    assert calls and calls[0][0] == (3000, 2000)  # the decoder was asked for a reduced scale
    assert (fast.grid, fast.num_tiles, fast.original_size) == (exact.grid, exact.num_tiles, (3000, 2000))
    assert fast.pixels.shape == exact.pixels.shape
    diff = np.abs(fast.pixels.astype(np.int16) - exact.pixels.astype(np.int16))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8, (diff.mean(), np.percentile(diff, 99))


@pytest.mark.parametrize("fmt,size", [("PNG", (2000, 1500)), ("JPEG", (800, 600)), ("WEBP", (1600, 1200))])
def test_decode_prepared_is_exact_where_it_does_not_draft(fmt, size):
    """Non-JPEGs, and JPEGs under twice the canvas, go the exact path even with fast_jpeg."""
    spec = TilingSpec(tile_size=448, max_tiles=1)
    data = _encode(_photo(size), fmt)
    fast, exact = decode_prepared(data, spec, fast_jpeg=True), prepare_image(decode_image(data), spec)
    assert (fast.grid, fast.num_tiles, fast.original_size) == (exact.grid, exact.num_tiles, exact.original_size)
    np.testing.assert_array_equal(fast.pixels, exact.pixels)


def test_decode_prepared_converts_a_large_cmyk_jpeg_and_refuses_bombs():
    spec = TilingSpec(tile_size=448, max_tiles=1)
    cmyk = _encode(Image.new("CMYK", (1200, 1000), (0, 255, 255, 0)), "JPEG")
    prepared = decode_prepared(cmyk, spec)
    assert prepared.pixels.shape == (448, 448, 3) and prepared.original_size == (1200, 1000)
    assert np.abs(prepared.pixels[200, 200].astype(int) - (255, 0, 0)).max() < 12  # red, as decode_image shows it
    with pytest.raises(ImageError) as err:
        decode_prepared(_png_declaring(9_000, 8_000), spec)
    assert err.value.kind == "too_large"


def test_decode_prepared_names_the_files_own_size_when_a_drafted_decode_fails():
    data = _photo_jpeg((3000, 2000))
    with pytest.raises(ImageError) as err:
        decode_prepared(data[: len(data) // 2], TilingSpec(tile_size=448, max_tiles=1), fast_jpeg=True)
    assert err.value.kind == "truncated" and "3000x2000 JPEG" in str(err.value)
