"""The prepare stage's columns carry everything the engine needs to cut an image as the references do: the
thumbnail made from the original, and the tiling it was prepared with (--max-tiles travels only here)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.caption_config import CaptionJobConfig
from jobs.caption_stages import LISTING_SCHEMA, _prepared_from_row, _rows_of, prepare_batch
from raylens.fetch import UrlFetcher
from raylens.images import TilingSpec, decode_image, pixel_values_for, prepare_image, with_pixel_values
from raylens.sources import SourceFilesystems
from raylens.storage import S3Settings


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _prepare(tmp_path, images: dict[str, bytes], tiling: TilingSpec, **options) -> list[dict]:
    rows = []
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        rows.append({"id": name, "image": str(tmp_path / name), "__source": str(tmp_path / name), "__shard": 0,
                     "__question": None, "__listing_error": None})
    batch = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
    out = prepare_batch(batch, filesystems=SourceFilesystems.create(S3Settings()),
                        fetcher=UrlFetcher(), tiling=tiling, max_pixels=10_000_000, **options)
    return out.to_pylist()


def test_an_image_crosses_the_stages_with_its_tiling_and_thumbnail(tmp_path):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))
    tiling = TilingSpec(tile_size=112, min_tiles=1, max_tiles=3, use_thumbnail=True)
    [row, bad] = _prepare(tmp_path, {"big.png": _png(big), "bad.png": b"junk"}, tiling)
    assert bad["error"].startswith("ImageError(not_an_image)") and bad["__thumbnail"] == b""
    image = _prepared_from_row(row)
    assert image.tiling == tiling and image.grid == (3, 1) and image.thumbnail is not None
    # What the engine computes from the row equals the reference path on the decoded original.
    expected = pixel_values_for(prepare_image(decode_image(_png(big)), tiling))
    np.testing.assert_array_equal(pixel_values_for(image), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiles_made_in_the_cpu_stage_cross_to_the_engine_stage_in_place(tmp_path, dtype):
    """--tiles-on-cpu: the row carries the normalised tiles; the engine stage reads them from the Arrow buffer
    (no Python copy) and gets exactly what it would have made from the pixels."""
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))
    tiling = TilingSpec(tile_size=112, min_tiles=1, max_tiles=3, use_thumbnail=True)
    rows = []
    for name, data in {"big.png": _png(big), "bad.png": b"junk"}.items():
        (tmp_path / name).write_bytes(data)
        rows.append({"id": name, "image": str(tmp_path / name), "__source": str(tmp_path / name), "__shard": 0,
                     "__question": None, "__listing_error": None})
    table = prepare_batch(pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), filesystems=SourceFilesystems.create(S3Settings()),
                          fetcher=UrlFetcher(), tiling=tiling, max_pixels=10_000_000, tiles_dtype=dtype)
    row, bad = _rows_of(table)
    assert isinstance(row["__pixel_values"], pa.Buffer) and bad["__pixel_dtype"] is None and bad["error"]
    image = _prepared_from_row(row)
    assert image.pixel_dtype == dtype and image.pixel_values.shape == (4, 3, 112, 112)
    reference = prepare_image(decode_image(_png(big)), tiling)
    np.testing.assert_array_equal(image.pixel_values, with_pixel_values(reference, dtype).pixel_values)
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    # read in place: the array views the Arrow column's memory
    column = table.column("__pixel_values").chunk(0)
    start = column.buffers()[2].address
    assert start <= image.pixel_values.__array_interface__["data"][0] < start + column.buffers()[2].size


def test_alpha_background_reaches_the_decoder(tmp_path):
    data = _png(Image.new("RGBA", (20, 20), (255, 0, 0, 0)))
    tiling = TilingSpec(tile_size=112, max_tiles=1)
    [dropped] = _prepare(tmp_path, {"a.png": data}, tiling)
    [white] = _prepare(tmp_path, {"a.png": data}, tiling, background=(255, 255, 255))
    assert _prepared_from_row(dropped).pixels[0, 0].tolist() == [255, 0, 0]  # convert("RGB"): alpha dropped
    assert _prepared_from_row(white).pixels[0, 0].tolist() == [255, 255, 255]


def test_decoding_flags_parse():
    cfg = CaptionJobConfig.from_args(["--input", "i", "--output", "o", "--fast-jpeg-decode", "--alpha-background", "#102030"])
    assert cfg.fast_jpeg_decode and cfg.alpha_background_rgb() == (16, 32, 48) and cfg.tiles_on_cpu  # the default
    assert not CaptionJobConfig.from_args(["--input", "i", "--output", "o", "--no-tiles-on-cpu"]).tiles_on_cpu
    assert CaptionJobConfig(input="i", output="o", alpha_background="white").alpha_background_rgb() == (255, 255, 255)
    assert CaptionJobConfig(input="i", output="o").alpha_background_rgb() is None
    with pytest.raises(ValueError, match="alpha-background"):
        CaptionJobConfig(input="i", output="o", alpha_background="not-a-colour")


def test_binary_views_follow_offsets_slices_and_nulls():
    from jobs.caption_stages import _binary_views

    column = pa.chunked_array([pa.array([b"ab", None, b"cde", b""], type=pa.binary()).slice(1),
                               pa.array([b"xyz"], type=pa.binary())])
    assert [bytes(v) for v in _binary_views(column)] == [b"", b"cde", b"", b"xyz"]
    large = pa.chunked_array([pa.array([b"\x00\x01", b"q"], type=pa.large_binary())])
    assert [bytes(v) for v in _binary_views(large)] == [b"\x00\x01", b"q"]
    view = pa.chunked_array([pa.array([b"v", None], type=pa.binary_view())])  # another layout: copied, still right
    assert [bytes(v) for v in _binary_views(view)] == [b"v", b""]
