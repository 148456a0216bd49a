"""Which raylens template a checkpoint's own Jinja chat template is: decided by rendering it, never guessed.

Why: a transformers-format checkpoint (the official InternVL2.5/InternVL3 `-hf` ones) has no `template` key;
its tokenizer (or processor) carries a Jinja `chat_template` instead, and that is the prompt its users get.
raylens renders prompts with its own templates (one tokenisation path for the engines and training), so it
must find the raylens template whose output is *identical* to the Jinja's for every kind of conversation:
the layout (roles, separators), the default system message (the `-hf` templates have none), images as
`<image>\\n` in front of the text. `template_from_jinja` renders probe conversations through both and returns
the matching `ChatTemplate`; when none matches exactly it raises `UnknownChatTemplate`, and the checkpoint is
refused with that reason rather than served with a prompt the model was not given.

Rendering follows transformers (`utils/chat_template_utils.py`): a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, the loop-controls extension, `raise_exception`, `add_generation_prompt`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from raylens.conversation import Conversation, Turn, render
from raylens.prompts import IMAGE_PLACEHOLDER, IMG_CONTEXT, TEMPLATES, ChatTemplate

# Files a tokenizer or processor keeps its chat template in, in the order transformers prefers them.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json", "chat_template.json", "processor_config.json")

# Probe conversations: (system, ((user, images, answer), ...)); the system "" probe is not sent as a message.
_PROBES = (
    (None, (("U1", 0, None),)),
    ("S0", (("U1", 0, None),)),
    (None, (("U1", 0, "A1"), ("U2", 0, None))),
    ("S0", (("U1", 1, "A1"), ("U2", 2, None))),
    (None, (("Look.", 1, None),)),
    (None, (("x", 0, "y"), ("z", 0, "w"), ("v", 3, None))),
)


class UnknownChatTemplate(ValueError):
    """The chat template is not one raylens can reproduce exactly."""


def read_chat_template(root: Path) -> tuple[str, str] | None:
    """(template source, file it came from) of the first chat template in `root`, or None."""
    for name in CHAT_TEMPLATE_FILES:
        path = root / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text(encoding="utf-8"), name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        value = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(value, str) and value.strip():
            return value, name
    return None


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UnknownChatTemplate(f"the chat template raised: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
    return env


def _messages(system: str | None, turns) -> list[dict]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, images, answer in turns:
        if images:
            content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": user}]
        else:
            content = user
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def _conversation(system: str | None, turns) -> Conversation:
    return Conversation(tuple(Turn(u, n, a) for u, n, a in turns), system=system)


def _default_system(template: ChatTemplate, rendered: str) -> str | None:
    """The system message a template's output for a system-less probe implies, or None if it has another layout."""
    if rendered.startswith(template.user_role):
        return ""
    prefix = template.system_template.split("{system_message}")[0]
    if not rendered.startswith(prefix):
        return None
    end = rendered.find(template.sep, len(prefix))
    return None if end == -1 else rendered[len(prefix):end]


def template_from_jinja(source: str) -> ChatTemplate:
    """The raylens ChatTemplate (a registered layout, with the Jinja's default system message) that renders
    exactly what `source` renders for every probe conversation; UnknownChatTemplate otherwise."""
    try:
        compiled = _environment().from_string(source)
    except Exception as exc:  # noqa: BLE001 - a template Jinja cannot parse
        raise UnknownChatTemplate(f"the chat template does not parse: {exc}") from None

    def jinja(system, turns) -> str:
        try:
            text = compiled.render(messages=_messages(system, turns), add_generation_prompt=True,
                                   bos_token="", eos_token="")
        except UnknownChatTemplate:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UnknownChatTemplate(f"the chat template fails on a plain conversation: {exc}") from None
        # transformers' InternVL processors expand either spelling of the image placeholder.
        return text.replace(IMG_CONTEXT, IMAGE_PLACEHOLDER)

    first = jinja(*_PROBES[0])
    seen = set()
    for template in TEMPLATES.values():
        layout = (template.system_template, template.user_role, template.assistant_role, template.sep)
        if layout in seen:
            continue
        seen.add(layout)
        system = _default_system(template, first)
        if system is None:
            continue
        candidate = dataclasses.replace(template, system_message=system)
        if all(jinja(s, t) == render(candidate, _conversation(s, t)) for s, t in _PROBES):
            return candidate
    raise UnknownChatTemplate(
        "its chat template renders conversations in a layout no raylens template reproduces exactly "
        f"(known: {sorted(TEMPLATES)}); a system-less one-turn prompt renders as {first!r}")
