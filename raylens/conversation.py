"""Whole conversations (several turns, several images, a system message) as one prompt string.

Why a type of its own: the batch job asks one question about one image, but the endpoint carries OpenAI
chats (history, several images, a system message) and fine-tuning trains on multi-turn LLaVA/InternVL
records. All three must render the same string for the same chat, and training must know which characters
of it are the answers it computes loss on, without re-implementing the template. `render` gives the string,
`render_spans` the same string cut into (text, is_answer) pieces.

Layout (InternVL's `conversation.py`, SeparatorStyle.MPT): the system turn, then per turn
`user_role + text + sep`, `assistant_role`, and `answer + sep` when the turn has an answer. Images stay
`<image>` placeholders here (`raylens.prompts.expand_image_placeholders` turns each into its tokens, in order).
A turn with images and no placeholder in its text gets `<image>\\n` per image in front of its text: the rule of
InternVL's `chat()` applied to each turn, which is also where lmdeploy puts the images of a later turn.
"""
from __future__ import annotations

from dataclasses import dataclass

from raylens.prompts import IMAGE_PLACEHOLDER, ChatTemplate


@dataclass(frozen=True)
class Turn:
    """One user message, the images attached to it (in order), and the answer (None: to be generated)."""

    user: str
    num_images: int = 0
    assistant: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.user, str):
            raise TypeError(f"Turn.user must be a str, got {type(self.user).__name__}")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 0:
            raise ValueError(f"Turn.num_images must be an int >= 0, got {self.num_images!r}")
        if self.assistant is not None and not isinstance(self.assistant, str):
            raise TypeError(f"Turn.assistant must be a str or None, got {type(self.assistant).__name__}")
        placed = self.user.count(IMAGE_PLACEHOLDER)
        if placed and placed != self.num_images:
            raise ValueError(f"a turn's text holds {placed} {IMAGE_PLACEHOLDER} placeholders but "
                             f"{self.num_images} images are attached to it")

    def user_text(self) -> str:
        """The user text with its image placeholders: where the user put them, else in front."""
        if self.num_images and IMAGE_PLACEHOLDER not in self.user:
            return (IMAGE_PLACEHOLDER + "\n") * self.num_images + self.user
        return self.user


@dataclass(frozen=True)
class Conversation:
    """A chat: at least one turn, only the last may be unanswered; `system` None means the checkpoint's
    system message, "" no system turn at all."""

    turns: tuple[Turn, ...]
    system: str | None = None

    def __post_init__(self) -> None:
        turns = tuple(self.turns) if isinstance(self.turns, (list, tuple)) else self.turns
        if not isinstance(turns, tuple) or not turns:
            raise ValueError("a Conversation needs at least one turn")
        if not all(isinstance(t, Turn) for t in turns):
            raise TypeError("Conversation.turns must hold Turn objects")
        unanswered = [i for i, t in enumerate(turns[:-1]) if t.assistant is None]
        if unanswered:
            raise ValueError(f"only the last turn may be unanswered; turn {unanswered[0]} has no assistant text")
        if self.system is not None and not isinstance(self.system, str):
            raise TypeError(f"Conversation.system must be a str or None, got {type(self.system).__name__}")
        object.__setattr__(self, "turns", turns)

    @classmethod
    def single(cls, question: str, num_images: int = 0, *, system: str | None = None) -> "Conversation":
        """One question (about `num_images` images), to be answered."""
        return cls((Turn(question, num_images),), system=system)

    @property
    def num_images(self) -> int:
        return sum(t.num_images for t in self.turns)

    @property
    def answered(self) -> bool:
        """True when the last turn has its answer (a training record), False when one is to be generated."""
        return self.turns[-1].assistant is not None


def render_spans(template: ChatTemplate, conversation: Conversation, *, system_message: str | None = None
                 ) -> list[tuple[str, bool]]:
    """`render`'s string as consecutive (text, is_answer) pieces; is_answer marks each answer plus the
    `end_of_turn` that closes it, the tokens fine-tuning computes loss on (InternVL's training masks the
    rest, including the newline the `internvl2_5` template puts after `<|im_end|>`).

    `system_message` is the default (the checkpoint's) when the conversation's own `system` is None;
    None here too means the template's.
    """
    system = conversation.system if conversation.system is not None else system_message
    pieces: list[tuple[str, bool]] = [(template.system(system), False)]
    layout_after_answer = template.sep[len(template.end_of_turn):]
    for turn in conversation.turns:
        pieces.append((template.user_role + turn.user_text() + template.sep + template.assistant_role, False))
        if turn.assistant is not None:
            pieces.append((turn.assistant + template.end_of_turn, True))
            pieces.append((layout_after_answer, False))
    merged: list[tuple[str, bool]] = []
    for text, is_answer in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == is_answer:
            merged[-1] = (merged[-1][0] + text, is_answer)
        else:
            merged.append((text, is_answer))
    return merged


def render(template: ChatTemplate, conversation: Conversation, *, system_message: str | None = None) -> str:
    """The prompt string with one `<image>` placeholder per image, ending with the assistant role when the
    last turn is unanswered (generation continues from there)."""
    return "".join(text for text, _ in render_spans(template, conversation, system_message=system_message))
