"""Run InternVL2 with transformers' `InternVLForConditionalGeneration`, on CPU or GPU.

This is the engine of CPU machines (tests, the embedded demo model) and the reference the lmdeploy engine
is checked against. Both checkpoint formats load through `raylens.checkpoints.loading` (the original one
is converted in memory). We build the token stream ourselves (our tiling, our templates), so the
transformers processor (and its torchvision dependency) is never needed.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from raylens.engines.base import SamplingParams, VLRequest, VLResult
from raylens.engines.encoding import encode_request, left_padded
from raylens.images import TilingSpec
from raylens.prompts import get_template


@dataclass
class _Encoded:
    index: int
    input_ids: list[int]
    pixel_values: np.ndarray | None


class TransformersEngine:
    """Batched `generate` over our own tiles; one lock so concurrent callers take turns on the model."""

    def __init__(
        self,
        model_dir: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_size: int = 16,
        model_name: str | None = None,
    ) -> None:
        import torch

        from raylens.checkpoints.loading import load_hf_model

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        self._torch = torch
        self.model, self.tokenizer, self.spec = load_hf_model(model_dir, dtype=torch_dtype, device=device)
        self.model.eval()
        self.device = device
        self.dtype = torch_dtype
        self.model_name = model_name or str(model_dir)
        self.max_batch_size = max_batch_size
        self.template = get_template(self.spec.template)
        vocab = self.tokenizer.get_vocab()
        self._stop_ids = [vocab[w] for w in self.template.stop_words if w in vocab]
        if not self._stop_ids:
            raise ValueError(f"tokenizer of {model_dir} has none of the stop words {self.template.stop_words}")
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self._stop_ids[0]
        self._max_positions = _max_positions(self.model.config)
        self._lock = threading.Lock()

    def tiling(self, max_tiles: int | None = None) -> TilingSpec:
        """The checkpoint's tiling, with the caller's `max_tiles` when given."""
        return TilingSpec(
            tile_size=self.spec.tile_size,
            min_tiles=self.spec.min_tiles,
            max_tiles=max_tiles or self.spec.max_tiles,
            use_thumbnail=self.spec.use_thumbnail,
        )

    async def generate(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        return await asyncio.to_thread(self.generate_sync, requests, params)

    def generate_sync(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        results: list[VLResult | None] = [None] * len(requests)
        encoded: list[_Encoded] = []
        for i, req in enumerate(requests):
            try:
                encoded.append(self._encode(i, req, params))
            except Exception as exc:  # a bad request is that row's error, not the batch's
                results[i] = VLResult.failed(req.request_id, exc)
        # Similar lengths together waste less padding.
        encoded.sort(key=lambda e: len(e.input_ids))
        with self._lock:
            for start in range(0, len(encoded), self.max_batch_size):
                chunk = encoded[start : start + self.max_batch_size]
                for enc, result in zip(chunk, self._generate_chunk(chunk, params)):
                    results[enc.index] = VLResult(requests[enc.index].request_id, **result)
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.model = None

    # -- internals -------------------------------------------------------------------------------

    def _encode(self, index: int, req: VLRequest, params: SamplingParams) -> _Encoded:
        enc = encode_request(req, template=self.template, tokenizer=self.tokenizer, tiling=self.tiling(),
                             image_tokens_per_tile=self.spec.image_tokens_per_tile)
        input_ids, pixel_values = enc.input_ids, enc.pixel_values
        needed = len(input_ids) + params.max_new_tokens
        if self._max_positions and needed > self._max_positions:
            raise ValueError(
                f"prompt is {len(input_ids)} tokens and max_new_tokens is {params.max_new_tokens}: "
                f"{needed} exceeds the model's {self._max_positions} positions (lower --max-tiles)"
            )
        return _Encoded(index, input_ids, pixel_values)

    def _generate_chunk(self, chunk: list[_Encoded], params: SamplingParams) -> list[dict]:
        torch = self._torch
        ids, mask = left_padded([e.input_ids for e in chunk], self._pad_id)
        width = ids.shape[1]
        kwargs = dict(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self._stop_ids,
            pad_token_id=self._pad_id,
        )
        tiles = [e.pixel_values for e in chunk if e.pixel_values is not None]
        if tiles:
            kwargs["pixel_values"] = torch.from_numpy(np.concatenate(tiles)).to(self.device, self.dtype)
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_new_tokens
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        new_tokens = out[:, width:].tolist()
        return [self._finish(e, tokens) for e, tokens in zip(chunk, new_tokens)]

    def _finish(self, enc: _Encoded, tokens: list[int]) -> dict:
        stop_at = next((i for i, t in enumerate(tokens) if t in self._stop_ids), None)
        kept = tokens if stop_at is None else tokens[:stop_at]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return dict(
            text=text,
            num_input_tokens=len(enc.input_ids),
            num_output_tokens=len(kept) + (0 if stop_at is None else 1),
            finish_reason="length" if stop_at is None else "stop",
        )


def _max_positions(config) -> int | None:
    text = getattr(config, "text_config", None)
    return getattr(text, "max_position_embeddings", None)

