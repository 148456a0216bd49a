"""What a checkpoint directory is: its format, chat template and tiling numbers, read from JSON only.

Two formats (docs/design.md):
* `internvl_chat` (FORMAT_ORIGINAL): the InternVL hub layout (InternVL2, InternVL2.5, InternVL3),
  `architectures: ["InternVLChatModel"]`, with `template`, `force_image_size`, `max_dynamic_patch`, ... at the
  top of config.json, and optionally `system_message` (which InternVL's `chat()` prefers to the template's);
* `internvl_hf` (FORMAT_HF): transformers-native `InternVLForConditionalGeneration` (`model_type: "internvl"`),
  e.g. the official InternVL2.5/InternVL3 `-hf` checkpoints. config.json has no template or tiling keys:
  the tiling comes from the image processor config (`min_patches`/`max_patches`; transformers' InternVL
  processor always crops to patches and adds a thumbnail), the prompt format from the tokenizer's (or
  processor's) Jinja `chat_template`, matched exactly to a raylens template (`chat_templates.py`). raylens'
  own `raylens.json` sidecar (`{"template", "max_tiles", "min_tiles", "use_thumbnail", "system_message"}`)
  overrides both. A checkpoint with neither is refused: the prompt format is never guessed.

Checkpoints raylens cannot serve correctly (an LLM it has no conversion for, another pixel-shuffle or vision
layer than InternVL2/2.5/3 use) are refused here with the reason, before any engine starts.

Reading a spec never imports a model, a tokenizer or the checkpoint's remote code, so CPU-only Ray tasks
(image tiling) and the lmdeploy engine can call it cheaply.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylens.checkpoints.chat_templates import UnknownChatTemplate, read_chat_template, template_from_jinja
from raylens.prompts import TEMPLATES, ChatTemplate

if TYPE_CHECKING:
    from raylens.images import TilingSpec

FORMAT_ORIGINAL = "internvl_chat"
FORMAT_HF = "internvl_hf"
SIDECAR_FILE = "raylens.json"

# InternVL's published tiling (config.json of every size; GotOcr2's processor defaults): 1..12 tiles of
# 448 px plus a thumbnail.
DEFAULT_MIN_TILES = 1
DEFAULT_MAX_TILES = 12
DEFAULT_USE_THUMBNAIL = True

# LLMs raylens converts for the transformers engine and lmdeploy runs (InternLM2 and InternLM2.5 share one
# architecture; Qwen2 covers Qwen2.5). InternVL3-9B's InternLM3 is not among them.
SUPPORTED_LLMS = ("Qwen2ForCausalLM", "InternLM2ForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM")
# transformers text model_type -> causal-LM class, for HF configs whose text_config lacks `architectures`.
ARCHITECTURE_BY_MODEL_TYPE = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or a key, or holds values raylens cannot use."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the CPU side (tiling, prompts) and the engines need to know about a checkpoint, and the
    settings derived from it (`tiling`, `chat_template`, `system_message`): the one place they are made."""

    path: str
    format: str  # FORMAT_ORIGINAL | FORMAT_HF
    template: str  # a raylens.prompts.TEMPLATES name, e.g. "Hermes-2", "internlm2-chat", "internvl2_5"
    tile_size: int
    patch_size: int
    downsample_ratio: float
    image_tokens_per_tile: int  # (tile_size // patch_size) ** 2 * downsample_ratio ** 2
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    llm_architecture: str  # e.g. "Qwen2ForCausalLM", "InternLM2ForCausalLM", "LlamaForCausalLM"
    torch_dtype: str  # e.g. "bfloat16"
    eos_token: str  # the template's end-of-turn token, e.g. "<|im_end|>"
    # The LLM's KV cache per token (all layers, K and V) and its context length, for sizing an engine's
    # cache (raylens.engines.kv_cache); None where the config does not say.
    kv_bytes_per_token: int | None = None
    max_position_embeddings: int | None = None
    # config.json's own `system_message` (InternVL's chat() prefers it to the template's), if any.
    config_system_message: str | None = None
    # The template when it is not one of TEMPLATES as registered (e.g. read from a tokenizer's chat_template).
    template_def: ChatTemplate | None = None

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "ModelSpec":
        """The spec of a checkpoint directory of either format (JSON only; no remote code runs)."""
        return read_model_spec(model_dir)

    def tiling(self, max_tiles: int | None = None) -> "TilingSpec":
        """The checkpoint's tile size, min tiles and thumbnail, with `max_tiles` (when given) in place of its
        `max_dynamic_patch`. ValueError when max_tiles is below the checkpoint's min tiles."""
        from raylens.images import TilingSpec

        if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int)):
            raise ValueError(f"max_tiles must be an int, got {max_tiles!r}")
        if max_tiles is not None and max_tiles < self.min_tiles:
            raise ValueError(f"max_tiles {max_tiles} is below this checkpoint's min_dynamic_patch ({self.min_tiles})")
        return TilingSpec(tile_size=self.tile_size, min_tiles=self.min_tiles,
                          max_tiles=self.max_tiles if max_tiles is None else max_tiles,
                          use_thumbnail=self.use_thumbnail)

    def image_tokens(self, num_tiles: int) -> int:
        """Tokens an image of `num_tiles` tiles (thumbnail included) costs in the prompt."""
        return num_tiles * self.image_tokens_per_tile

    def chat_template(self) -> ChatTemplate:
        """The checkpoint's ChatTemplate: its roles, separators and stop words (the one source of stop tokens)."""
        return self.template_def if self.template_def is not None else TEMPLATES[self.template]

    @property
    def system_message(self) -> str:
        """config.json's `system_message` when it has one, else the template's ("" means no system turn)."""
        if self.config_system_message is not None:
            return self.config_system_message
        return self.chat_template().system_message

    @property
    def max_context(self) -> int | None:
        """The LLM's context length in tokens (prompt + answer), or None where the config does not say."""
        return self.max_position_embeddings


