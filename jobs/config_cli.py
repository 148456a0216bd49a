"""The command line of a job's typed config: one flag per dataclass field, its help text in the field.

Why one module: `jobs.caption` and `jobs.finetune` each have one config dataclass that the CLI, the Ray job
and the tests share, and both turn it into flags the same way (`--max-tiles` for `max_tiles`, booleans as
switches, "(default: ...)" in the help). Kept free of heavy imports so `--help` is instant.
"""
from __future__ import annotations

import argparse
from dataclasses import field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_field(default: Any, help: str, **argparse_kwargs: Any):
    """A config field whose flag has `help`; `argparse_kwargs` go to `add_argument` (choices, action, nargs,
    required), except `shown_default`: what the help shows as the default when the field's own default
    (None for an `append` flag) does not say it."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def config_parser(cls: type, prog: str, description: str | None = None,
                  epilog: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of the dataclass `cls`. A boolean defaulting to True gets a `--no-...` twin."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        shown = meta.pop("shown_default", f.default)
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction if f.default else "store_true",
                           default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        default_note = "" if shown is None or meta.get("required") else f" (default: {shown})"
        p.add_argument(flag, type=kind, default=f.default, help=help_text + default_note, **meta)
    return p


def parse_config(cls: type[T], argv: list[str] | None = None, **parser_kwargs: Any) -> T:
    """`cls` from the command line; a value its own checks refuse exits 2 with the usage line, like any
    other bad flag."""
    parser = cls.parser(**parser_kwargs)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))
