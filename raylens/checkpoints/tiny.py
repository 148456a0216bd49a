"""Random-weight InternVL checkpoints from a seed: tiny (tests), 1B-shaped and 2B-shaped (benchmarks), of the
InternVL2, InternVL2.5 and InternVL3 families.

Why: no weights can be downloaded here, yet tests, GPU benchmarks and the demo model need real checkpoint
directories of both formats. Models are built as transformers `InternVLForConditionalGeneration` and saved
either as-is (`save_hf`) or converted to the InternVL2 hub layout lmdeploy loads (`save_original`,
through `convert.py`).

Sizes (notes/internvl.md 1.2, 1.3, 1.5):
* "tiny": ViT hidden 64 x 2 layers, 112-px tiles of 14-px patches (16 image tokens a tile), LLM hidden 64 x 2
  layers, 4 heads / 2 KV heads, vocab = the tokenizer's length rounded up to 64. Builds in milliseconds.
* "1b": InternViT-300M-448px + Qwen2-0.5B dims, vocab 151655, untied LM head (938.2M parameters; the
  InternVL repo forces tie_word_embeddings False).
* "2b": InternViT-300M-448px + InternLM2-1.8B dims (as Llama), vocab 92553 (2205.8M parameters).
Families (`FAMILIES`): the same architecture with another chat template. InternVL2 uses the template of its
LLM (Hermes-2 for Qwen2, internlm2-chat for InternLM2); InternVL2.5 and InternVL3 use `internvl2_5` with either
LLM (Qwen2.5 is Qwen2, InternLM2.5 is InternLM2). In the transformers format an InternVL2.5/3 checkpoint is
written as the official `-hf` conversions are: no raylens sidecar, the tokenizer's chat template being
transformers' InternVL one (`HF_CHAT_TEMPLATE`), the tiling in `preprocessor_config.json`.
The real vocab sizes are kept for 1b/2b so memory and compute match. Our tokenizer learns only 512 tokens,
so for those sizes it is padded with unreachable `<|unused_N|>` entries up to the vocab: a random model emits
ids anywhere in its vocab, and each must decode (lmdeploy's detokenizer fails on unknown ids).

Weights come from a `torch.Generator` seeded with `seed`, parameter by parameter in module order and always
drawn in float32 on the CPU, so the same seed gives the same weights in any dtype and on any device, and the
caller's global RNG is untouched.

CLI:  python -m raylens.checkpoints.tiny OUT_DIR --format internvl_chat --size 1b --seed 0 [--family internvl3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from raylens.checkpoints.convert import INTERNLM2, QWEN2, hf_to_original_state_dict, original_config_from_hf
from raylens.checkpoints.formats import FORMAT_HF, FORMAT_ORIGINAL, SIDECAR_FILE
from raylens.checkpoints.remote_code import copy_remote_code
from raylens.checkpoints.tokenizer import build_tokenizer
from raylens.prompts import DEFAULT_CAPTION_PROMPT, IMG_CONTEXT, INTERNVL_SYSTEM_MESSAGE, get_template


@dataclass(frozen=True)
class LLMKind:
    """How one InternVL2 LLM family is expressed as a transformers text config, and its chat template."""

    architecture: str  # what the original format's llm_config says
    template: str
    text_defaults: Mapping[str, Any]


LLM_KINDS: dict[str, LLMKind] = {
    "qwen2": LLMKind(QWEN2, "Hermes-2", {
        "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "use_sliding_window": False, "sliding_window": None,
    }),
    # InternLM2 is Llama math; convert.py fuses q/k/v into wqkv when saving the original format.
    "internlm2": LLMKind(INTERNLM2, "internlm2-chat", {
        "model_type": "llama", "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "attention_bias": False, "mlp_bias": False,
    }),
}

FAMILIES = ("internvl2", "internvl2_5", "internvl3")
# The chat template transformers' convert_internvl_weights_to_hf.py gives the official -hf checkpoints
# (transformers 5.17; older conversions wrote "<IMG_CONTEXT>\n" for an image part): ChatML, a newline after
# each turn, no default system message.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<image>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def family_template(family: str, llm: str) -> str:
    """The chat template name of `family` with `llm` ("qwen2" | "internlm2")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return LLM_KINDS[llm].template if family == "internvl2" else "internvl2_5"


