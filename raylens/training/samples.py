"""One training record -> model inputs (ids, labels, tiles), and a batch of them -> padded tensors.

Why these steps and no others: training must see exactly what inference sees, so images go through the
batch job's own path (`read_source` -> `decode_prepared` with the checkpoint's tiling, `--max-tiles`
honoured) and text through the model layer's encoding with labels (`encode_for_training`: the
checkpoint's template and system message, `<image>` expanded per image, one tokenisation, loss on the
answers and their end-of-turn token only): `encode_request(..., with_labels=True)`, the engines' own.

A record that fails here (image missing or undecodable, too long for `--max-length`, no answer token
left) raises `BadRecord`; the loader (`raylens.training.loader`) replaces it with another record, counts
it, and training goes on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from raylens.engines.base import VLRequest
from raylens.engines.encoding import IGNORE_INDEX, encode_request
from raylens.errors import KindError
from raylens.fetch import UrlFetcher
from raylens.images import DEFAULT_MAX_PIXELS, ImageError, PreparedImage, TilingSpec, decode_prepared
from raylens.sources import SourceError, SourceFilesystems, read_source
from raylens.training.records import TrainingRecord

BAD_RECORD_KINDS = frozenset({"missing_image", "image_outside_root", "unreadable_image", "bad_image", "too_long",
                              "no_target", "encode"})


class BadRecord(KindError):
    """A record whose images or encoded length make it untrainable (`kind` says why)."""

    KINDS = BAD_RECORD_KINDS


@dataclass
class EncodedSample:
    """A record ready to batch. `skipped` lists (record id, kind) of the records it stands in for."""

    record_id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: np.ndarray | None  # float32 [tiles, 3, T, T] of all its images, in order
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass
class SampleEncoder:
    """Everything a loader process needs to turn records into `EncodedSample`s (pickles to loader workers)."""

    spec: object  # raylens ModelSpec
    tokenizer: object
    max_length: int
    max_tiles: int | None = None  # --max-tiles (None: the checkpoint's)
    max_pixels: int = DEFAULT_MAX_PIXELS
    filesystems: SourceFilesystems = field(default_factory=SourceFilesystems.create)
    fetcher: UrlFetcher = field(default_factory=UrlFetcher)

    def tiling(self, record_max_tiles: int | None = None) -> TilingSpec:
        """--max-tiles, else the data set's own `max_dynamic_patch`, else the checkpoint's."""
        return self.spec.tiling(self.max_tiles or record_max_tiles)

    def images(self, record: TrainingRecord, tiling: TilingSpec) -> list[PreparedImage]:
        prepared = []
        for source in record.images:
            try:
                data = read_source(source, filesystems=self.filesystems, fetcher=self.fetcher)
            except SourceError as exc:
                kind = {"missing": "missing_image", "outside_root": "image_outside_root"}.get(exc.kind, "unreadable_image")
                raise BadRecord(kind, f"{source}: {exc}") from None
            try:
                prepared.append(decode_prepared(data, tiling, max_pixels=self.max_pixels))
            except ImageError as exc:
                raise BadRecord("bad_image", f"{source}: {exc}") from None
        return prepared

    def encode(self, record: TrainingRecord, images: Sequence[PreparedImage] | None = None) -> EncodedSample:
        """`images` may be given already prepared (synthetic data); else they are read from the record."""
        tiling = self.tiling(record.max_tiles)
        if images is None:
            images = self.images(record, tiling)
        try:
            request = VLRequest.chat(record.id, record.conversation, images)
            encoded = encode_request(request, spec=self.spec, tokenizer=self.tokenizer, tiling=tiling, with_labels=True)
        except ValueError as exc:  # RequestError included: e.g. the text holds <IMG_CONTEXT> itself
            raise BadRecord("encode", str(exc)) from None
        input_ids, labels, pixel_values = encoded.input_ids, encoded.labels, encoded.pixel_values
        if len(input_ids) > self.max_length:
            raise BadRecord("too_long", f"{len(input_ids)} tokens, more than --max-length {self.max_length}")
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRecord("no_target", "no answer token to compute the loss on")
        return EncodedSample(record.id, list(input_ids), list(labels), pixel_values)


def collate(samples: Sequence[EncodedSample], pad_id: int, pixel_dtype=None) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE_INDEX on padding), pixel_values (tiles
    of every sample, concatenated in row order: the order the model scatters image features in), plus
    bookkeeping the loop reads: num_samples, num_tokens (real, unpadded), skipped.

    `pixel_dtype` (a torch dtype; None: float32): the dtype the model takes its pixels in. Converting here,
    in the loader processes, keeps the conversion off the training step: a blocking `.to(cuda, bf16)` of a
    float32 tensor converts on the host (torch's intra-op threads, with the GPU idle) and copies twice the
    bytes through shared memory and to the device."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        attention_mask[row, :n] = 1
    tiles = [torch.from_numpy(np.ascontiguousarray(s.pixel_values)) for s in samples if s.pixel_values is not None]
    pixel_values = torch.cat(tiles) if tiles else None
    if pixel_values is not None and pixel_dtype is not None:
        pixel_values = pixel_values.to(pixel_dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "num_samples": len(samples),
        "num_tokens": int(attention_mask.sum()),
        "skipped": [pair for s in samples for pair in s.skipped],
    }