def image_tokens_per_tile(tile_size: int, patch_size: int, downsample_ratio: float) -> int:
    """Image tokens one tile becomes after the ViT and the pixel shuffle (256 for 448 / 14 / 0.5)."""
    return int((tile_size // patch_size) ** 2 * downsample_ratio**2)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found (is {path.parent} a checkpoint directory?)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def detect_format(config: dict[str, Any]) -> str:
    """FORMAT_ORIGINAL or FORMAT_HF from a parsed config.json; CheckpointError for anything else."""
    architectures = config.get("architectures") or []
    if config.get("model_type") == "internvl_chat" or "InternVLChatModel" in architectures:
        return FORMAT_ORIGINAL
    if config.get("model_type") == "internvl":
        return FORMAT_HF
    raise CheckpointError(
        f"config.json describes model_type {config.get('model_type')!r} / architectures {architectures}; "
        "raylens reads InternVL2 checkpoints (model_type 'internvl_chat') and transformers InternVL ('internvl')"
    )


def read_model_spec(model_dir: str | os.PathLike) -> ModelSpec:
    """The ModelSpec of a checkpoint directory of either format (JSON only; no remote code runs).
    `ModelSpec.from_dir` is the same function."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    config_path = root / "config.json"
    config = read_json(config_path)
    fmt = detect_format(config)
    if fmt == FORMAT_ORIGINAL:
        return _original_spec(root, config)
    return _hf_spec(root, config)


def _require(mapping: dict[str, Any], key: str, where: str) -> Any:
    if key not in mapping or mapping[key] is None:
        raise CheckpointError(f"{where} has no {key!r}")
    return mapping[key]


def _as_int(value: Any, what: str) -> int:
    """image_size/patch_size may be an int or a [h, w] pair (transformers writes pairs); tiles are square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{what} must be square, got {list(value)}")
        value = value[0]
    return int(value)


def _eos_token(template: str, where: str) -> str:
    if template not in TEMPLATES:
        raise CheckpointError(f"{where}: unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template].end_of_turn


def _system_message(config: dict[str, Any], where: str) -> str | None:
    value = config.get("system_message")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{where}: system_message must be a string, got {type(value).__name__}")
    return value


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _llm_cache_shape(llm: dict[str, Any], dtype: str) -> dict[str, int | None]:
    """KV bytes per token and context length from an LLM config (Qwen2, InternLM2 and Llama keys)."""
    try:
        layers = int(llm["num_hidden_layers"])
        heads = int(llm["num_attention_heads"])
        kv_heads = int(llm.get("num_key_value_heads") or heads)
        head_dim = int(llm.get("head_dim") or int(llm["hidden_size"]) // heads)
        kv_bytes = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 2)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        kv_bytes = None
    context = llm.get("max_position_embeddings")
    return {"kv_bytes_per_token": kv_bytes, "max_position_embeddings": int(context) if context else None}


def _original_spec(root: Path, config: dict[str, Any]) -> ModelSpec:
    where = f"{root / 'config.json'}"
    vision = _require(config, "vision_config", where)
    llm = _require(config, "llm_config", where)
    llm_architecture = (_require(llm, "architectures", f"{where} llm_config") or [None])[0]
    _check_servable(config, llm_architecture, where)
    template = config.get("template")
    if template is None:
        raise CheckpointError(f"{where} has no 'template': raylens does not guess a checkpoint's prompt format "
                              f"(add \"template\": one of {sorted(TEMPLATES)})")
    tile_size = _as_int(config.get("force_image_size") or _require(vision, "image_size", f"{where} vision_config"),
                        "force_image_size")
    patch_size = _as_int(_require(vision, "patch_size", f"{where} vision_config"), "patch_size")
    ratio = float(config.get("downsample_ratio", 0.5))
    if config.get("dynamic_image_size", False):
        min_tiles = int(config.get("min_dynamic_patch", 1))
        max_tiles = int(config.get("max_dynamic_patch", 6))
    else:  # InternVL without dynamic resolution: one tile, no thumbnail.
        min_tiles = max_tiles = 1
    dtype = config.get("torch_dtype") or config.get("dtype") or llm.get("torch_dtype") or "bfloat16"
    return ModelSpec(
        path=str(root),
        format=FORMAT_ORIGINAL,
        template=template,
        tile_size=tile_size,
        patch_size=patch_size,
        downsample_ratio=ratio,
        image_tokens_per_tile=image_tokens_per_tile(tile_size, patch_size, ratio),
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        use_thumbnail=bool(config.get("use_thumbnail", False)),
        llm_architecture=llm_architecture,
        torch_dtype=str(dtype),
        eos_token=_eos_token(template, where),
        config_system_message=_system_message(config, where),
        **_llm_cache_shape(llm, str(dtype)),
    )


def _check_servable(config: dict[str, Any], llm_architecture: str | None, where: str) -> None:
    """CheckpointError for an InternVL variant raylens would run wrongly (issue 11: refuse, never guess)."""
    if llm_architecture not in SUPPORTED_LLMS:
        raise CheckpointError(f"{where}: its LLM is {llm_architecture!r}, which raylens cannot run "
                              f"(supported: {', '.join(SUPPORTED_LLMS)})")
    if config.get("ps_version", "v2") != "v2":
        raise CheckpointError(f"{where}: ps_version {config.get('ps_version')!r}; raylens runs InternVL's 'v2' "
                              "pixel shuffle only (InternVL2, 2.5 and 3 use it)")
    if config.get("select_layer", -1) != -1:
        raise CheckpointError(f"{where}: select_layer {config.get('select_layer')}; raylens (and lmdeploy) use "
                              "the vision encoder's last layer only")
    if float(config.get("downsample_ratio", 0.5)) != 0.5:
        raise CheckpointError(f"{where}: downsample_ratio {config.get('downsample_ratio')}; lmdeploy assumes 0.5 "
                              "(a quarter of the patches per tile), as InternVL2, 2.5 and 3 use")


def _processor_tiling(root: Path) -> dict[str, Any]:
    """min/max tiles from a transformers image processor config (GotOcr2 keys), if any. `crop_to_patches`
    is not read: InternVLProcessor always passes crop_to_patches=True (its `_defaults`), with a thumbnail."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = root / name
        if path.is_file():
            data = read_json(path)
            data = data.get(key, {}) if key else data
            found = {}
            if "min_patches" in data:
                found["min_tiles"] = int(data["min_patches"])
            if "max_patches" in data:
                found["max_tiles"] = int(data["max_patches"])
            return found
    return {}


def _hf_template(root: Path, sidecar: dict[str, Any]) -> tuple[str, ChatTemplate | None]:
    """(template name, its definition when it is not the registered one) of a transformers-format checkpoint:
    the sidecar's, else the one its own chat template renders exactly; CheckpointError otherwise."""
    if "template" in sidecar:
        return sidecar["template"], None
    found = read_chat_template(root)
    if found is None:
        raise CheckpointError(
            f"{root} is a transformers-format checkpoint with no chat template (chat_template.jinja, "
            f"tokenizer_config.json, chat_template.json) and no {SIDECAR_FILE}: raylens does not guess a prompt "
            f"format; add {SIDECAR_FILE} with {{\"template\": one of {sorted(TEMPLATES)}}}")
    source, name = found
    try:
        chat = template_from_jinja(source)
    except UnknownChatTemplate as exc:
        raise CheckpointError(f"{root / name}: {exc}. raylens will not serve it with a guessed template; if one of "
                              f"{sorted(TEMPLATES)} is right, say so in {SIDECAR_FILE}") from None
    return chat.name, (None if chat == TEMPLATES[chat.name] else chat)


def _hf_spec(root: Path, config: dict[str, Any]) -> ModelSpec:
    where = f"{root / 'config.json'}"
    vision = _require(config, "vision_config", where)
    text = _require(config, "text_config", where)
    sidecar = read_json(root / SIDECAR_FILE) if (root / SIDECAR_FILE).is_file() else {}
    tiling = {"min_tiles": DEFAULT_MIN_TILES, "max_tiles": DEFAULT_MAX_TILES, "use_thumbnail": DEFAULT_USE_THUMBNAIL}
    tiling.update(_processor_tiling(root))
    tiling.update({k: sidecar[k] for k in ("min_tiles", "max_tiles", "use_thumbnail") if k in sidecar})
    template, template_def = _hf_template(root, sidecar)
    tile_size = _as_int(vision.get("image_size", 448), "vision_config.image_size")
    patch_size = _as_int(vision.get("patch_size", 14), "vision_config.patch_size")
    ratio = float(config.get("downsample_ratio", 0.5))
    architectures = text.get("architectures") or []
    llm_architecture = architectures[0] if architectures else ARCHITECTURE_BY_MODEL_TYPE.get(text.get("model_type"))
    if llm_architecture is None:
        raise CheckpointError(f"{where} text_config has no 'architectures' and an unknown model_type "
                              f"{text.get('model_type')!r}")
    _check_servable({"downsample_ratio": config.get("downsample_ratio", 0.5),
                     "select_layer": config.get("vision_feature_layer", -1)}, llm_architecture, where)
    dtype = (config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
             or "bfloat16")
    return ModelSpec(
        path=str(root),
        format=FORMAT_HF,
        template=template,
        tile_size=tile_size,
        patch_size=patch_size,
        downsample_ratio=ratio,
        image_tokens_per_tile=image_tokens_per_tile(tile_size, patch_size, ratio),
        min_tiles=int(tiling["min_tiles"]),
        max_tiles=int(tiling["max_tiles"]),
        use_thumbnail=bool(tiling["use_thumbnail"]),
        llm_architecture=llm_architecture,
        torch_dtype=str(dtype),
        eos_token=_eos_token(template, f"{root / SIDECAR_FILE}"),
        config_system_message=_system_message(sidecar, f"{root / SIDECAR_FILE}"),
        template_def=template_def,
        **_llm_cache_shape(text, str(dtype)),
    )
