"""Turn a `VLRequest` (one question, or a whole conversation with several images) into model inputs: token
ids, the normalised tiles of every image, and where each image's tokens sit. Exactly InternVL's `chat`:
the template's string, each `<image>` expanded to `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) +
`</img>`, tokenised once with the tokenizer's own special tokens (InternLM2 adds `<s>`, Qwen2 nothing).

Shared by the transformers engine, the lmdeploy engine's `preprocess="raylens"` mode and fine-tuning
(`with_labels=True`: labels from `render_spans`, on the same tokenisation), so all three see byte-identical
prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from raylens.conversation import render_spans
from raylens.engines.base import RequestError, VLRequest
from raylens.images import PreparedImage, TilingSpec, pixel_values_for, tiling_for
from raylens.prompts import IMAGE_PLACEHOLDER, IMG_CONTEXT, ChatTemplate, image_block

if TYPE_CHECKING:
    from raylens.checkpoints.formats import ModelSpec

IGNORE_INDEX = -100  # the label of tokens that carry no loss (PyTorch's cross-entropy default)


@dataclass
class EncodedImage:
    """Where one image's `<IMG_CONTEXT>` run starts in the token ids, its length, and its tile count."""

    offset: int
    num_tokens: int
    num_tiles: int


@dataclass
class EncodedRequest:
    input_ids: list[int]
    pixel_values: np.ndarray | None  # float32 [tiles of all images, 3, T, T], images in prompt order
    images: list[EncodedImage] = field(default_factory=list)
    prompt: str = ""  # the expanded prompt string the ids were tokenised from
    labels: list[int] | None = None  # with_labels: the answer tokens, IGNORE_INDEX elsewhere

    @property
    def image_offset(self) -> int | None:
        """Offset of the first image (the one-image shorthand)."""
        return self.images[0].offset if self.images else None

    @property
    def image_tokens(self) -> int:
        """Image tokens of all images together."""
        return sum(i.num_tokens for i in self.images)

    def image_pixel_values(self) -> list[np.ndarray]:
        """`pixel_values` split per image, in prompt order."""
        out, start = [], 0
        for image in self.images:
            out.append(self.pixel_values[start : start + image.num_tiles])
            start += image.num_tiles
        return out


class CachedPromptTokenizer:
    """A tokenizer whose plain calls (`tokenizer(prompt)`) are remembered for up to `size` prompts; any other
    use goes to the tokenizer itself.

    Why: a batch job asks the same question of most images at the same tile count, so most prompts are the
    same string. In the lmdeploy engine's process each tokenizer call gives the GIL up and then waits for the
    engine's busy loop to hand it back, which is what held requests back from lmdeploy (docs/benchmarks.md,
    session 7). Safe from several threads: one dict read or write at a time, a full cache is emptied."""

    def __init__(self, tokenizer, size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self._ids: dict[str, tuple[int, ...]] = {}

    def __call__(self, text, **kwargs):
        if kwargs or not isinstance(text, str):
            return self.tokenizer(text, **kwargs)
        ids = self._ids.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(text)["input_ids"])
            if len(self._ids) >= self.size:
                self._ids.clear()
            self._ids[text] = ids
        return {"input_ids": list(ids)}

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def tiling_of(image: PreparedImage, spec: "ModelSpec", tiling: TilingSpec | None = None) -> TilingSpec:
    """The tiling `image` is cut with: its own (the one it was prepared with), else `tiling`, else the
    checkpoint's; it must have the checkpoint's tile size."""
    image_tiling = image.tiling or tiling or spec.tiling()
    if image_tiling.tile_size != spec.tile_size:
        raise ValueError(f"an image was prepared with {image_tiling.tile_size}-px tiles; this checkpoint "
                         f"uses {spec.tile_size}-px tiles")
    return image_tiling


def encode_request(req: VLRequest, *, spec: "ModelSpec", tokenizer, template: ChatTemplate | None = None,
                   system_message: str | None = None, tiling: TilingSpec | None = None,
                   with_labels: bool = False, with_pixels: bool = True) -> EncodedRequest:
    """Token ids, tiles and image positions of `req` for the checkpoint `spec`.

    `template` and `system_message` default to the checkpoint's (`spec.chat_template()`,
    `spec.system_message`); a conversation's own `system` wins over both. Each image is cut with the tiling
    it was prepared with (`PreparedImage.tiling`; `tiling`, else the checkpoint's, for images that do not
    say), which must have the checkpoint's tile size. RequestError when the text itself holds
    `<IMG_CONTEXT>` (it would break the image alignment). `with_pixels=False` leaves `pixel_values` None, for a
    caller that takes each image's tiles itself (the lmdeploy engine forwards tiles the CPU stage made).
    """
    template = template or spec.chat_template()
    system_message = spec.system_message if system_message is None else system_message
    conversation, images = req.as_conversation()
    tiles = []
    tiles_per_image = []
    for image in images:
        image_tiling = tiling_of(image, spec, tiling)
        if with_pixels:
            tiles.append(pixel_values_for(image, image_tiling))
            tiles_per_image.append(tiles[-1].shape[0])
        else:  # the tile count pixel_values_for would make, checked as it checks it
            tiling_for(image, image_tiling)
            tiles_per_image.append(image.num_tiles)
    spans = _expanded_spans(render_spans(template, conversation, system_message=system_message),
                            [spec.image_tokens(n) for n in tiles_per_image])
    prompt = "".join(text for text, _ in spans)
    input_ids, labels = _tokenize(tokenizer, spans, with_labels)
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    encoded_images = _image_runs(input_ids, context_id, tiles_per_image, spec)
    pixel_values = np.concatenate(tiles) if tiles else None
    return EncodedRequest(input_ids, pixel_values, encoded_images, prompt, labels)


