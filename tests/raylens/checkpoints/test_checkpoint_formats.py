"""`read_model_spec` on both formats, and the remote-code configs lmdeploy loads."""
from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoConfig

from raylens.checkpoints.formats import (
    FORMAT_HF,
    FORMAT_ORIGINAL,
    SIDECAR_FILE,
    CheckpointError,
    image_tokens_per_tile,
    read_model_spec,
)

pytest_plugins = ("tiny_dirs_fixture",)  # the `tiny_dirs` fixture

ARCH = {
    (FORMAT_ORIGINAL, "qwen2"): "Qwen2ForCausalLM",
    (FORMAT_ORIGINAL, "internlm2"): "InternLM2ForCausalLM",
    (FORMAT_HF, "qwen2"): "Qwen2ForCausalLM",
    (FORMAT_HF, "internlm2"): "LlamaForCausalLM",  # InternLM2 is stored as Llama in the transformers format
}
TEMPLATE = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat"}


@pytest.mark.parametrize("fmt", [FORMAT_ORIGINAL, FORMAT_HF])
@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_spec_of_tiny_checkpoints(tiny_dirs, fmt, llm):
    spec = read_model_spec(tiny_dirs[fmt, llm])
    assert spec.format == fmt
    assert spec.path == str(tiny_dirs[fmt, llm])
    assert spec.template == TEMPLATE[llm]
    assert (spec.tile_size, spec.patch_size, spec.downsample_ratio) == (112, 14, 0.5)
    assert spec.image_tokens_per_tile == 16
    assert (spec.min_tiles, spec.max_tiles, spec.use_thumbnail) == (1, 6, True)
    assert spec.llm_architecture == ARCH[fmt, llm]
    assert spec.torch_dtype == "bfloat16"
    assert spec.eos_token == "<|im_end|>"
    # 2 layers x 2 KV heads x head_dim 16 (64 / 4 heads) x K and V x 2 bytes (bfloat16)
    assert (spec.kv_bytes_per_token, spec.max_position_embeddings) == (2 * 2 * 16 * 2 * 2, 4096)


@pytest.mark.parametrize("fmt", [FORMAT_ORIGINAL, FORMAT_HF])
def test_cache_shape_of_real_sizes(tmp_path, tiny_dirs, fmt):
    """InternVL2-2B's InternLM2-1.8B: 24 layers, 8 KV heads of 128 (hub config.json numbers)."""
    src = tiny_dirs[fmt, "internlm2"]
    root = tmp_path / "m"
    shutil.copytree(src, root)
    config = json.loads((root / "config.json").read_text())
    llm = config["llm_config" if fmt == FORMAT_ORIGINAL else "text_config"]
    llm.update(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, num_hidden_layers=24,
               max_position_embeddings=32768)
    if "head_dim" in llm:  # transformers writes it out
        llm["head_dim"] = 128
    (root / "config.json").write_text(json.dumps(config))
    spec = read_model_spec(root)
    assert spec.kv_bytes_per_token == 2 * 24 * 8 * 128 * 2 == 98304
    assert spec.max_position_embeddings == 32768
    del llm["num_key_value_heads"], llm["max_position_embeddings"]  # old configs: MHA, context unknown
    (root / "config.json").write_text(json.dumps(config))
    spec = read_model_spec(root)
    assert (spec.kv_bytes_per_token, spec.max_position_embeddings) == (2 * 24 * 16 * 128 * 2, None)


def test_image_tokens_per_tile_matches_internvl2():
    assert image_tokens_per_tile(448, 14, 0.5) == 256
    assert image_tokens_per_tile(112, 14, 0.5) == 16


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_auto_config_gives_real_llm_config(tiny_dirs, llm):
    """What lmdeploy does: AutoConfig with trust_remote_code, then attribute access on llm_config."""
    config = AutoConfig.from_pretrained(str(tiny_dirs[FORMAT_ORIGINAL, llm]), trust_remote_code=True)
    assert config.architectures == ["InternVLChatModel"]
    llm_config = config.llm_config
    assert not isinstance(llm_config, dict)
    assert llm_config.architectures == [ARCH[FORMAT_ORIGINAL, llm]]
    assert (llm_config.hidden_size, llm_config.num_attention_heads, llm_config.num_key_value_heads,
            llm_config.num_hidden_layers) == (64, 4, 2, 2)
    assert llm_config.vocab_size >= 300
    assert llm_config.eos_token_id == 2 and llm_config.bos_token_id is not None
    assert llm_config.rope_parameters is not None
    assert llm_config.rope_parameters["rope_theta"] == 1e6
    assert not isinstance(config.vision_config, dict)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.qkv_bias, vision.norm_type) == (112, 14, True, "layer_norm")
    assert config.force_image_size == vision.image_size
    assert (config.select_layer, config.ps_version, config.dynamic_image_size) == (-1, "v2", True)


