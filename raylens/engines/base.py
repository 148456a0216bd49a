"""The one small protocol every engine implements, and the typed requests, results and errors it exchanges.

The batch job's actor, the Serve replica and tests hold a `VLEngine` and nothing more specific: which
library runs the model (transformers, lmdeploy) is a constructor choice, see `create_engine`.
An engine knows nothing of Ray, files or rows; it receives decoded, tile-ready images.

Two request shapes, one meaning: the batch job's one question about at most one image
(`VLRequest(id, question, image)`), and a whole chat (`VLRequest.chat(id, conversation, images)`);
`as_conversation()` turns either into (Conversation, images), which is all an engine reads.
Errors have two kinds: `RequestError` is this request's fault (bad image, too long for the context) and is
reported before any text; `EngineDeadError` means the engine cannot serve anything any more, and whoever
holds it (a Ray actor) must die so it is rebuilt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Protocol, Sequence, runtime_checkable

from raylens.conversation import Conversation, Turn

if TYPE_CHECKING:
    from raylens.checkpoints.formats import ModelSpec
    from raylens.images import PreparedImage

FINISH_REASONS = ("stop", "length", "error")


class RequestError(ValueError):
    """One request cannot be served as asked (the endpoint answers 400); `param` names the field at fault
    (OpenAI's `param`: e.g. "messages", "max_tokens"), or None."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keep `param` across Ray's pickling
        return (type(self), (str(self), self.param))


class EngineDeadError(RuntimeError):
    """The engine can no longer work (closed, its device or its background loop failed): fatal for its
    holder, which re-raises it so Ray restarts the actor instead of failing every later request."""


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings shared by every engine. temperature 0 means greedy.

    `stop`: extra stop strings (OpenAI `stop`); generation ends where one appears, the returned text
    excludes it, and finish_reason is "stop". The template's own stop tokens always apply."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class VLRequest:
    """One question about at most one image (`question`/`image`, the batch job), or a whole chat
    (`conversation` + its `images` in placeholder order; build it with `VLRequest.chat`).

    `max_tiles` is the max_tiles the images' grids were chosen with, for images that do not carry their
    tiling (`PreparedImage.tiling` says it; None: the checkpoint's)."""

    request_id: str
    question: str | None = None
    image: "PreparedImage | None" = None
    max_tiles: int | None = None
    conversation: Conversation | None = None
    images: tuple["PreparedImage", ...] = field(default=())

    def __post_init__(self) -> None:
        self.images = tuple(self.images)
        if self.conversation is not None:
            if self.question is not None or self.image is not None:
                raise ValueError("a VLRequest with a conversation takes its images in `images`, not question/image")
            if not isinstance(self.conversation, Conversation):
                raise TypeError(f"VLRequest.conversation must be a Conversation, got {type(self.conversation).__name__}")
            if self.conversation.num_images != len(self.images):
                raise ValueError(f"the conversation has {self.conversation.num_images} images but "
                                 f"{len(self.images)} were given")
        else:
            if not isinstance(self.question, str):
                raise ValueError("a VLRequest needs a question (str) or a conversation")
            if self.images:
                raise ValueError("`images` belong to a conversation; a one-question request takes `image`")

    @classmethod
    def chat(cls, request_id: str, conversation: Conversation, images: Sequence["PreparedImage"] = (),
             max_tiles: int | None = None) -> "VLRequest":
        return cls(request_id, max_tiles=max_tiles, conversation=conversation, images=tuple(images))

    def as_conversation(self) -> tuple[Conversation, tuple["PreparedImage", ...]]:
        """(Conversation, images) for either shape."""
        if self.conversation is not None:
            return self.conversation, self.images
        if self.image is None:
            return Conversation((Turn(self.question, 0),)), ()
        return Conversation((Turn(self.question, 1),)), (self.image,)


@dataclass
class VLResult:
    """What an engine returns for one request; `error` is "TypeName: message" when this request failed."""

    request_id: str
    text: str | None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None

    @classmethod
    def failed(cls, request_id: str, exc: BaseException) -> "VLResult":
        return cls(request_id, None, finish_reason="error", error=format_error(exc))


@dataclass
class VLDelta:
    """One streamed step of one request: the text new since the previous delta ("" allowed) and the token
    counts so far. The last delta, and only it, carries `finish_reason` ("stop" | "length" | "error")."""

    request_id: str
    text: str
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    error: str | None = None


def format_error(exc: BaseException) -> str:
    """`TypeName: message`, the one shape of every row-level error in raylens."""
    message = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {message}"


@runtime_checkable
class VLEngine(Protocol):
    """Generate answers for a batch of requests, or stream one.

    `generate` returns one result per request, in request order. A request that cannot be served
    (too long, bad image) becomes a result with `error`; an engine that cannot go on raises
    `EngineDeadError`, so the actor holding it dies and is restarted by Ray.

    `stream` yields `VLDelta`s whose texts concatenate to exactly the text `generate` returns for the same
    request and greedy params, ending with one delta that carries `finish_reason`. A request problem is
    raised as `RequestError` before the first delta.
    """

    spec: "ModelSpec"
    model_name: str

    async def generate(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]: ...

    def stream(self, request: VLRequest, params: SamplingParams) -> AsyncIterator[VLDelta]: ...

    def close(self) -> None: ...
