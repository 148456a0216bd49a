"""jobs.merge: a run's LoRA folded into the base weights, written in the original InternVL2 format.

The merged weights must equal base + alpha / r * B @ A for every adapted matrix, in the original names
(for InternLM2 re-fused into `wqkv`), every other tensor the base's own; and the directory must load in the
loaders the batch job, the endpoint and lmdeploy use.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.merge import MERGE_INFO_FILE, merge, run
from raylens.checkpoints.convert import fuse_internlm2_wqkv, split_internlm2_wqkv
from raylens.checkpoints.loading import load_hf_model
from raylens.checkpoints.tiny import write_tiny_checkpoint
from raylens.checkpoints.fingerprint import model_fingerprint
from raylens.training.checkpoint import RUN_FILE, STATE_FILE, WEIGHTS_FILE, TrainingState
from raylens.training.lora import TrainableSpec, make_trainable, trainable_state


def make_run(tmp_path: Path, base: Path, spec: TrainableSpec, *, steps=(5,), max_tiles=6, seed=0) -> Path:
    """A run directory with checkpoints as jobs.finetune writes them; trained tensors are random (B != 0)."""
    model, _, _ = load_hf_model(base)
    wrapped = make_trainable(model, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    description = {"base_model": {"model": str(base), "path": str(base), "fingerprint": model_fingerprint(base)},
                   "trainable": spec.to_dict(), "tiling": {"max_tiles": max_tiles}, "raylens_version": "test"}
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / RUN_FILE).write_text(json.dumps(description))
    for step in steps:
        ckpt = run_dir / f"checkpoint_{step:06d}"
        ckpt.mkdir()
        save_file(trainable_state(wrapped), ckpt / WEIGHTS_FILE)
        (ckpt / STATE_FILE).write_text(TrainingState(step, step * 8, {}, {}).to_json())
        (ckpt / RUN_FILE).write_text(json.dumps(description))
    return run_dir


def _lora_delta(trained: dict, module: str, scale: float) -> torch.Tensor:
    a = trained[f"base_model.model.{module}.lora_A.default.weight"]
    b = trained[f"base_model.model.{module}.lora_B.default.weight"]
    return scale * b @ a


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_merged_weights_are_base_plus_scaled_lora_in_original_names(tmp_path, llm):
    base = write_tiny_checkpoint(tmp_path / "base", llm=llm, dtype="float32", seed=3)
    spec = TrainableSpec(lora_r=4, lora_alpha=8, train_projector=True)
    run_dir = make_run(tmp_path, base, spec)
    done = merge(str(run_dir), str(tmp_path / "merged"))
    assert done["step"] == 5
    base_sd = load_file(base / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    trained = load_file(run_dir / "checkpoint_000005" / WEIGHTS_FILE)
    scale = 8 / 4
    assert set(merged) == set(base_sd)
    config = json.loads((base / "config.json").read_text())["llm_config"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    for layer in range(config["num_hidden_layers"]):
        hf = f"model.language_model.layers.{layer}"
        if llm == "qwen2":
            for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
                key = f"language_model.model.layers.{layer}.{proj}.weight"
                torch.testing.assert_close(merged[key], base_sd[key] + _lora_delta(trained, f"{hf}.{proj}", scale),
                                           rtol=0, atol=1e-6)
        else:
            key = f"language_model.model.layers.{layer}.attention.wqkv.weight"
            q, k, v = split_internlm2_wqkv(base_sd[key], heads, kv, head_dim)
            q, k, v = (w + _lora_delta(trained, f"{hf}.self_attn.{p}_proj", scale) for w, p in zip((q, k, v), "qkv"))
            torch.testing.assert_close(merged[key], fuse_internlm2_wqkv(q, k, v, heads, kv, head_dim), rtol=0, atol=1e-6)
            w2 = f"language_model.model.layers.{layer}.feed_forward.w2.weight"
            torch.testing.assert_close(merged[w2], base_sd[w2] + _lora_delta(trained, f"{hf}.mlp.down_proj", scale),
                                       rtol=0, atol=1e-6)
    # the projector is the trained copy; what LoRA did not touch is the base's, bit for bit
    projector = trained["base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight"]
    assert torch.equal(merged["mlp1.1.weight"], projector)
    untouched = [k for k in base_sd if k.startswith("vision_model.") or "norm" in k or "embed" in k]
    assert untouched and all(torch.equal(merged[k], base_sd[k]) for k in untouched)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["max_dynamic_patch"] == 6 and config["llm_config"]["architectures"] == [
        "Qwen2ForCausalLM" if llm == "qwen2" else "InternLM2ForCausalLM"]


def test_merged_model_loads_and_captions_like_any_checkpoint(tmp_path, tiny_checkpoint):
    from transformers import AutoConfig

    from raylens.engines.base import SamplingParams, VLRequest
    from raylens.engines.transformers_engine import TransformersEngine
    from raylens.images import prepare_image
    from PIL import Image

    run_dir = make_run(tmp_path, tiny_checkpoint, TrainableSpec(lora_r=4, lora_alpha=8), steps=(2, 4), max_tiles=2)
    out = tmp_path / "merged"
    assert run([str(run_dir), "--output", str(out)]) == 0
    info = json.loads((out / MERGE_INFO_FILE).read_text())
    assert info["checkpoint_step"] == 4  # a run directory means its latest checkpoint
    # what lmdeploy reads first: the config through our remote code, the LLM config as an object
    config = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert config.llm_config.hidden_size == 64 and config.max_dynamic_patch == 2
    model, tokenizer, spec = load_hf_model(out)
    assert spec.format == "internvl_chat" and spec.max_tiles == 2
    assert (out / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    engine = TransformersEngine(str(out), max_batch_size=2)
    image = prepare_image(Image.new("RGB", (224, 112), (10, 200, 30)), engine.tiling())
    results = asyncio.run(engine.generate([VLRequest("a", "Describe.", image)], SamplingParams(max_new_tokens=5)))
    assert results[0].error is None and results[0].num_output_tokens >= 1
    # the merged weights differ from the base: the LoRA is in them
    base_model, _, _ = load_hf_model(tiny_checkpoint)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(model.named_parameters())[name], dict(base_model.named_parameters())[name])


@pytest.mark.parametrize("fmt", ["internvl_chat", "internvl_hf"])
def test_the_base_models_system_message_is_kept(tmp_path, fmt):
    """InternVL's chat() prefers config.json's system_message to the template's: a merge keeps the base's, read
    from config.json (original format) or from raylens.json (-hf format)."""
    from raylens.checkpoints.formats import SIDECAR_FILE, ModelSpec

    base = write_tiny_checkpoint(tmp_path / "base", format=fmt, seed=4)
    holder = base / ("config.json" if fmt == "internvl_chat" else SIDECAR_FILE)
    settings = json.loads(holder.read_text())
    holder.write_text(json.dumps({**settings, "system_message": "You describe shapes."}))
    run_dir = make_run(tmp_path, base, TrainableSpec(lora_r=2, lora_alpha=4))
    merge(str(run_dir), str(tmp_path / "merged"))
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["system_message"] == "You describe shapes."
    assert ModelSpec.from_dir(tmp_path / "merged").system_message == "You describe shapes."


def test_one_checkpoint_and_refusals(tmp_path, tiny_checkpoint):
    run_dir = make_run(tmp_path, tiny_checkpoint, TrainableSpec(lora_r=2, lora_alpha=4), steps=(2, 4))
    done = merge(str(run_dir / "checkpoint_000002"), str(tmp_path / "two"))
    assert done["step"] == 2
    assert run([str(run_dir), "--output", str(tmp_path / "two")]) == 2  # not empty, no --overwrite
    assert run([str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    other = write_tiny_checkpoint(tmp_path / "other", seed=9)
    with pytest.raises(Exception, match="fingerprint differs"):
        merge(str(run_dir), str(tmp_path / "wrong"), model=str(other))


def test_merge_from_and_to_s3(tmp_path, tiny_checkpoint, local_s3):
    import pyarrow.fs as pafs

    run_dir = make_run(tmp_path, tiny_checkpoint, TrainableSpec(lora_r=2, lora_alpha=4), steps=(3,))
    bucket = local_s3.new_bucket("merge")
    fs = local_s3.filesystem()
    pafs.copy_files(str(run_dir), f"{bucket}/runs/r1", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    merge(f"s3://{bucket}/runs/r1", f"s3://{bucket}/models/m1", s3=local_s3.settings)
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(f"{bucket}/models/m1"))}
    assert {"config.json", "model.safetensors", "tokenizer.json", MERGE_INFO_FILE} <= names


@pytest.mark.gpu
def test_lmdeploy_loads_and_runs_a_merged_model(tmp_path, tiny_checkpoint):
    """GPU: the merged directory through lmdeploy, as jobs.caption --model DIR runs it on GPUs."""
    from PIL import Image

    from raylens.engines.base import SamplingParams, VLRequest
    from raylens.engines.lmdeploy_engine import LMDeployEngine
    from raylens.images import prepare_image

    run_dir = make_run(tmp_path, tiny_checkpoint, TrainableSpec(lora_r=4, lora_alpha=8, train_projector=True))
    out = tmp_path / "merged"
    merge(str(run_dir), str(out))
    engine = LMDeployEngine(str(out))
    try:
        image = prepare_image(Image.new("RGB", (224, 112), (10, 200, 30)), _tiling(out))
        results = asyncio.run(engine.generate([VLRequest("a", "Describe.", image)], SamplingParams(max_new_tokens=5)))
    finally:
        engine.close()
    assert results[0].error is None and results[0].num_output_tokens >= 1


def _tiling(model_dir):
    from raylens.checkpoints.formats import ModelSpec

    return ModelSpec.from_dir(model_dir).tiling()
