"""Image bytes -> validated RGB -> InternVL dynamic tiles, with Pillow and numpy only.

Why this module exists: every row of a batch job is decoded once, on a cheap CPU task, and any
problem with it (empty, not an image, truncated, a decompression bomb) must become a row-level
:class:`ImageError` instead of killing a worker. The tile grid is chosen there from the original size
with the published InternVL ``dynamic_preprocess`` rule, and the image is shrunk to the grid's canvas,
so what travels to an engine is a small uint8 :class:`PreparedImage` (with the thumbnail made from the
original beside it, and the tiling it was prepared with). The engine side turns it into normalised
``pixel_values`` with :func:`pixel_values_for`, which reproduces InternVL's resize -> row-major crop ->
thumbnail -> ImageNet normalisation without torch or torchvision.

By default the result equals the references (the InternVL2 model card's ``load_image``, lmdeploy's
InternVL preprocessing) value for value: ``convert("RGB")`` (alpha dropped, not composited), full JPEG
decoding, the thumbnail from the original image, InternVL's order of candidate grids. Two options trade
that for something else: ``fast_jpeg`` (decode big JPEGs at a reduced DCT scale: much faster, a few grey
levels off) and ``background`` (composite transparent images onto a colour). One intended difference
stays: 16-bit and float grey is scaled to 8 bits, where Pillow's ``convert`` clips it to white
(tests/raylens/test_reference_fidelity.py lists it by name).

What it does not know: which model it serves (tile size and tile limits come in a :class:`TilingSpec`
built from the checkpoint), how many tokens a tile costs, or any prompt format. It does not apply EXIF
orientation or ICC colour profiles (the reference ``load_image`` does neither), does no training
augmentation, reads bytes only (no paths, no storage), and opens only the formats of
``IMAGE_EXTENSIONS`` (``DECODE_FORMATS``), whatever a row's file name says. It never changes
Pillow's process-wide settings (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``);
PIL's own bomb limit still applies, so a ``max_pixels`` above it is capped by it.
"""

from __future__ import annotations

