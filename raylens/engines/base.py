"""The one small protocol every engine implements, and the typed requests and results it exchanges.

The batch job's actor, the Serve replica (later) and tests hold a `VLEngine` and nothing more specific:
which library runs the model (transformers, lmdeploy) is a constructor choice, see `create_engine`.
An engine knows nothing of Ray, files or rows; it receives decoded, tiled-ready images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from raylens.checkpoints.formats import ModelSpec
    from raylens.images import PreparedImage


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings shared by every engine. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class VLRequest:
    """One question about (at most) one image. `question` is the user text, without any template."""

    request_id: str
    question: str
    image: "PreparedImage | None" = None
    max_tiles: int | None = None  # the max_tiles the image's grid was chosen with (None: the checkpoint's)


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


def format_error(exc: BaseException) -> str:
    """`TypeName: message`, the one shape of every row-level error in raylens."""
    message = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {message}"


@runtime_checkable
class VLEngine(Protocol):
    """Generate answers for a batch of requests.

    `generate` returns one result per request, in request order. A request that cannot be served
    (too long, bad image) becomes a result with `error`; an engine that cannot go on raises, so the
    actor holding it dies and is restarted by Ray.
    """

    spec: "ModelSpec"
    model_name: str

    async def generate(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]: ...

    def close(self) -> None: ...
