"""Config classes written into every original-format (`internvl_chat`) checkpoint directory.

Why they exist: lmdeploy loads an InternVL2 hub checkpoint with `AutoConfig.from_pretrained(dir,
trust_remote_code=True)` and then reads `config.llm_config.hidden_size` and friends, so `llm_config` has to
come back as a real config object, which only the checkpoint's own `configuration_*.py` can arrange
(notes/lmdeploy.md 1.1). These are our own minimal classes, written for transformers 5.x; no modeling code is
shipped because neither lmdeploy nor raylens runs it.

The files are copied verbatim (see `REMOTE_CODE_FILES`), so they may import only transformers and each other
(relative imports, which transformers' dynamic-module loader copies along).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

REMOTE_CODE_FILES = (
    "configuration_internvl_chat.py",
    "configuration_intern_vit.py",
    "configuration_internlm2.py",
)
AUTO_CONFIG_CLASS = "configuration_internvl_chat.InternVLChatConfig"
INTERNLM2_AUTO_CONFIG_CLASS = "configuration_internlm2.InternLM2Config"


def copy_remote_code(out_dir: str | Path) -> list[Path]:
    """Copy the config modules into `out_dir`; returns the written paths."""
    out = Path(out_dir)
    written = []
    package = resources.files(__name__)
    for name in REMOTE_CODE_FILES:
        target = out / name
        target.write_bytes(package.joinpath(name).read_bytes())
        written.append(target)
    return written
