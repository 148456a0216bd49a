"""`ChatIngress`: the FastAPI side of the endpoint. Routes are thin: each one authorises, hands the body to
`serve.chat` (validation), `serve.intake` (images) and the model deployment, and lets `serve.errors`
turn anything that went wrong into an OpenAI-style answer.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}` (model cards carry a `raylens`
object with the request limits), `GET /health` (no key), and the web page at `/`.
The FastAPI app is built per replica (`__serve_build_asgi_app__`), after the config is known, so CORS is
added only when `cors_origins` is set and the web chat page (`serve.webpage`: `/` and `/web/*`) only when
`web_page` is on, after the API routes. The page needs no key: it holds no data, and a browser cannot
send one for the page itself; the page's own API calls do.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylens.engines.base import VLRequest
from serve.chat import parse_request, plan_chat
from serve.config import ServeConfig
from serve.errors import AUTHENTICATION, ApiError, bad_request, error_response, to_api_error, too_large
from serve.metrics import EndpointMetrics
from serve.model import ModelInfo, RequestFailure
from serve.protocol import (AssistantMessage, ChatCompletion, Choice, ModelCard, ModelList, Usage, completion_id, now)
from serve.sse import StreamMeta, sse_events

logger = logging.getLogger("raylens.serve")
CHAT_ROUTE = "/v1/chat/completions"


class ChatIngress:
    """HTTP in front of the model: the `VLModel` deployment, `model` being its handle (`layout: split`), or a
    `VLModel` in this replica (`layout: single`, no handle; see `serve.model_client`)."""

    def __init__(self, config: ServeConfig, model=None) -> None:
        from serve.model_client import HandleModel, InProcessModel

        self.config = config
        self.model = InProcessModel(config) if config.layout == "single" else HandleModel(model)
        self.metrics = EndpointMetrics()
        self._info: ModelInfo | None = None
        self._info_lock = asyncio.Lock()
        self._intake = None
        self._key = config.api_key.encode() if config.api_key else None

    # -- app ----------------------------------------------------------------------------------
    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="raylens", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(StarletteHTTPException, self._http_exception)
        if self.config.cors_origins:
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=list(self.config.cors_origins),
                               allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.get_model, methods=["GET"])
        app.add_api_route(CHAT_ROUTE, self.chat_completions, methods=["POST"])
        if self.config.web_page:
            from serve.webpage import add_web_page

            add_web_page(app, self.config.web_dir)
        return app

    async def _http_exception(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """404 for unknown routes, 405 for wrong methods: with OpenAI's body, like every other error."""
        self.metrics.counted("other", exc.status_code)
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def check_health(self) -> None:
        """Serve's periodic check: with the model in this replica (`layout: single`), the engine's."""
        self.model.check_health()

    # -- routes -------------------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        self.metrics.counted("/health", 200)
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            info = await self._model_info()
            response = JSONResponse(ModelList(data=[self._card(info)]).model_dump())
        except Exception as exc:  # noqa: BLE001 - every failure is an OpenAI-style answer
            response = self._error(exc)
        self.metrics.counted("/v1/models", response.status_code)
        return response

    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            info = await self._model_info()
            if model_id != info.model_name:
                raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
            response = JSONResponse(self._card(info).model_dump())
        except Exception as exc:  # noqa: BLE001
            response = self._error(exc)
        self.metrics.counted("/v1/models", response.status_code)
        return response

    async def chat_completions(self, request: Request):
        started = time.monotonic()
        self.metrics.started()
        state = {"status": 500, "prompt": 0, "completion": 0, "open_stream": False}
        deltas = None
        try:
            self._authorize(request)
            body = await self._read_body(request)
            parsed = parse_request(body)
            info = await self._model_info()
            plan = plan_chat(parsed, self.config, info.spec.chat_template(), info.model_name)
            rid = completion_id()
            if self.config.log_prompts:
                logger.info("%s: %d turns, images %s", rid, len(plan.conversation.turns), [r.url[:100] for r in plan.images])
            images = await self._intake_for(info).load(plan.images)
            vl_request = VLRequest.chat(rid, plan.conversation, images, max_tiles=plan.max_tiles)
            deltas = self.model.chat(vl_request, plan.params, plan.stream)
            try:
                first = await deltas.__anext__()
            except StopAsyncIteration:
                raise RuntimeError("the model answered nothing") from None
            if isinstance(first, RequestFailure):
                raise bad_request(first.message, param=first.param or "messages", code="request_refused")
            if plan.stream:
                meta = StreamMeta(rid, now(), info.model_name, plan.include_usage)
                state["status"], state["open_stream"] = 200, True
                return StreamingResponse(self._streamed(_chain(first, deltas), deltas, meta, started, state),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            response = await self._collected(_chain(first, deltas), rid, info, started)
            state.update(status=200, prompt=response.usage.prompt_tokens, completion=response.usage.completion_tokens)
            return JSONResponse(response.model_dump())
        except Exception as exc:  # noqa: BLE001
            _cancel_quietly(deltas)
            response = self._error(exc)
            state["status"] = response.status_code
            return response
        finally:
            if not state["open_stream"]:
                self.metrics.finished(CHAT_ROUTE, state["status"], time.monotonic() - started, state["prompt"], state["completion"])

    # -- the parts ----------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", type=AUTHENTICATION,
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(f"request body is {declared} bytes, more than max_body_bytes={limit}", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"request body is more than max_body_bytes={limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _model_info(self) -> ModelInfo:
        """The model's name and checkpoint spec, asked of the model deployment once."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = await self.model.describe()
        return self._info

    def _intake_for(self, info: ModelInfo):
        if self._intake is None:
            from serve.intake import ImageIntake

            self._intake = ImageIntake(self.config, info.spec)
        return self._intake

    def _card(self, info: ModelInfo) -> ModelCard:
        return ModelCard(id=info.model_name, created=info.created, raylens=self._client_limits())

    def _client_limits(self) -> dict:
        """What a client needs to size its requests (the web page downscales images by these)."""
        from raylens.prompts import DEFAULT_CAPTION_PROMPT

        c = self.config
        return dict(max_images=c.max_images, max_image_bytes=c.max_image_bytes, max_image_pixels=c.max_image_pixels,
                    max_body_bytes=c.max_body_bytes, max_tokens_limit=c.max_tokens_limit,
                    default_max_tokens=c.default_max_tokens, max_tiles=c.max_tiles, caption_prompt=DEFAULT_CAPTION_PROMPT)

    def _error(self, exc: BaseException) -> JSONResponse:
        return error_response(exc, retry_after_s=self.config.retry_after_s)

    async def _collected(self, deltas: AsyncIterator, rid: str, info: ModelInfo, started: float) -> ChatCompletion:
        """A non-streamed answer: the deltas joined."""
        pieces, last = [], None
        async for delta in deltas:
            if delta.text and not pieces:
                self.metrics.first_token(time.monotonic() - started)
            pieces.append(delta.text)
            last = delta
        if last is None or last.finish_reason in (None, "error"):
            raise RuntimeError(f"the engine ended the answer without finishing it ({getattr(last, 'error', None)})")
        usage = Usage(prompt_tokens=last.num_input_tokens, completion_tokens=last.num_output_tokens,
                      total_tokens=last.num_input_tokens + last.num_output_tokens)
        return ChatCompletion(id=rid, created=now(), model=info.model_name, usage=usage,
                              choices=[Choice(message=AssistantMessage(content="".join(pieces)), finish_reason=last.finish_reason)])

    async def _streamed(self, deltas: AsyncIterator, handle_stream, meta: StreamMeta, started: float, state: dict):
        def on_text() -> None:
            self.metrics.first_token(time.monotonic() - started)

        def on_done(last, exc) -> None:
            status = 200 if exc is None else to_api_error(exc).status
            self.metrics.finished(CHAT_ROUTE, status, time.monotonic() - started,
                                  getattr(last, "num_input_tokens", 0), getattr(last, "num_output_tokens", 0))

        try:
            async for line in sse_events(deltas, meta, on_text=on_text, on_done=on_done,
                                         error_body=lambda exc: to_api_error(exc).body()):
                yield line
        finally:
            _cancel_quietly(handle_stream)  # the client went away, or the stream ended: stop the model's work


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def _cancel_quietly(deltas) -> None:
    """Stop the model's work on a request that is no longer listened to. Cancelling a request the router
    refused (backpressure) raises that refusal again: it is already being answered, so it is dropped."""
    if deltas is None:
        return
    try:
        deltas.cancel()
    except Exception:  # noqa: BLE001
        pass
