"""`KindError`: the one shape of a row-level failure (a category plus a readable message).

Why a shared base: image, fetch and source errors are all data about one row. Each needs a `kind` from a
fixed set (for the `errors_by_kind` counts and `Type(kind): message` rows) and must pickle with that
kind intact, since Ray carries exceptions between processes and a default exception pickle drops it.
"""
from __future__ import annotations

from typing import ClassVar


class KindError(ValueError):
    """Subclasses set `KINDS`; constructing one with another kind is a programming error."""

    KINDS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, kind: str, message: str):
        if kind not in self.KINDS:
            raise ValueError(f"{type(self).__name__} kind must be one of {sorted(self.KINDS)}, got {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self):
        return (type(self), (self.kind, self.message))
