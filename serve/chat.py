"""From an OpenAI chat request to what the engine takes: a `Conversation`, the images to load, `SamplingParams`.

Pure functions (no Ray, no network), so every rule is tested without a server. Each refusal is an
`ApiError` naming the field at fault in OpenAI's `param` form (`messages[2].content[0].image_url.url`).

Conversation rules, the ones InternVL2 was trained with (and the batch job uses, so one image and one
prompt give the job's exact prompt): leading system (or developer) messages are the system turn; after
them user and assistant messages alternate, starting and ending with a user message (consecutive messages
of one role are joined with a newline). The images of a user message go in front of its text, one
`<image>\\n` each, unless the text places them itself with as many `<image>` placeholders. Text may not
contain the template's control tokens (`<|im_start|>`, `<IMG_CONTEXT>`, ...): they would let a client
forge turns or break the image accounting, so they are refused rather than silently tokenised.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pydantic import ValidationError

from raylens.conversation import Conversation, Turn
from raylens.engines.base import SamplingParams
from raylens.prompts import IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START, ChatTemplate
from serve.config import ServeConfig
from serve.errors import ApiError, bad_request
from serve.protocol import ChatCompletionRequest, ChatMessage, ImagePart, TextPart

MAX_STOP_STRINGS = 4
MAX_SEED = 2**63 - 1
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{1,32}\|>")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "tagged-union"}


@dataclass(frozen=True)
class ImageRef:
    """One image to load: its URL, where it sits in the request, and the tiles it may use."""

    url: str
    param: str
    max_tiles: int | None


@dataclass(frozen=True)
class ChatPlan:
    """Everything a validated request asks for, ready for image loading and the engine."""

    conversation: Conversation
    images: tuple[ImageRef, ...]
    params: SamplingParams
    max_tiles: int | None
    stream: bool
    include_usage: bool


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request model of a raw body; 400 for bad JSON or a field of the wrong type."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        # With unions (content: str | list of parts) the deepest error is the one that says what is wrong.
        first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
        param = validation_param(first.get("loc", ()))
        raise bad_request(f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param,
                          code="invalid_type") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None


def validation_param(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI's `param`: union branch names dropped, indices in brackets."""
    out = ""
    previous = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str):
            if "[" in item or item.split("[")[0] in _TYPE_NAMES or item == previous:
                previous = item
                continue
            out += f".{item}" if out else item
        previous = item
    return out or None


def plan_chat(req: ChatCompletionRequest, config: ServeConfig, template: ChatTemplate, model_name: str) -> ChatPlan:
    """Validate a parsed request against the server's limits and turn it into a `ChatPlan`."""
    if req.model is not None and req.model != model_name:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    max_tiles = _max_tiles(req, config)
    conversation, images = to_conversation(req.messages, config, template, max_tiles)
    params = sampling_params(req, config)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatPlan(conversation, images, params, max_tiles, bool(req.stream), include_usage)


def _max_tiles(req: ChatCompletionRequest, config: ServeConfig) -> int | None:
    if req.max_tiles is None:
        return config.max_tiles
    limit = config.max_tiles
    if req.max_tiles < 1 or (limit is not None and req.max_tiles > limit):
        raise bad_request(f"max_tiles must be between 1 and {limit or 'the model limit'}, got {req.max_tiles}",
                          param="max_tiles")
    return req.max_tiles


def to_conversation(messages: list[ChatMessage], config: ServeConfig, template: ChatTemplate,
                    max_tiles: int | None) -> tuple[Conversation, tuple[ImageRef, ...]]:
    """The messages as one Conversation plus its images in placeholder order (see the module docstring)."""
    if not messages:
        raise bad_request("messages must hold at least one message", param="messages", code="empty_messages")
    if len(messages) > config.max_messages:
        raise bad_request(f"at most {config.max_messages} messages per request, got {len(messages)}", param="messages")
    reserved = reserved_markers(template)
    system_parts: list[str] = []
    turns: list[dict] = []  # {"role", "texts", "images"}
    images: list[ImageRef] = []
    total_chars = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        texts, refs = _content(message, where, max_tiles)
        for text, param in texts:
            total_chars += len(text)
            _check_text(text, param, reserved)
        if total_chars > config.max_text_chars:
            raise bad_request(f"the messages hold more than {config.max_text_chars} characters of text", param=where)
        role = "system" if message.role == "developer" else message.role
        if role == "system":
            if turns:
                raise bad_request("system messages must come before the conversation's first user message",
                                  param=f"{where}.role")
            if refs:
                raise bad_request("a system message cannot hold images", param=refs[0].param)
            system_parts.extend(t for t, _ in texts)
            continue
        if role == "assistant" and refs:
            raise bad_request("an assistant message cannot hold images", param=refs[0].param)
        if role == "assistant" and not turns:
            raise bad_request("the conversation must start with a user message", param=f"{where}.role")
        if role == "user" and not texts and not refs:
            raise bad_request("a user message needs text or an image", param=f"{where}.content", code="empty_message")
        if role == "assistant" and not texts:
            raise bad_request("an assistant message needs text content", param=f"{where}.content")
        if turns and turns[-1]["role"] == role:
            turns[-1]["texts"].extend(t for t, _ in texts)
            turns[-1]["images"] += len(refs)
        else:
            turns.append({"role": role, "texts": [t for t, _ in texts], "images": len(refs), "where": where})
        images.extend(refs)
        if len(images) > config.max_images:
            raise bad_request(f"at most {config.max_images} images per request", param=refs[-1].param,
                              code="too_many_images")
    if not turns or turns[-1]["role"] != "user":
        raise bad_request("the last message must be a user message", param="messages")
    return Conversation(_pair_turns(turns), system="\n".join(system_parts) if system_parts else None), tuple(images)


