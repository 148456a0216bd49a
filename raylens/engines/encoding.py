"""Turn a `VLRequest` into model inputs (token ids + normalised tiles) exactly as InternVL2's `chat` does.

Shared by the transformers engine and the lmdeploy engine's `preprocess="raylens"` mode, so both engines
see byte-identical prompts: our template, `<image>` expanded to 256 x tiles `<IMG_CONTEXT>` tokens (fewer
for tiny models), and the tokenizer's own special tokens (InternLM2 adds `<s>`, Qwen2 adds nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raylens.engines.base import VLRequest
from raylens.images import TilingSpec, pixel_values_for
from raylens.prompts import IMG_CONTEXT, ChatTemplate, build_prompt, expand_image_placeholders


@dataclass
class EncodedRequest:
    input_ids: list[int]
    pixel_values: np.ndarray | None  # float32 [tiles, 3, T, T]
    image_offset: int | None  # index of the first <IMG_CONTEXT> token
    image_tokens: int


def encode_request(req: VLRequest, *, template: ChatTemplate, tokenizer, tiling: TilingSpec, image_tokens_per_tile: int) -> EncodedRequest:
    prompt = build_prompt(template, req.question, num_images=1 if req.image is not None else 0)
    pixel_values, n_image_tokens = None, 0
    if req.image is not None:
        pixel_values = pixel_values_for(req.image, tiling)  # the grid was chosen upstream
        n_image_tokens = pixel_values.shape[0] * image_tokens_per_tile
        prompt = expand_image_placeholders(prompt, [n_image_tokens])
    input_ids = tokenizer(prompt)["input_ids"]
    offset = None
    if pixel_values is not None:
        context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        offset = input_ids.index(context_id)
        if input_ids[offset : offset + n_image_tokens] != [context_id] * n_image_tokens:
            raise ValueError("the tokenizer split the image block: <IMG_CONTEXT> is not a single special token")
    return EncodedRequest(input_ids, pixel_values, offset, n_image_tokens)


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
