"""Every failure the endpoint reports, as OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.

Why one mapping: the guide's rule is that client input gets a 4xx with a body the official client can
read, never a 500. Routes raise (or let through) whatever went wrong, and `error_response` alone decides
the status and the body, so a new kind of failure is classified here once instead of in every route.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

logger = logging.getLogger("raylens.serve")

# OpenAI's `type` values (they also send "invalid_request_error" for 404 and 413).
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
OVERLOADED = "overloaded_error"
SERVER = "server_error"


class ApiError(Exception):
    """A failure with its HTTP status and OpenAI error fields; `headers` go on the response (Retry-After)."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __reduce__(self):
        return (_rebuild, (self.status, self.message, self.type, self.param, self.code, self.headers))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _rebuild(status, message, type, param, code, headers) -> ApiError:
    return ApiError(status, message, type=type, param=param, code=code, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None, code: str = "too_large") -> ApiError:
    return ApiError(413, message, param=param, code=code)


def overloaded(retry_after_s: float) -> ApiError:
    """The 503 of a full model, with `Retry-After` in whole seconds (rounded up)."""
    return ApiError(503, "the model is at capacity; retry after a moment", type=OVERLOADED, code="overloaded",
                    headers={"Retry-After": str(max(0, int(-(-retry_after_s // 1))))})


def to_api_error(exc: BaseException, *, retry_after_s: float = 1.0) -> ApiError:
    """Classify any exception. Unknown ones are server faults (500) whose details stay in the log."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from raylens.engines.base import EngineDeadError, RequestError
    from raylens.errors import KindError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackPressureError):
        return overloaded(exc.retry_after_s if exc.retry_after_s is not None else retry_after_s)
    if isinstance(exc, (DeploymentUnavailableError, EngineDeadError)):
        return ApiError(503, "the model is not available right now (starting or restarting); retry later",
                        type=OVERLOADED, code="model_unavailable", headers={"Retry-After": str(max(1, int(retry_after_s)))})
    if isinstance(exc, RequestError):
        return bad_request(str(exc), param=exc.param or "messages")
    if isinstance(exc, KindError):  # ImageError / FetchError / SourceError that escaped the intake's mapping
        status = 413 if exc.kind == "too_large" else 400
        return ApiError(status, str(exc), code=f"image_{exc.kind}")
    logger.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return ApiError(500, "internal server error; the server log has the details", type=SERVER, code="internal_error")


def error_response(exc: BaseException, *, retry_after_s: float = 1.0) -> JSONResponse:
    """The HTTP response for any exception (see `to_api_error`)."""
    error = to_api_error(exc, retry_after_s=retry_after_s)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
