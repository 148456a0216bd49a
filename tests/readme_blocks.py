"""The README's marked command blocks (`<!-- name -->` before a ```bash block), for tests that keep them true."""
from __future__ import annotations

import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(marker: str) -> list[list[str]]:
    """The commands of the code block after `<!-- marker -->`, split into words (comments dropped)."""
    text = README.read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
