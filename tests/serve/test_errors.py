"""One mapping from exceptions to OpenAI error bodies and statuses (serve.errors)."""
from __future__ import annotations

import json
import pickle

from ray.serve.exceptions import BackPressureError

from raylens.engines.base import EngineDeadError, RequestError
from raylens.images import ImageError
from serve.errors import ApiError, error_response, to_api_error


def body(response) -> dict:
    return json.loads(response.body)["error"]


def test_backpressure_is_a_503_with_retry_after():
    response = error_response(BackPressureError(num_queued_requests=3, max_queued_requests=3, retry_after_s=2.5))
    assert response.status_code == 503 and response.headers["retry-after"] == "3"  # rounded up
    assert body(response)["code"] == "overloaded"
    assert error_response(BackPressureError(1, 1), retry_after_s=4).headers["retry-after"] == "4"


def test_engine_problems_are_503_and_request_problems_400():
    assert error_response(EngineDeadError("cuda error")).status_code == 503
    refused = to_api_error(RequestError("prompt too long", param="max_tokens"))
    assert (refused.status, refused.param) == (400, "max_tokens")
    assert to_api_error(ImageError("too_large", "huge")).status == 413
    assert to_api_error(ImageError("decode", "bad")).status == 400


def test_unknown_failures_are_500_without_details():
    error = body(error_response(RuntimeError("secret path /srv/model and a prompt")))
    assert error["code"] == "internal_error" and "secret" not in error["message"]


def test_api_errors_survive_pickling_with_their_fields():
    error = ApiError(413, "too big", param="messages[0]", code="too_large", headers={"X": "1"})
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.message, copy.param, copy.code, copy.headers) == (413, "too big", "messages[0]", "too_large", {"X": "1"})
    assert set(copy.body()["error"]) == {"message", "type", "param", "code"}
