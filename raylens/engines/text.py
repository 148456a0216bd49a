"""From generated text to what a caller sees: stop strings cut, ends stripped, and, while streaming, nothing
shown that might still change.

Why one helper for both engines and both paths: `stream` must yield deltas that concatenate to exactly
the text `generate` returns. Both paths therefore feed the text decoded so far into one `AnswerText`,
and `generate` keeps only its `final` text. While streaming it holds back what the next token may still
change or remove:
* a trailing U+FFFD: the start of a UTF-8 character whose other bytes are in the next token;
* a tail that begins a stop string (`"###"` may be the start of a stop string `"####"`);
* trailing whitespace, because the final answer is stripped (as InternVL's `chat()` strips it).
"""
from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger(__name__)
_REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i != -1), default=-1)
    return (text, False) if cut == -1 else (text[:cut], True)


def _stop_prefix_start(text: str, stop: Sequence[str]) -> int:
    """Index where the longest tail of `text` that begins some stop string starts (len(text) if none)."""
    for start in range(max(0, len(text) - max((len(s) for s in stop), default=0) + 1), len(text)):
        tail = text[start:]
        if any(s.startswith(tail) for s in stop):
            return start
    return len(text)


class AnswerText:
    """The visible answer of one request, fed with the whole text decoded so far at each step."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(stop)
        self.emitted = ""
        self.stopped = False  # a stop string was seen: generation should end

    def final(self, text: str) -> str:
        """The answer `generate` returns for the complete decoded `text`."""
        return cut_at_stop(text, self.stop)[0].strip()

    def update(self, text: str) -> str:
        """New visible text since the last call, for the text decoded so far; sets `stopped`."""
        cut, self.stopped = cut_at_stop(text, self.stop)
        if self.stopped:
            return self._advance(cut.strip())
        visible = cut.rstrip(_REPLACEMENT)
        visible = visible[: _stop_prefix_start(visible, self.stop)]
        return self._advance(visible.strip())

    def finish(self, text: str) -> str:
        """The rest of the answer once `text` is complete (held-back text included)."""
        return self._advance(self.final(text))

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.emitted):
            # Decoding more tokens changed text already shown (a tokenizer whose decode is not prefix-stable).
            # What was sent cannot be taken back: send only what lies beyond it.
            logger.warning("streamed text diverged from the decoded text; the stream may differ from generate()")
        delta = visible[len(self.emitted):]
        self.emitted += delta
        return delta