def _pair_turns(turns: list[dict]) -> tuple[Turn, ...]:
    out: list[Turn] = []
    for k in range(0, len(turns), 2):
        user = turns[k]
        text = "\n".join(user["texts"])
        placed = text.count(IMAGE_PLACEHOLDER)
        if placed and placed != user["images"]:
            raise bad_request(f"the text places {placed} {IMAGE_PLACEHOLDER} placeholders but the message has "
                              f"{user['images']} images", param=f"{user['where']}.content")
        answer = "\n".join(turns[k + 1]["texts"]) if k + 1 < len(turns) else None
        out.append(Turn(text, user["images"], answer))
    return tuple(out)


def _content(message: ChatMessage, where: str, max_tiles: int | None) -> tuple[list[tuple[str, str]], list[ImageRef]]:
    """(texts with their params, images) of one message, in order."""
    content = message.content
    if content is None:
        return [], []
    if isinstance(content, str):
        return ([(content, f"{where}.content")] if content else []), []
    texts, refs = [], []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        if isinstance(part, TextPart):
            if part.text:
                texts.append((part.text, f"{param}.text"))
        elif isinstance(part, ImagePart):
            tiles = 1 if part.image_url.detail == "low" else max_tiles
            refs.append(ImageRef(part.image_url.url, f"{param}.image_url.url", tiles))
    return texts, refs


def reserved_markers(template: ChatTemplate) -> tuple[str, ...]:
    """The control strings of the template and of InternVL's image block, which client text may not hold."""
    text = "".join([template.system_template, template.user_role, template.assistant_role, template.sep, *template.stop_words])
    return tuple(dict.fromkeys([IMG_START, IMG_END, IMG_CONTEXT, *_CONTROL_TOKEN.findall(text)]))


def _check_text(text: str, param: str, reserved: tuple[str, ...]) -> None:
    for marker in reserved:
        if marker in text:
            raise bad_request(f"text may not contain the model's control token {marker!r}", param=param,
                              code="control_token")
    if "\x00" in text:
        raise bad_request("text may not contain NUL characters", param=param)


def sampling_params(req: ChatCompletionRequest, config: ServeConfig) -> SamplingParams:
    """The engine's SamplingParams; 400 for values out of range and features raylens does not offer."""
    unsupported = [
        ("n", req.n not in (None, 1), "only n=1 is supported"),
        ("logprobs", bool(req.logprobs), "logprobs are not supported"),
        ("top_logprobs", req.top_logprobs not in (None, 0), "logprobs are not supported"),
        ("frequency_penalty", req.frequency_penalty not in (None, 0), "frequency_penalty is not supported"),
        ("presence_penalty", req.presence_penalty not in (None, 0), "presence_penalty is not supported"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
        ("tools", bool(req.tools), "tools are not supported"),
        ("tool_choice", req.tool_choice not in (None, "none", "auto"), "tools are not supported"),
        ("response_format", req.response_format is not None and req.response_format.get("type") != "text",
         "only response_format {\"type\": \"text\"} is supported"),
    ]
    for param, refused, message in unsupported:
        if refused:
            raise bad_request(message, param=param, code="unsupported_parameter")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    elif not 1 <= max_tokens <= config.max_tokens_limit:
        raise bad_request(f"{param} must be between 1 and {config.max_tokens_limit}, got {max_tokens}", param=param)
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p must be greater than 0 and at most 1, got {top_p}", param="top_p")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise bad_request(f"seed must be between 0 and {MAX_SEED}, got {req.seed}", param="seed")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS or not all(stop):
        raise bad_request(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=req.seed, stop=stop,
                          ignore_eos=bool(req.ignore_eos))