import dataclasses
import io
import re
from contextlib import contextmanager
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from raylens.errors import KindError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
DEFAULT_MAX_PIXELS = 64_000_000
# Pillow plugins tried on row bytes: the formats of IMAGE_EXTENSIONS only. Rows are untrusted, and
# other plugins (EPS runs Ghostscript, WMF, HDF5, ...) are attack surface nobody asked for.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# The dtypes tiles can be normalised into, and the numpy dtype that holds each (bfloat16: its bit patterns).
TILE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                                    "bfloat16": np.dtype(np.uint16)}
ERROR_KINDS = frozenset({"empty", "too_large", "not_an_image", "truncated", "decode"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_BICUBIC = Image.Resampling.BICUBIC
RGB = tuple[int, int, int]


class ImageError(KindError):
    """A row-level image problem; ``kind`` is one of "empty", "too_large", "not_an_image",
    "truncated", "decode". It pickles with its kind, so it survives crossing Ray processes."""

    KINDS = ERROR_KINDS


@dataclass(frozen=True)
class TilingSpec:
    """The tiling numbers of one checkpoint (``force_image_size``, ``min/max_dynamic_patch``,
    ``use_thumbnail``); validated here so a bad config fails at load time, not per row."""

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True

    def __post_init__(self) -> None:
        for name in ("tile_size", "min_tiles", "max_tiles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TilingSpec.{name} must be an int, got {value!r}")
        if self.tile_size <= 0:
            raise ValueError(f"TilingSpec.tile_size must be > 0, got {self.tile_size}")
        if self.min_tiles < 1:
            raise ValueError(f"TilingSpec.min_tiles must be >= 1, got {self.min_tiles}")
        if self.max_tiles < self.min_tiles:
            raise ValueError(
                f"TilingSpec.max_tiles must be >= min_tiles ({self.min_tiles}), got {self.max_tiles}"
            )
        if not isinstance(self.use_thumbnail, bool):
            raise ValueError(f"TilingSpec.use_thumbnail must be a bool, got {self.use_thumbnail!r}")


# eq=False: a generated __eq__/__hash__ over an ndarray field would raise, identity is what we want.
@dataclass(frozen=True, eq=False)
class PreparedImage:
    """What travels from the decode task to an engine: uint8 RGB (at most the grid canvas in area),
    the grid chosen from the original size, the tile count the prompt must expand to, the tiling it was
    prepared with, and, when the pixels were shrunk and the model uses a thumbnail, the thumbnail made
    from the original (uint8 [tile, tile, 3]; the references resize the original, not the canvas)."""

    pixels: np.ndarray
    grid: tuple[int, int]
    num_tiles: int
    original_size: tuple[int, int]
    tiling: TilingSpec | None = None
    thumbnail: np.ndarray | None = None
    # The tiles already cut and normalised ([num_tiles, 3, tile, tile] in `pixel_dtype`; bfloat16 as the
    # uint16 bit patterns, numpy having no bfloat16): made by the CPU stage (`with_pixel_values`) so that an
    # engine only forwards them. Always equal to what `pixel_values_for` computes from `pixels`.
    pixel_values: np.ndarray | None = None
    pixel_dtype: str | None = None

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(
                "PreparedImage.pixels must be a uint8 [H, W, 3] array, got "
                f"{getattr(p, 'dtype', type(p).__name__)} {getattr(p, 'shape', '')}"
            )
        if p.shape[0] < 1 or p.shape[1] < 1:
            raise ValueError(f"PreparedImage.pixels is empty: shape {p.shape}")
        cols, rows = _check_grid(self.grid)
        if self.num_tiles not in (cols * rows, cols * rows + (cols * rows > 1)):
            raise ValueError(f"PreparedImage.num_tiles {self.num_tiles} does not fit grid {self.grid}")
        if self.tiling is not None and self.num_tiles != num_tiles_for(self.grid, self.tiling):
            raise ValueError(f"PreparedImage.num_tiles {self.num_tiles} does not fit grid {self.grid} under {self.tiling}")
        v = self.pixel_values
        if (v is None) != (self.pixel_dtype is None):
            raise ValueError("PreparedImage.pixel_values and pixel_dtype go together")
        if v is not None:
            if self.pixel_dtype not in TILE_DTYPES:
                raise ValueError(f"PreparedImage.pixel_dtype must be one of {tuple(TILE_DTYPES)}, got {self.pixel_dtype!r}")
            if not isinstance(v, np.ndarray) or v.dtype != TILE_DTYPES[self.pixel_dtype] or v.ndim != 4 \
                    or v.shape[0] != self.num_tiles or v.shape[1] != 3 or v.shape[2] != v.shape[3]:
                raise ValueError(f"PreparedImage.pixel_values must be a {TILE_DTYPES[self.pixel_dtype]} "
                                 f"[{self.num_tiles}, 3, tile, tile] array, got {getattr(v, 'dtype', type(v).__name__)} "
                                 f"{getattr(v, 'shape', '')}")
        t = self.thumbnail
        if t is not None:
            size = self.tiling.tile_size if self.tiling is not None else t.shape[0]
            if not isinstance(t, np.ndarray) or t.dtype != np.uint8 or t.shape != (size, size, 3):
                raise ValueError(f"PreparedImage.thumbnail must be a uint8 [{size}, {size}, 3] array, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {getattr(t, 'shape', '')}")


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    cols, rows = grid
    if cols < 1 or rows < 1:
        raise ValueError(f"grid must be (cols >= 1, rows >= 1), got {grid!r}")
    return int(cols), int(rows)


# ---------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, background: RGB | None = None) -> Image.Image:
    """Decode encoded bytes into a fully loaded RGB image, or raise :class:`ImageError`.

    The declared ``width * height`` is refused before any pixel is decoded. Animated files give their
    first frame. Transparency is dropped as ``convert("RGB")`` drops it (what the model was trained on),
    or composited onto ``background`` when one is given. 16-bit and float grey is scaled to 8 bits
    instead of being clipped.
    """
    with _opened(data, max_pixels) as image:
        return _load_rgb(image, background=background)


def decode_prepared(data: bytes, spec: "TilingSpec", *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    fast_jpeg: bool = False, background: RGB | None = None) -> "PreparedImage":
    """`prepare_image(decode_image(data), spec)`: equal to it, and to the references, by default.

    ``fast_jpeg``: a JPEG at least twice the grid canvas in both dimensions is decoded at a reduced scale
    that still covers the canvas (Pillow's draft mode: the decoder drops DCT coefficients instead of
    decoding every pixel and resizing them away). A 12-MP photo costs 200-250 ms to decode in full on one
    core, and at 1 tile all but 1/60th of those pixels are thrown away (docs/benchmarks.md). The grid is
    still chosen from the full size; the pixels (and the thumbnail, made from the reduced image) differ from
    the exact path by a few grey levels.
    """
    with _opened(data, max_pixels) as image:
        original = image.size
        if fast_jpeg and image.format == "JPEG":
            cols, rows = find_grid(*original, spec)
            canvas = (spec.tile_size * cols, spec.tile_size * rows)
            if original[0] >= 2 * canvas[0] and original[1] >= 2 * canvas[1]:
                image.draft(image.mode, canvas)
        rgb = _load_rgb(image, original, background=background)
    return prepare_image(rgb, spec, original_size=original)


@contextmanager
def _opened(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image with its header read and checked (format, declared size), no pixel decoded yet."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be > 0, got {max_pixels}")
    if len(data) == 0:
        raise ImageError("empty", "image data is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(
                "not_an_image",
                f"{len(data)} bytes are not an image in a supported format "
                f"({', '.join(DECODE_FORMATS)})",
            ) from None
        except MemoryError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow's own cap (Image.MAX_IMAGE_PIXELS, left as it is) fired before ours could: the
            # message names the lower of the two, the one that applies, not Pillow's doubled error threshold
            declared = re.search(r"\((\d+) pixels\)", str(e))
            limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, int(Image.MAX_IMAGE_PIXELS))
            raise ImageError("too_large", f"the image declares {declared.group(1) if declared else 'more'} pixels, "
                             f"more than the limit of {limit}") from None
        except Exception as e:  # PIL plugins raise many types; all are row-level problems
            raise _classify(e, "reading the image header") from e
        with image:
            width, height = image.size
            fmt = image.format or "image"
            if width * height > max_pixels:
                raise ImageError(
                    "too_large",
                    f"{fmt} declares {width}x{height} = {width * height} pixels, "
                    f"more than the limit of {max_pixels}",
                )
            if width < 1 or height < 1:
                raise ImageError("decode", f"{fmt} declares an empty size {width}x{height}")
            yield image


def _load_rgb(image: Image.Image, declared_size: tuple[int, int] | None = None, *,
              background: RGB | None = None) -> Image.Image:
    """Decode the pixels of an opened image (the first frame of an animation) and convert them to RGB.
    Errors name ``declared_size`` (the file's own size), not the reduced size a draft decode asked for."""
    width, height = declared_size or image.size
    fmt = image.format or "image"
    try:
        image.load()
        return _to_rgb(image, background)
    except MemoryError:
        raise
    except Exception as e:
        raise _classify(e, f"decoding a {width}x{height} {fmt}") from e


def _classify(e: Exception, doing: str) -> ImageError:
    """Map an exception raised by Pillow to an ImageError kind (Pillow has no error taxonomy)."""
    detail = f"{type(e).__name__}: {e}"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError("too_large", f"too large ({doing}): {detail}")
    if isinstance(e, EOFError) or "truncat" in str(e).lower():
        return ImageError("truncated", f"image data is truncated ({doing}): {detail}")
    return ImageError("decode", f"could not decode image ({doing}): {detail}")


def _to_rgb(image: Image.Image, background: RGB | None = None) -> Image.Image:
    """Any decoded mode as RGB: Pillow's ``convert("RGB")`` (what the references do: alpha is dropped, a
    palette's transparent index shows its colour), or, with ``background``, transparency composited onto
    that colour. High-depth grey is scaled, not clipped (`_high_depth_to_l`)."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    if background is not None and (mode in _ALPHA_MODES or "transparency" in image.info):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # Pillow's note on palette transparency
                rgba = image.convert("RGBA")
        except ValueError:  # a mode whose transparency Pillow cannot express: ignore it
            return image.convert("RGB")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")  # RGB (copy), RGBA, LA, L, 1, P, CMYK (incl. Adobe-inverted), YCbCr, ...


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale I;16* / I / F grey to 8 bits (Pillow's own convert clips everything above 255 to white).

    I;16* and I with values in [0, 65535] are 16-bit samples (/257); F in [0, 1] is unit range (x255);
    anything else is stretched from its min..max, the only reading that does not lose the picture.
    """
    a = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


# ------------------------------------------------------------------------------------------ tiling
@lru_cache(maxsize=None)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min <= cols*rows <= max, in the published order.

    InternVL's ``dynamic_preprocess`` collects the grids of ``for n in min..max, for i in 1..n, for j in
    1..n`` into a Python *set* and sorts it by tile count, so grids of the same count keep the set's
    iteration order, which decides exact ties when min_tiles > 1 (with min_tiles = 1 no tie depends on
    it). That order is deterministic (small-int tuples hash alike in every process), so the set is built
    the same way here, once per (min, max).
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def find_grid(width: int, height: int, spec: TilingSpec) -> tuple[int, int]:
    """The (cols, rows) InternVL's ``find_closest_aspect_ratio`` picks for a width x height image.

    Closest aspect ratio wins; on an exact tie a later (larger) grid replaces the current one only when
    the image has more than half the pixels of that grid's canvas.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    half_tile_area = 0.5 * spec.tile_size * spec.tile_size
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(spec.min_tiles, spec.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > half_tile_area * cols * rows:
            best = (cols, rows)
    return best


def num_tiles_for(grid: tuple[int, int], spec: TilingSpec) -> int:
    """Tiles the model sees for a grid: cols*rows, plus the thumbnail when there is more than one."""
    cols, rows = _check_grid(grid)
    n = cols * rows
    return n + 1 if spec.use_thumbnail and n > 1 else n


def prepare_image(image: Image.Image, spec: TilingSpec, *, original_size: tuple[int, int] | None = None) -> PreparedImage:
    """Choose the grid from the original size and shrink the image to the grid canvas if it is larger
    in area. Small images are kept as they are; the upscale to the canvas happens in make_tiles, so
    the object store never carries more pixels than the model will see. A shrunk image that needs a
    thumbnail gets it here, from the image before shrinking (the references' thumbnail).

    ``original_size`` is the size the grid is chosen from when ``image`` was already decoded smaller
    (`decode_prepared` with ``fast_jpeg``); it defaults to the image's own size."""
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    width, height = rgb.size
    original = original_size or (width, height)
    grid = find_grid(*original, spec)
    num_tiles = num_tiles_for(grid, spec)
    canvas = (spec.tile_size * grid[0], spec.tile_size * grid[1])
    thumbnail = None
    if width * height > canvas[0] * canvas[1]:
        if num_tiles > grid[0] * grid[1]:
            thumbnail = np.asarray(rgb.resize((spec.tile_size, spec.tile_size), _BICUBIC), dtype=np.uint8)
        rgb = rgb.resize(canvas, _BICUBIC)
    pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    return PreparedImage(pixels, grid, num_tiles, original, spec, thumbnail)


def tiling_for(prepared: PreparedImage, spec: TilingSpec | None) -> TilingSpec:
    """The tiling to cut `prepared` with: its own, or `spec`, which must agree with it on what cutting uses
    (the tile count `make_tiles` gives under it is then `prepared.num_tiles`)."""
    own = prepared.tiling
    if spec is None:
        if own is None:
            raise ValueError("this PreparedImage does not say its tiling: pass the TilingSpec it was prepared with")
        return own
    if own is not None and (own.tile_size, own.use_thumbnail) != (spec.tile_size, spec.use_thumbnail):
        raise ValueError(f"PreparedImage was prepared with {own}, not with {spec}: it was prepared with another "
                         "TilingSpec (another checkpoint)")
    if prepared.num_tiles != num_tiles_for(prepared.grid, spec):
        raise ValueError(
            f"PreparedImage has {prepared.num_tiles} tiles for grid {prepared.grid}, but {spec} "
            f"gives {num_tiles_for(prepared.grid, spec)}: it was prepared with another TilingSpec"
        )
    return spec


def make_tiles(prepared: PreparedImage, spec: TilingSpec | None = None) -> list[Image.Image]:
    """Resize to the canvas, crop row-major into tile x tile pieces, then append the thumbnail (the
    whole original image at tile x tile) when use_thumbnail and there is more than one tile.
    ``spec`` defaults to the image's own tiling."""
    spec = tiling_for(prepared, spec)
    cols, rows = _check_grid(prepared.grid)
    t = spec.tile_size
    image = Image.fromarray(prepared.pixels, mode="RGB")
    canvas = image if image.size == (cols * t, rows * t) else image.resize((cols * t, rows * t), _BICUBIC)
    tiles = [
        canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)
    ]
    if spec.use_thumbnail and len(tiles) > 1:
        if prepared.thumbnail is not None:
            tiles.append(Image.fromarray(prepared.thumbnail, mode="RGB"))
        else:  # the pixels are the original image
            tiles.append(image.resize((t, t), _BICUBIC))
    return tiles


def normalize_tiles(tiles: Sequence[Image.Image], *, tile_size: int | None = None, dtype: str = "float32") -> np.ndarray:
    """float32 [N, 3, tile, tile]: ToTensor (/255) then ImageNet Normalize, like InternVL's transform.

    ``tile_size`` defaults to the first tile's (square) size; tiles of another size are resized to it
    with BICUBIC, as the reference transform's Resize does. ``dtype`` "float16" or "bfloat16" gives those
    float32 values rounded to that type (as torch's ``.to(dtype)`` rounds them; bfloat16 as uint16 bits).
    """
    if tile_size is None:
        if not tiles:
            raise ValueError("normalize_tiles needs tile_size when there are no tiles")
        w, h = tiles[0].size
        if w != h:
            raise ValueError(f"first tile is {w}x{h}, not square: pass tile_size")
        tile_size = w
    # Channel-first uint8 first, then one table lookup per channel: the same float32 arithmetic as
    # (x / 255 - mean) / std, done on the 256 levels instead of every pixel (2.5x faster at 13 tiles).
    out = np.empty((len(tiles), 3, tile_size, tile_size), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        tile = tile if tile.mode == "RGB" else _to_rgb(tile)
        if tile.size != (tile_size, tile_size):
            tile = tile.resize((tile_size, tile_size), _BICUBIC)
        out[k] = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1)
    tables = _normalisation_tables(dtype)
    values = np.empty(out.shape, dtype=tables.dtype)
    for k in range(len(tiles)):  # contiguous [tile, tile] planes: np.take is fastest on those
        for channel in range(3):
            np.take(tables[channel], out[k, channel], out=values[k, channel])
    return values


@lru_cache(maxsize=None)
def _normalisation_tables(dtype: str = "float32") -> np.ndarray:
    """[3, 256]: the normalised value of every uint8 level, per channel, in `dtype` (see `normalize_tiles`)."""
    if dtype not in TILE_DTYPES:
        raise ValueError(f"tiles can be normalised into {tuple(TILE_DTYPES)}, not {dtype!r}")
    levels = np.arange(256, dtype=np.float32)[:, None]
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    table = np.ascontiguousarray(((levels / np.float32(255.0) - mean) / std).T)
    if dtype == "float16":
        table = table.astype(np.float16)  # IEEE round to nearest even, as torch rounds
    elif dtype == "bfloat16":  # the upper 16 bits, rounded to nearest even (the table holds no NaN or inf)
        bits = table.view(np.uint32)
        table = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    table.setflags(write=False)  # shared by every caller (cached)
    return table


def pixel_values_for(prepared: PreparedImage, spec: TilingSpec | None = None) -> np.ndarray:
    """The engine-side step: PreparedImage -> float32 [num_tiles, 3, tile, tile] (``spec`` defaults to
    the image's own tiling). Tiles the CPU stage already made in float32 are returned as they are."""
    spec = tiling_for(prepared, spec)
    if prepared.pixel_dtype == "float32":
        return prepared.pixel_values
    return normalize_tiles(make_tiles(prepared, spec), tile_size=spec.tile_size)


def with_pixel_values(prepared: PreparedImage, dtype: str, spec: TilingSpec | None = None) -> PreparedImage:
    """`prepared` carrying its normalised tiles in `dtype` (a `TILE_DTYPES` name): the CPU stage's share of an
    engine's work when the job runs with --tiles-on-cpu."""
    spec = tiling_for(prepared, spec)
    values = normalize_tiles(make_tiles(prepared, spec), tile_size=spec.tile_size, dtype=dtype)
    return dataclasses.replace(prepared, pixel_values=values, pixel_dtype=dtype)
