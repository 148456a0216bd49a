"""InternVL chat templates and `<image>` expansion, as pure string functions.

Why our own: lmdeploy 0.18 dropped its InternVL templates and picks one from the tokenizer or the path
(notes/lmdeploy.md 2.1), and the transformers-native processor needs torchvision. The layout here is the one
InternVL's `conversation.py` builds (MPT separator style: `role + message + sep` per turn), so the
transformers engine, the lmdeploy engine (through `lmdeploy_chat_template`) and fine-tuning all see the same
string. Whole conversations (several turns and images) are rendered by `raylens.conversation`;
`build_prompt` is its one-question shorthand.

This module knows nothing about tokenizers, tiles or pixels: callers pass the number of image tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

INTERNVL_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
# InternVL2.5 and InternVL3 (the `internvl2_5` template of their conversation.py).
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
DEFAULT_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


@dataclass(frozen=True)
class ChatTemplate:
    """One InternVL conversation template (`conversation.py`, SeparatorStyle.MPT).

    `sep` closes every turn (system, user, assistant). `stop_words` are the tokens generation stops at:
    the one source of stop tokens for every engine. An empty `system_message` means no system turn at all
    (the official transformers `-hf` chat templates have none by default).
    """

    name: str
    system_template: str
    system_message: str
    user_role: str
    assistant_role: str
    sep: str
    stop_words: tuple[str, ...]

    def system(self, system_message: str | None = None) -> str:
        """The system turn for `system_message` (None: the template's own); "" when the message is ""."""
        message = self.system_message if system_message is None else system_message
        if not message:
            return ""
        return self.system_template.format(system_message=message) + self.sep

    @property
    def end_of_turn(self) -> str:
        """The part of `sep` the model generates to end its answer (`<|im_end|>` of `<|im_end|>\\n`):
        what training computes loss on after an answer; the rest of `sep` is layout."""
        return self.sep.rstrip()


_CHATML = dict(
    system_template="<|im_start|>system\n{system_message}",
    system_message=INTERNVL_SYSTEM_MESSAGE,
    user_role="<|im_start|>user\n",
    assistant_role="<|im_start|>assistant\n",
    sep="<|im_end|>",
)

TEMPLATES: dict[str, ChatTemplate] = {
    # InternVL2-1B (Qwen2). Equivalent to internlm2-chat at inference; Hermes-2 also stops on <|endoftext|>.
    "Hermes-2": ChatTemplate(name="Hermes-2", stop_words=("<|im_end|>", "<|endoftext|>"), **_CHATML),
    # InternVL2-2B / -8B / -26B (InternLM2).
    "internlm2-chat": ChatTemplate(name="internlm2-chat", stop_words=("<|im_end|>",), **_CHATML),
    # InternVL2.5 / InternVL3 (Qwen2.5, InternLM2.5 and Qwen2 LLMs): ChatML with a newline after each turn.
    "internvl2_5": ChatTemplate(
        name="internvl2_5",
        system_template="<|im_start|>system\n{system_message}",
        system_message=INTERNVL2_5_SYSTEM_MESSAGE,
        user_role="<|im_start|>user\n",
        assistant_role="<|im_start|>assistant\n",
        sep="<|im_end|>\n",
        stop_words=("<|im_end|>",),
    ),
    # InternVL2-4B (Phi-3).
    "phi3-chat": ChatTemplate(
        name="phi3-chat",
        system_template="<|system|>\n{system_message}",
        system_message=INTERNVL_SYSTEM_MESSAGE,
        user_role="<|user|>\n",
        assistant_role="<|assistant|>\n",
        sep="<|end|>",
        stop_words=("<|end|>",),
    ),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None


def build_prompt(
    template: ChatTemplate,
    question: str,
    *,
    num_images: int = 1,
    history: Sequence[tuple[str, str]] = (),
    answer: str | None = None,
    system_message: str | None = None,
) -> str:
    """The conversation string of one question (after `history`), with `<image>` placeholders still in it.

    The shorthand of `raylens.conversation.render`. As InternVL's `chat`: with images and no placeholder
    anywhere, `<image>\\n` per image is prepended to the first user turn; otherwise the placeholders stay
    where they are (and `num_images` is not used: each one is an image). `history` holds earlier (question, answer) turns;
    `answer`, when given, closes the last turn (training targets), otherwise the string ends with the
    assistant role so the model continues from there.

    >>> t = get_template("internlm2-chat")
    >>> build_prompt(t, "Describe.").endswith("<|im_start|>user\\n<image>\\nDescribe.<|im_end|><|im_start|>assistant\\n")
    True
    """
    from raylens.conversation import Conversation, Turn, render  # conversation.py builds on this module

    pairs = [*history, (question, answer)]
    placed = [q.count(IMAGE_PLACEHOLDER) for q, _ in pairs]
    if sum(placed) == 0:
        placed[0] = num_images
    turns = tuple(Turn(q, n, a) for (q, a), n in zip(pairs, placed))
    return render(template, Conversation(turns), system_message=system_message)


def image_block(num_image_tokens: int) -> str:
    """`<img>` + `<IMG_CONTEXT>` x n + `</img>`: what one image becomes in the token stream."""
    if num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    return IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END


def expand_image_placeholders(prompt: str, image_tokens: Sequence[int]) -> str:
    """Replace each `<image>` in order with its image block; the counts must match the placeholders."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != len(image_tokens):
        raise ValueError(f"prompt has {count} {IMAGE_PLACEHOLDER} placeholders but {len(image_tokens)} images were given")
    for n in image_tokens:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, image_block(n), 1)
    return prompt


def split_answer(text: str, template: ChatTemplate) -> str:
    """Cut generated text at the first stop word and strip it (generation may run past the stop token)."""
    cut = len(text)
    for stop in template.stop_words:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()
