"""The one server-sent-events path: engine deltas -> OpenAI `chat.completion.chunk` events -> `data: [DONE]`.

Event order, as OpenAI sends it: a first chunk with the assistant role, one chunk per piece of text, a
last chunk with an empty delta and the finish reason, then (with `stream_options.include_usage`) a chunk
with no choices and the usage, then `data: [DONE]`. A failure after the 200 was sent can only be told in
the stream: an `{"error": ...}` event (the official client raises it), then `[DONE]`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from serve.protocol import ChatCompletionChunk, ChunkChoice, Delta, Usage

DONE = "data: [DONE]\n\n"


@dataclass
class StreamMeta:
    completion_id: str
    created: int
    model: str
    include_usage: bool


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunk(meta: StreamMeta, delta: Delta | None, finish_reason: str | None = None, usage: Usage | None = None) -> str:
    choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
    chunk = ChatCompletionChunk(id=meta.completion_id, created=meta.created, model=meta.model, choices=choices, usage=usage)
    return event(chunk.model_dump())


async def sse_events(deltas: AsyncIterator, meta: StreamMeta, *, on_text: Callable[[], None] = lambda: None,
                     on_done: Callable[[object | None, BaseException | None], None] = lambda last, exc: None,
                     error_body: Callable[[BaseException], dict]) -> AsyncIterator[str]:
    """SSE lines for a stream of `VLDelta`s. `on_text` runs at the first text (time to first token),
    `on_done(last_delta, exception)` once at the end, also when the client went away."""
    yield _chunk(meta, Delta(role="assistant", content=""))
    last, failure, seen_text = None, None, False
    try:
        async for delta in deltas:
            last = delta
            if delta.text:
                if not seen_text:
                    seen_text = True
                    on_text()
                yield _chunk(meta, Delta(content=delta.text))
            if delta.finish_reason is not None:
                break
        if last is None or last.finish_reason is None or last.finish_reason == "error":
            raise RuntimeError(f"the engine ended the answer without finishing it ({getattr(last, 'error', None)})")
        yield _chunk(meta, Delta(), finish_reason=last.finish_reason)
        if meta.include_usage:
            usage = Usage(prompt_tokens=last.num_input_tokens, completion_tokens=last.num_output_tokens,
                          total_tokens=last.num_input_tokens + last.num_output_tokens)
            yield _chunk(meta, None, usage=usage)
    except Exception as exc:  # noqa: BLE001 - after the 200 an error can only be an event
        failure = exc
        yield event(error_body(exc))
    finally:
        on_done(last, failure)
    yield DONE
