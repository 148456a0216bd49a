"""TEMPORARY adapter to the model-layer contract (docs: MODEL_LAYER_API.md) until `modellayer` lands it.

Fine-tuning is written against `raylens.conversation.{Conversation, Turn}`, `encode_request(...,
with_labels=True)` and `ModelSpec.tiling()`. Where main does not have them yet, this file provides the
same behaviour (the contract's rendering rules, labels on the answer spans); once they are on main it is
deleted and callers import the real names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from raylens.images import TilingSpec, pixel_values_for
from raylens.prompts import IMAGE_PLACEHOLDER, IMG_CONTEXT, ChatTemplate, get_template, image_block

IGNORE_INDEX = -100

try:  # the real names, once `modellayer` has landed them
    from raylens.conversation import Conversation, Turn  # noqa: F401
    from raylens.engines.base import VLRequest as _VLRequest
    from raylens.engines.encoding import encode_request as _encode_request

    HAVE_CONTRACT = True
except ImportError:  # pragma: no cover - removed with this file
    HAVE_CONTRACT = False

    @dataclass(frozen=True)
    class Turn:  # type: ignore[no-redef]
        user: str
        num_images: int = 0
        assistant: str | None = None

        def __post_init__(self) -> None:
            placed = self.user.count(IMAGE_PLACEHOLDER)
            if placed and placed != self.num_images:
                raise ValueError(f"a turn's text holds {placed} {IMAGE_PLACEHOLDER} placeholders but "
                                 f"{self.num_images} images are attached to it")

        def user_text(self) -> str:
            if self.num_images and IMAGE_PLACEHOLDER not in self.user:
                return (IMAGE_PLACEHOLDER + "\n") * self.num_images + self.user
            return self.user

    @dataclass(frozen=True)
    class Conversation:  # type: ignore[no-redef]
        turns: tuple
        system: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "turns", tuple(self.turns))
            if not self.turns:
                raise ValueError("a Conversation needs at least one turn")
            if any(t.assistant is None for t in self.turns[:-1]):
                raise ValueError("only the last turn may be unanswered")

        @property
        def num_images(self) -> int:
            return sum(t.num_images for t in self.turns)


def _render_spans(template: ChatTemplate, conversation, system_message: str) -> list[tuple[str, bool]]:
    system = conversation.system if conversation.system is not None else system_message
    spans: list[tuple[str, bool]] = []
    prompt = template.system_template.format(system_message=system) + template.sep if system else ""
    for turn in conversation.turns:
        prompt += template.user_role + turn.user_text() + template.sep + template.assistant_role
        if turn.assistant is not None:
            spans += [(prompt, False), (turn.assistant + template.sep, True)]
            prompt = ""
    if prompt:
        spans.append((prompt, False))
    return spans


def _expand(spans, image_tokens: list[int]):
    remaining = list(image_tokens)
    out = []
    for text, is_answer in spans:
        if not is_answer:
            pieces = text.split(IMAGE_PLACEHOLDER)
            if len(pieces) - 1 > len(remaining):
                raise ValueError("the prompt has more <image> placeholders than images")
            text = pieces[0] + "".join(image_block(remaining.pop(0)) + p for p in pieces[1:])
        out.append((text, is_answer))
    if remaining:
        raise ValueError("more images than <image> placeholders")
    return out


def _fallback_encode(conversation, images, *, spec, tokenizer, tiling, system_message):
    template = get_template(spec.template)
    tiles = [pixel_values_for(image, tiling) for image in images]
    spans = _expand(_render_spans(template, conversation, system_message),
                    [t.shape[0] * spec.image_tokens_per_tile for t in tiles])
    text = "".join(s for s, _ in spans)
    encoded = tokenizer(text, return_offsets_mapping=True)
    ranges, start = [], 0
    for piece, is_answer in spans:
        if is_answer:
            ranges.append((start, start + len(piece)))
        start += len(piece)
    ids = list(encoded["input_ids"])
    labels = [t if e > b and any(lo <= b < hi for lo, hi in ranges) else IGNORE_INDEX
              for t, (b, e) in zip(ids, encoded["offset_mapping"])]
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    if ids.count(context_id) != sum(t.shape[0] for t in tiles) * spec.image_tokens_per_tile:
        raise ValueError(f"the text holds {IMG_CONTEXT} tokens of its own")
    return ids, labels, (np.concatenate(tiles) if tiles else None)


def encode_for_training(conversation, images: Sequence, *, spec, tokenizer, tiling: TilingSpec,
                        system_message: str | None = None) -> tuple[list[int], list[int], np.ndarray | None]:
    """(input_ids, labels, pixel_values) of an answered conversation: the inference tokenisation, with
    labels on the answer spans (IGNORE_INDEX elsewhere)."""
    if HAVE_CONTRACT:
        request = _VLRequest.chat("train", conversation, tuple(images))
        encoded = _encode_request(request, spec=spec, tokenizer=tokenizer, tiling=tiling,
                                  system_message=system_message, with_labels=True)
        return encoded.input_ids, encoded.labels, encoded.pixel_values
    if system_message is None:
        system_message = get_template(spec.template).system_message
    return _fallback_encode(conversation, images, spec=spec, tokenizer=tokenizer, tiling=tiling,
                            system_message=system_message)


def spec_tiling(spec, max_tiles: int | None = None) -> TilingSpec:
    """`spec.tiling(max_tiles)` of the contract."""
    if hasattr(spec, "tiling"):
        return spec.tiling(max_tiles)
    return TilingSpec(tile_size=spec.tile_size, min_tiles=spec.min_tiles,
                      max_tiles=spec.max_tiles if max_tiles is None else max_tiles, use_thumbnail=spec.use_thumbnail)