def _expanded_spans(spans: list[tuple[str, bool]], image_tokens: list[int]) -> list[tuple[str, bool]]:
    """Each `<image>` of the non-answer spans replaced, in order, by its image block (an answer's text is
    taken literally, whatever it holds)."""
    remaining = list(image_tokens)
    out = []
    for text, is_answer in spans:
        if not is_answer:
            pieces = text.split(IMAGE_PLACEHOLDER)
            if len(pieces) - 1 > len(remaining):
                raise ValueError(f"the prompt has more {IMAGE_PLACEHOLDER} placeholders than the "
                                 f"{len(image_tokens)} images given")
            blocks = [image_block(remaining.pop(0)) for _ in pieces[1:]]
            text = pieces[0] + "".join(b + p for b, p in zip(blocks, pieces[1:]))
        out.append((text, is_answer))
    if remaining:
        raise ValueError(f"{len(image_tokens)} images were given but the prompt has "
                         f"{len(image_tokens) - len(remaining)} {IMAGE_PLACEHOLDER} placeholders")
    return out


def _tokenize(tokenizer, spans: list[tuple[str, bool]], with_labels: bool) -> tuple[list[int], list[int] | None]:
    """Ids of the whole prompt (one tokenisation), and labels that keep the answer spans' tokens.

    A token is an answer token when it starts inside an answer span (fast tokenizers report each token's
    characters). A tokenizer without offsets is tokenised span by span instead, accepted only when that
    gives the same ids as the whole string."""
    prompt = "".join(text for text, _ in spans)
    if not with_labels:
        return list(tokenizer(prompt)["input_ids"]), None
    answer_ranges, start = [], 0
    for text, is_answer in spans:
        if is_answer:
            answer_ranges.append((start, start + len(text)))
        start += len(text)
    try:
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return _tokenize_by_span(tokenizer, spans, prompt)
    input_ids = list(encoded["input_ids"])
    labels = []
    for token_id, (begin, end) in zip(input_ids, offsets):
        inside = end > begin and any(lo <= begin < hi for lo, hi in answer_ranges)
        labels.append(token_id if inside else IGNORE_INDEX)
    return input_ids, labels


def _tokenize_by_span(tokenizer, spans, prompt: str) -> tuple[list[int], list[int]]:
    whole = list(tokenizer(prompt)["input_ids"])
    input_ids, labels = [], []
    for i, (text, is_answer) in enumerate(spans):
        ids = list(tokenizer(text, add_special_tokens=(i == 0))["input_ids"])
        input_ids += ids
        labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
    if input_ids != whole:
        raise ValueError("this tokenizer reports no character offsets and tokenises the answer spans "
                         "differently on their own: labels cannot be aligned")
    return input_ids, labels


def _image_runs(input_ids: list[int], context_id: int, tiles_per_image: list[int], spec: "ModelSpec"
                ) -> list[EncodedImage]:
    """One EncodedImage per run of `<IMG_CONTEXT>` ids; the runs must be exactly the images' blocks."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(input_ids):
        if input_ids[i] == context_id:
            j = i
            while j < len(input_ids) and input_ids[j] == context_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    expected = [spec.image_tokens(n) for n in tiles_per_image]
    if [n for _, n in runs] != expected:
        if sum(n for _, n in runs) > sum(expected):
            raise RequestError(f"the text holds {IMG_CONTEXT} tokens of its own; attach images instead",
                               param="messages")
        raise ValueError(f"the tokenizer split the image blocks ({[n for _, n in runs]} {IMG_CONTEXT} tokens, "
                         f"expected {expected}): {IMG_CONTEXT} is not a single special token")
    return [EncodedImage(offset, n, tiles) for (offset, n), tiles in zip(runs, tiles_per_image)]


def left_padded(rows: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) long tensors for a batch of token-id lists, padded on the left so that
    every row ends where generation starts."""
    import torch

    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        attention_mask[r, width - len(ids) :] = 1
    return input_ids, attention_mask