_VIT_300M = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
    "image_size": 448, "patch_size": 14, "attention_bias": True, "use_qk_norm": False, "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6, "hidden_act": "gelu", "layer_scale_init_value": 1.0,
}


@dataclass(frozen=True)
class SizePreset:
    """Model dimensions of one size; `vocab_size` None means the tokenizer's length rounded up to 64."""

    vision: Mapping[str, Any]
    text: Mapping[str, Any]
    default_llm: str
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    notes: str = ""


SIZES: dict[str, SizePreset] = {
    "tiny": SizePreset(
        vision={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                "image_size": 112, "patch_size": 14, "attention_bias": True, "use_qk_norm": False,
                "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu", "layer_scale_init_value": 0.1},
        text={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 4096},
        default_llm="qwen2",
        notes="tests: 16 image tokens a 112-px tile",
    ),
    "1b": SizePreset(
        vision=_VIT_300M,
        text={"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "intermediate_size": 4864, "max_position_embeddings": 32768},
        default_llm="qwen2",
        vocab_size=151655,
        notes="InternVL2-1B shape: InternViT-300M + Qwen2-0.5B, untied head, 938.2M parameters",
    ),
    "2b": SizePreset(
        vision=_VIT_300M,
        text={"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
              "intermediate_size": 8192, "max_position_embeddings": 32768},
        default_llm="internlm2",
        vocab_size=92553,
        notes="InternVL2-2B shape: InternViT-300M + InternLM2-1.8B, 2205.8M parameters",
    ),
}

# Words of short image captions and questions: enough for BPE to learn whole words, so tiny-model prompts
# stay short; anything else still encodes, byte by byte.
CAPTION_WORDS = """
a an the this that these those there here is are was were be been has have with without of in on at to
from by for and or but not no yes it its their his her one two three four five six seven eight nine ten
many some several few small large big tiny huge little tall short long wide narrow round square flat
red green blue yellow orange purple pink brown black white gray grey gold silver dark light bright pale
circle circles square squares triangle triangles rectangle star stars line lines dot dots shape shapes
man men woman women person people child children boy girl baby dog dogs cat cats bird birds horse cow
sheep car cars bus truck train plane boat bike bicycle motorcycle street road sidewalk building house
tree trees grass field park beach sea ocean water river lake sky cloud clouds sun snow mountain hill
table chair bed room kitchen window door wall floor plate food pizza cake sandwich cup glass bottle
bowl phone computer laptop book sign clock umbrella bag ball kite frisbee skateboard surfboard
sitting standing walking running riding holding eating playing looking flying lying parked next near
top bottom left right middle center front back behind under over above below inside outside around
picture photo image scene view close up background foreground corner side edge group pair couple
describe caption provide question answer what where who how which color colour count number
one-sentence provided image. image, photo. single word phrase using detail details briefly
"""

DEFAULT_CORPUS: tuple[str, ...] = (
    INTERNVL_SYSTEM_MESSAGE,
    DEFAULT_CAPTION_PROMPT,
    "Describe the image.",
    "What is in the image?",
    "Answer the question using a single word or phrase.",
    *CAPTION_WORDS.split(),
    " ".join(CAPTION_WORDS.split()),
)


def default_tokenizer(template: str = "Hermes-2", vocab_size: int = 512, *, pad_to: int | None = None
                      ) -> PreTrainedTokenizerFast:
    """The deterministic tokenizer of random checkpoints: BPE on `DEFAULT_CORPUS` (512 tokens), padded with
    unreachable placeholders up to `pad_to` (the LLM vocab of 1b/2b) so every id the model emits decodes."""
    return build_tokenizer(DEFAULT_CORPUS, vocab_size=vocab_size, template=template, pad_to=pad_to)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token!r} token")
    return token_id


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def resolve_llm(size: str, llm: str | None) -> str:
    """`llm`, or the size's own LLM family when None; ValueError for unknown names."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    llm = llm or SIZES[size].default_llm
    if llm not in LLM_KINDS:
        raise ValueError(f"unknown llm {llm!r}; known: {sorted(LLM_KINDS)}")
    return llm


def build_config(size: str = "tiny", *, llm: str | None = None, tokenizer=None, **overrides) -> InternVLConfig:
    """The InternVLConfig `build_hf_model` builds (see there for `overrides`)."""
    llm = resolve_llm(size, llm)
    preset = SIZES[size]
    kind = LLM_KINDS[llm]
    if tokenizer is None:
        tokenizer = default_tokenizer(kind.template, pad_to=preset.vocab_size)
    overrides = dict(overrides)
    vision = {**preset.vision, **overrides.pop("vision_config", {})}
    text = {**kind.text_defaults, **preset.text, **overrides.pop("text_config", {})}
    if llm == "qwen2":
        text.setdefault("max_window_layers", text["num_hidden_layers"])
    text.setdefault("vocab_size", preset.vocab_size or _round_up(len(tokenizer), 64))
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"LLM vocab_size {text['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    eos_id = _token_id(tokenizer, get_template(kind.template).end_of_turn)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    text.setdefault("eos_token_id", eos_id)
    text.setdefault("pad_token_id", pad_id)
    text.setdefault("bos_token_id", pad_id)  # as Qwen2 (<|endoftext|>); InternVL2 prompts never use a bos
    tie = bool(overrides.pop("tie_word_embeddings", text.get("tie_word_embeddings", preset.tie_word_embeddings)))
    text["tie_word_embeddings"] = tie
    allowed = {f.name for f in dataclasses.fields(InternVLConfig)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"unknown overrides {unknown}; use vision_config={{...}}, text_config={{...}} "
                        f"or InternVLConfig fields {sorted(allowed)}")
    ratio = overrides.pop("downsample_ratio", 0.5)
    image_size = vision["image_size"]
    patch_size = vision["patch_size"]
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=_token_id(tokenizer, IMG_CONTEXT),
        image_seq_length=int((image_size // patch_size) ** 2 * ratio**2),
        downsample_ratio=ratio,
        tie_word_embeddings=tie,
        **overrides,
    )


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Overwrite every parameter with seeded random values (see the module docstring).

    Matrices and embeddings ~ N(0, std); biases ~ N(0, std); norm weights ~ 1 + N(0, std); layer scales
    ~ `layer_scale_init_value` + N(0, std). Nothing is exactly constant, so a swapped or dropped tensor in a
    conversion changes the outputs, which is what the format tests rely on.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    layer_scale = float(model.config.vision_config.layer_scale_init_value)
    for name, param in model.named_parameters():
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        if param.ndim == 1 and not name.endswith("bias"):
            values += layer_scale if name.endswith(("lambda_1", "lambda_2")) else 1.0
        param.copy_(values)


def build_hf_model(size: str = "tiny", *, llm: str | None = None, seed: int = 0, tokenizer=None,
                   dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                   **overrides) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerFast]:
    """A random-weight transformers InternVL model of `size` and its tokenizer, in eval mode.

    `llm` is "qwen2" or "internlm2" (the latter built as Llama); None takes the size's own (1b: qwen2,
    2b: internlm2, tiny: qwen2). `tokenizer` defaults to `default_tokenizer(template of llm)`.
    `overrides`: `vision_config={...}` and `text_config={...}` are merged into the preset's dicts; any other
    key must be an InternVLConfig field (e.g. `tie_word_embeddings=True`).
    `device="meta"` builds the structure only (no memory, no weights): parameter counts of 1b/2b in
    milliseconds. Otherwise the weights are allocated straight in `dtype` on `device` and filled from `seed`.
    """
    llm = resolve_llm(size, llm)
    if tokenizer is None:
        tokenizer = default_tokenizer(LLM_KINDS[llm].template, pad_to=SIZES[size].vocab_size)
    config = build_config(size, llm=llm, tokenizer=tokenizer, **overrides)
    dtype = _as_dtype(dtype)
    with torch.device(device), no_init_weights():
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips tying
    if torch.device(device).type != "meta":
        randomize_weights(model, seed, std=config.text_config.initializer_range)
    text = config.text_config
    model.generation_config = GenerationConfig(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                                               bos_token_id=text.bos_token_id)
    return model.eval(), tokenizer


# --- saving ---------------------------------------------------------------------------------------------


def write_safetensors(tensors: Mapping[str, torch.Tensor], out_dir: Path, *,
                      max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when large.

    Shards bound peak memory (safetensors serialises a whole file in memory) and are what the hub and
    lmdeploy expect for big models. Tensors sharing storage (tied embeddings) are cloned: safetensors refuses
    shared tensors.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storage:
            tensor = tensor.clone()
        seen_storage.add(ptr)
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = out_dir / "model.safetensors"
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=metadata)
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _generation_config(model) -> GenerationConfig:
    g = model.generation_config
    return GenerationConfig(eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id, bos_token_id=g.bos_token_id)


def save_original(model: InternVLForConditionalGeneration, tokenizer, out_dir, *, template: str, max_tiles: int,
                  llm_architecture: str, dtype: torch.dtype | str = torch.bfloat16,
                  system_message: str | None = None) -> Path:
    """Write `model` in the InternVL2 hub layout lmdeploy loads with trust_remote_code=True.

    Files: config.json (with auto_map), our configuration_*.py, model.safetensors (or shards) in `dtype`,
    tokenizer files (with chat template), generation_config.json. `llm_architecture` is the LLM to store:
    "Qwen2ForCausalLM" or "InternLM2ForCausalLM" (q/k/v fused into wqkv). `system_message`, when given, goes
    into config.json, where InternVL's `chat()` prefers it to the template's (a merge keeps its base's).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _as_dtype(dtype)
    config = original_config_from_hf(model.config, template=template, max_tiles=max_tiles,
                                     llm_architecture=llm_architecture, torch_dtype=dtype)
    if system_message is not None:
        config["system_message"] = system_message
    state = hf_to_original_state_dict(model.state_dict(), model.config, llm_architecture=llm_architecture)
    write_safetensors({k: v.detach().to(device="cpu", dtype=dtype) for k, v in state.items()}, out)
    del state
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    copy_remote_code(out)
    tokenizer.save_pretrained(out)
    _generation_config(model).save_pretrained(out)
    return out


def _patch_hf_config(out: Path, architecture: str) -> None:
    """Add `text_config.architectures`, without which lmdeploy mistakes the model for deepseek-vl2
    (notes/lmdeploy.md 1.4)."""
    path = out / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["text_config"].setdefault("architectures", [architecture])
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_hf(model: InternVLForConditionalGeneration, tokenizer, out_dir, *, template: str, max_tiles: int,
            official: bool = False) -> Path:
    """Write `model` as a transformers-native InternVL checkpoint.

    By default with the `raylens.json` sidecar, which holds what config.json cannot: the chat template and
    the tiling (`formats.read_model_spec`). `official=True` writes what the official `-hf` checkpoints hold
    instead: the tokenizer's chat template set to transformers' (`HF_CHAT_TEMPLATE`) and the tiling in an
    image processor config (`preprocessor_config.json`, GotOcr2 keys), no sidecar.
    """
    from raylens.checkpoints.formats import ARCHITECTURE_BY_MODEL_TYPE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    get_template(template)  # fail before writing anything
    model.save_pretrained(out, max_shard_size="2GB")
    if official:
        tokenizer.chat_template = HF_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    _patch_hf_config(out, ARCHITECTURE_BY_MODEL_TYPE[model.config.text_config.model_type])
    if official:
        _write_image_processor_config(out, model.config.vision_config.image_size, max_tiles)
    else:
        sidecar = {"template": template, "min_tiles": 1, "max_tiles": max_tiles, "use_thumbnail": True}
        (out / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def _write_image_processor_config(out: Path, image_size, max_tiles: int) -> None:
    """preprocessor_config.json as transformers' GotOcr2 image processor saves it (the official -hf files)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    size = image_size[0] if isinstance(image_size, (list, tuple)) else int(image_size)
    GotOcr2ImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225], min_patches=1, max_patches=max_tiles,
                             crop_to_patches=False).save_pretrained(out)


def write_tiny_checkpoint(out_dir, *, format: str = FORMAT_ORIGINAL, size: str = "tiny", llm: str | None = None,
                          seed: int = 0, max_tiles: int = 6, dtype: torch.dtype | str | None = None,
                          device: str = "cpu", family: str = "internvl2") -> Path:
    """Build a random model of `size` from `seed` and save it in `format`; returns the directory.

    `family` picks the chat template (see the module docstring); an InternVL2.5/3 checkpoint in the
    transformers format is written as the official `-hf` ones are. `dtype` defaults to bfloat16, what
    InternVL ships; weights are allocated in it directly, so a 2B checkpoint needs about twice its file size in
    RAM at most.
    """
    if format not in (FORMAT_ORIGINAL, FORMAT_HF):
        raise ValueError(f"unknown format {format!r}; use {FORMAT_ORIGINAL!r} or {FORMAT_HF!r}")
    llm = resolve_llm(size, llm)
    template = family_template(family, llm)
    dtype = _as_dtype(dtype or torch.bfloat16)
    tokenizer = default_tokenizer(template, pad_to=SIZES[size].vocab_size)
    model, tokenizer = build_hf_model(size, llm=llm, seed=seed, dtype=dtype, device=device, tokenizer=tokenizer)
    kind = LLM_KINDS[llm]
    if format == FORMAT_ORIGINAL:
        return save_original(model, tokenizer, out_dir, template=template, max_tiles=max_tiles,
                             llm_architecture=kind.architecture, dtype=dtype)
    return save_hf(model, tokenizer, out_dir, template=template, max_tiles=max_tiles, official=family != "internvl2")


def build_parser() -> argparse.ArgumentParser:
    sizes = "\n".join(f"  {name}: {preset.notes}" for name, preset in SIZES.items())
    parser = argparse.ArgumentParser(
        prog="python -m raylens.checkpoints.tiny",
        description="Write a random-weight InternVL2 checkpoint (weights from --seed) for tests and benchmarks.",
        epilog=f"sizes:\n{sizes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="directory to write (created; existing files are overwritten)")
    parser.add_argument("--format", choices=[FORMAT_ORIGINAL, FORMAT_HF], default=FORMAT_ORIGINAL,
                        help="internvl_chat: InternVL2 hub layout (lmdeploy, trust_remote_code); "
                             "internvl_hf: transformers InternVLForConditionalGeneration (default: %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (default: %(default)s)")
    parser.add_argument("--llm", choices=sorted(LLM_KINDS), default=None,
                        help="LLM family (default: the size's own; tiny/1b qwen2, 2b internlm2)")
    parser.add_argument("--family", choices=FAMILIES, default="internvl2",
                        help="chat template family: internvl2 (the LLM's template) or internvl2_5/internvl3 "
                             "(the internvl2_5 template; in the transformers format written like the official -hf "
                             "checkpoints) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: %(default)s)")
    parser.add_argument("--max-tiles", type=int, default=6,
                        help="max_dynamic_patch saved with the checkpoint (default: %(default)s)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                        help="dtype of the saved weights, also the dtype they are built in (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="where to build the weights, e.g. cuda (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.max_tiles < 1:
        raise SystemExit("--max-tiles must be at least 1")
    out = write_tiny_checkpoint(args.out_dir, format=args.format, size=args.size, llm=args.llm, seed=args.seed,
                                max_tiles=args.max_tiles, dtype=args.dtype, device=args.device, family=args.family)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {args.format} {args.size} checkpoint ({args.family}, llm {args.llm or SIZES[args.size].default_llm}, "
          f"seed {args.seed}) to {out}: {size / 2**20:.1f} MiB")
    return out


if __name__ == "__main__":
    main()