def test_internlm2_config_rope_and_bias(tiny_dirs):
    config = AutoConfig.from_pretrained(str(tiny_dirs[FORMAT_ORIGINAL, "internlm2"]), trust_remote_code=True)
    llm = config.llm_config
    assert llm.model_type == "internlm2"
    assert llm.bias is False
    assert llm.rope_theta == 1e6
    assert llm.rope_parameters == {"rope_theta": 1e6, "rope_type": "default"}


def test_internlm2_dynamic_rope_scaling_survives(tmp_path, tiny_dirs):
    src = tiny_dirs[FORMAT_ORIGINAL, "internlm2"]
    shutil.copytree(src, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    config["llm_config"]["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    path.write_text(json.dumps(config))
    llm = AutoConfig.from_pretrained(str(tmp_path / "ckpt"), trust_remote_code=True).llm_config
    assert llm.rope_parameters["rope_type"] == "dynamic"
    assert llm.rope_parameters["factor"] == 2.0
    assert llm.rope_parameters["rope_theta"] == 1e6


def test_remote_config_save_and_reload(tmp_path, tiny_dirs):
    config = AutoConfig.from_pretrained(str(tiny_dirs[FORMAT_ORIGINAL, "qwen2"]), trust_remote_code=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["llm_config"]["hidden_size"] == 64
    assert saved["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert saved["vision_config"]["image_size"] == 112


def test_hf_without_sidecar_uses_processor_config_then_defaults(tmp_path, tiny_dirs):
    ckpt = tmp_path / "hf"
    shutil.copytree(tiny_dirs[FORMAT_HF, "qwen2"], ckpt)
    (ckpt / SIDECAR_FILE).unlink()
    spec = read_model_spec(ckpt)
    assert (spec.template, spec.min_tiles, spec.max_tiles, spec.use_thumbnail) == ("Hermes-2", 1, 12, True)
    (ckpt / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"min_patches": 1, "max_patches": 4, "crop_to_patches": True}}))
    assert read_model_spec(ckpt).max_tiles == 4


def test_original_without_dynamic_tiling_is_one_tile(tmp_path, tiny_dirs):
    ckpt = tmp_path / "orig"
    shutil.copytree(tiny_dirs[FORMAT_ORIGINAL, "qwen2"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["dynamic_image_size"] = False
    (ckpt / "config.json").write_text(json.dumps(config))
    spec = read_model_spec(ckpt)
    assert (spec.min_tiles, spec.max_tiles) == (1, 1)


def test_errors_name_the_missing_thing(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model_spec(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_model_spec(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="bert"):
        read_model_spec(bad)
    config = json.loads((tiny_dirs[FORMAT_ORIGINAL, "qwen2"] / "config.json").read_text())
    del config["llm_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="llm_config"):
        read_model_spec(bad)
    config = json.loads((tiny_dirs[FORMAT_ORIGINAL, "qwen2"] / "config.json").read_text())
    config["template"] = "vicuna"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vicuna"):
        read_model_spec(bad)


# --------------------------------------------------------------------- settings derived from the spec
@pytest.mark.parametrize("fmt", [FORMAT_ORIGINAL, FORMAT_HF])
def test_spec_owns_its_derived_settings(tiny_dirs, fmt):
    from raylens.checkpoints.formats import ModelSpec
    from raylens.images import TilingSpec
    from raylens.prompts import INTERNVL_SYSTEM_MESSAGE, TEMPLATES

    spec = ModelSpec.from_dir(tiny_dirs[fmt, "internlm2"])
    assert spec == read_model_spec(tiny_dirs[fmt, "internlm2"])
    assert spec.tiling() == TilingSpec(tile_size=112, min_tiles=1, max_tiles=6, use_thumbnail=True)
    assert spec.tiling(2) == TilingSpec(tile_size=112, min_tiles=1, max_tiles=2, use_thumbnail=True)
    assert spec.image_tokens(3) == 48
    assert spec.chat_template() is TEMPLATES["internlm2-chat"]
    assert spec.system_message == INTERNVL_SYSTEM_MESSAGE
    assert spec.max_context == 4096


def test_max_tiles_below_the_checkpoints_min_tiles_is_refused(tmp_path, tiny_dirs):
    ckpt = tmp_path / "orig"
    shutil.copytree(tiny_dirs[FORMAT_ORIGINAL, "qwen2"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["min_dynamic_patch"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    spec = read_model_spec(ckpt)
    assert spec.tiling(4).min_tiles == 2
    with pytest.raises(ValueError, match="below this checkpoint's min_dynamic_patch"):
        spec.tiling(1)
    with pytest.raises(ValueError, match="int"):
        spec.tiling(2.5)


def test_config_system_message_wins_over_the_templates(tmp_path, tiny_dirs):
    """InternVL's chat() uses config.system_message when the config has one (issue 11, item 6)."""
    ckpt = tmp_path / "orig"
    shutil.copytree(tiny_dirs[FORMAT_ORIGINAL, "qwen2"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["system_message"] = "You caption images."
    (ckpt / "config.json").write_text(json.dumps(config))
    assert read_model_spec(ckpt).system_message == "You caption images."
    config["system_message"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="system_message"):
        read_model_spec(ckpt)
