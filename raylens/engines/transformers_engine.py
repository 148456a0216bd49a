"""Run InternVL with transformers' `InternVLForConditionalGeneration`, on CPU or GPU.

This is the engine of CPU machines (tests, the embedded demo model) and the reference the lmdeploy engine
is checked against. Both checkpoint formats load through `raylens.checkpoints.loading` (the original one
is converted in memory). We build the token stream ourselves (`raylens.engines.encoding`: our tiling, our
templates), so the transformers processor (and its torchvision dependency) is never needed.

`generate` runs batches (left-padded, similar lengths together). `stream` hands its encoded request to a
`StreamBatcher` (`raylens.engines.stream_batching`): concurrent streams with the same settings share one
batched generate in a worker thread, whose streamer fans each step's tokens out to the rows' event loops,
and whose stopping criteria end a row (its stop token, a stop string its consumer saw, a consumer that went
away) without ending the others. `generate` and the stream batches share one lock, so they take turns on
the model. Both turn tokens into text through `raylens.engines.text.AnswerText`, which is why a stream's
deltas add up to what `generate` returns for the same request alone.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import numpy as np
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from raylens.engines.base import EngineDeadError, RequestError, SamplingParams, VLDelta, VLRequest, VLResult, format_error
from raylens.engines.encoding import encode_request, left_padded
from raylens.engines.stream_batching import StreamBatcher, StreamRow
from raylens.engines.text import AnswerText, cut_at_stop
from raylens.images import TilingSpec

# Messages of torch errors after which a CUDA context is unusable: the engine is dead, not the request.
_FATAL_DEVICE_ERRORS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error")


@dataclass
class _Encoded:
    index: int
    input_ids: list[int]
    pixel_values: np.ndarray | None


class TransformersEngine:
    """Batched `generate`, and `stream`s batched with each other, over our own tiles; one lock so the two
    take turns. `batch_wait_timeout_s`: how long a stream batch waits to fill (Serve's `@serve.batch` name)."""

    def __init__(
        self,
        model_dir: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_size: int = 16,
        model_name: str | None = None,
        batch_wait_timeout_s: float = 0.01,
    ) -> None:
        import torch

        from raylens.checkpoints.loading import compute_dtype, load_hf_model, stop_token_ids

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = compute_dtype(dtype, device.split(":")[0])
        self._torch = torch
        self.model, self.tokenizer, self.spec = load_hf_model(model_dir, dtype=torch_dtype, device=device)
        self.model.eval()
        self.device = device
        self.dtype = torch_dtype
        self.model_name = model_name or str(model_dir)
        self.max_batch_size = max_batch_size
        self.template = self.spec.chat_template()
        self._stop_ids = stop_token_ids(self.tokenizer, self.spec)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self._stop_ids[0]
        self._max_positions = _max_positions(self.model.config) or self.spec.max_context
        self._lock = threading.Lock()
        self.generate_calls = 0  # model.generate calls so far: how well concurrent requests were batched
        self._streams = StreamBatcher(self._stream_batch, max_batch_size=max_batch_size, wait_s=batch_wait_timeout_s)

    def tiling(self, max_tiles: int | None = None) -> TilingSpec:
        """The checkpoint's tiling, with the caller's `max_tiles` when given (`ModelSpec.tiling`)."""
        return self.spec.tiling(max_tiles)

    async def generate(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        return await asyncio.to_thread(self.generate_sync, requests, params)

    def generate_sync(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        self._check_open()
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
            self._check_open()
            for start in range(0, len(encoded), self.max_batch_size):
                chunk = encoded[start : start + self.max_batch_size]
                for enc, result in zip(chunk, self._generate_chunk(chunk, params)):
                    results[enc.index] = VLResult(requests[enc.index].request_id, **result)
        return [r for r in results if r is not None]

    async def stream(self, request: VLRequest, params: SamplingParams) -> AsyncIterator[VLDelta]:
        """Deltas of one request as its tokens are generated, in a batch with concurrent streams of the same
        settings (see the module docstring)."""
        self._check_open()
        enc = self._encode(0, request, params)  # RequestError here, before any delta
        row = StreamRow(enc, params, asyncio.get_running_loop())
        self._streams.submit(row)
        answer = AnswerText(params.stop)
        tokens: list[int] = []
        n_in = len(enc.input_ids)
        try:
            while True:
                item = await row.queue.get()
                if item is None:  # generation ended: eos or max_new_tokens
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, EngineDeadError):
                        raise EngineDeadError(str(item)) from item  # one exception object per stream
                    yield VLDelta(request.request_id, "", n_in, len(tokens), finish_reason="error",
                                  error=format_error(item))
                    return
                tokens.append(item)
                if item in self._stop_ids:
                    break
                text = answer.update(self._decode(tokens))
                if text:  # before stopping too: the text up to a stop string is part of the answer
                    yield VLDelta(request.request_id, text, n_in, len(tokens))
                if answer.stopped:
                    break
            stopped = answer.stopped or (bool(tokens) and tokens[-1] in self._stop_ids)
            kept = tokens[:-1] if tokens and tokens[-1] in self._stop_ids else tokens
            rest = answer.finish(self._decode(kept))
            yield VLDelta(request.request_id, rest, n_in, len(tokens), finish_reason="stop" if stopped else "length")
        finally:
            # Finished, stopped by a stop string, or the consumer went away: this row wants no more tokens
            # (its batch ends it at the next step; the other rows go on), and a row not started never starts.
            row.done = True
            self._streams.withdraw(row)

    def close(self) -> None:
        with self._lock:
            self.model = None
        self._streams.close()

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.model is None:
            raise EngineDeadError("the transformers engine is closed")

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _encode(self, index: int, req: VLRequest, params: SamplingParams) -> _Encoded:
        enc = encode_request(req, spec=self.spec, tokenizer=self.tokenizer, template=self.template)
        n = len(enc.input_ids)
        if self._max_positions and n + params.max_new_tokens > self._max_positions:
            limit = self._max_positions
            if n >= limit:
                raise RequestError(f"the prompt is {n} tokens, more than the model's context of {limit} "
                                   "(fewer or smaller images, fewer tiles or a shorter conversation)", param="messages")
            raise RequestError(f"the prompt is {n} tokens and max_new_tokens is {params.max_new_tokens}: "
                               f"{n + params.max_new_tokens} exceeds the model's context of {limit} tokens "
                               f"(at most {limit - n} new tokens fit)", param="max_tokens")
        return _Encoded(index, enc.input_ids, enc.pixel_values)

    def _generate_kwargs(self, chunk: list[_Encoded], params: SamplingParams, stopping=None) -> tuple[dict, int]:
        torch = self._torch
        ids, mask = left_padded([e.input_ids for e in chunk], self._pad_id)
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
        if stopping:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)
        return kwargs, ids.shape[1]

    def _run_generate(self, kwargs: dict):
        torch = self._torch
        self.generate_calls += 1
        try:
            with torch.inference_mode():
                return self.model.generate(**kwargs)
        except RuntimeError as exc:
            if any(marker in str(exc) for marker in _FATAL_DEVICE_ERRORS):
                raise EngineDeadError(f"the model failed on its device and cannot go on: {exc}") from exc
            raise

    def _generate_chunk(self, chunk: list[_Encoded], params: SamplingParams) -> list[dict]:
        stopping = None
        if params.stop:
            width = max(len(e.input_ids) for e in chunk)
            stopping = [_StopStrings(self._decode, params.stop, width)]
        kwargs, width = self._generate_kwargs(chunk, params, stopping)
        out = self._run_generate(kwargs)
        new_tokens = out[:, width:].tolist()
        return [self._finish(e, tokens, params) for e, tokens in zip(chunk, new_tokens)]

    def _finish(self, enc: _Encoded, tokens: list[int], params: SamplingParams) -> dict:
        stop_at = next((i for i, t in enumerate(tokens) if t in self._stop_ids), None)
        kept = tokens if stop_at is None else tokens[:stop_at]
        text = self._decode(kept)
        answer = AnswerText(params.stop)
        _, hit = cut_at_stop(text, params.stop)
        if hit:  # generation stopped on the token that completed the stop string
            n_out = next(k for k in range(1, len(kept) + 1) if cut_at_stop(self._decode(kept[:k]), params.stop)[1])
        else:
            n_out = len(kept) + (0 if stop_at is None else 1)
        return dict(
            text=answer.final(text),
            num_input_tokens=len(enc.input_ids),
            num_output_tokens=n_out,
            finish_reason="stop" if hit or stop_at is not None else "length",
        )

    def _stream_batch(self, rows: list[StreamRow]) -> None:
        """Runs in the stream batcher's thread: one generate for `rows` (equal settings), each step's token
        posted to its row, then None to every row (or the exception that ended the generate)."""
        outcome: BaseException | None = None
        try:
            with self._lock:
                self._check_open()
                live = [row for row in rows if not row.done]
                if live:
                    kwargs, _ = self._generate_kwargs([row.payload for row in live], live[0].params, [_RowsDone(live)])
                    kwargs["streamer"] = _FanOut(live, self._stop_ids)
                    self._run_generate(kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumers
            outcome = exc
        for row in rows:
            row.post(outcome)


class _FanOut(BaseStreamer):
    """Hands each generated token of a batch to its row, until the row is done."""

    def __init__(self, rows: list[StreamRow], stop_ids) -> None:
        self.rows, self.stop_ids = rows, frozenset(stop_ids)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands the streamer the prompt
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist()):
            if row.done:  # finished rows get padding; a consumer that stopped listening gets nothing more
                continue
            row.post(token)
            if token in self.stop_ids:
                row.done = True

    def end(self) -> None:
        pass


class _StopStrings(StoppingCriteria):
    """Ends each row of a batch once its generated text holds one of the stop strings."""

    def __init__(self, decode, stop: Sequence[str], prompt_width: int) -> None:
        self.decode, self.stop, self.prompt_width = decode, tuple(stop), prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = [cut_at_stop(self.decode(row[self.prompt_width :].tolist()), self.stop)[1] for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowsDone(StoppingCriteria):
    """Ends each row of a stream batch whose row is done (a stop string its consumer saw, a consumer gone)."""

    def __init__(self, rows: list[StreamRow]) -> None:
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


def _max_positions(config) -> int | None:
    text = getattr(config, "text_config", None)
    return getattr(text, "max_position_embeddings", None)
