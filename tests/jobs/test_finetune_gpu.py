"""GPU: jobs.finetune on a CUDA worker, as on the GPU machine: bf16 frozen weights with float32 LoRA under
autocast, gradient checkpointing, DDP (one worker) and one-rank FSDP2 with bf16 compute; peak memory is
reported with the metrics. (The lmdeploy load of a merged model is in test_merge.py.)"""
from __future__ import annotations

import json

import pytest

from jobs.finetune import main, setup
from jobs.finetune_config import FinetuneConfig
from raylens.training.demo_data import write_shape_questions


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_a_gpu_worker(tmp_path, tiny_checkpoint, ray_local, strategy):
    paths = write_shape_questions(tmp_path / "data", train=16, held_out=0)
    config = FinetuneConfig(data=str(paths["train"]), output=str(tmp_path / "run"), model=str(tiny_checkpoint),
                            strategy=strategy, max_steps=4, batch_size=2, save_every=2, gradient_checkpointing=True,
                            loader_workers=1)
    summary = main(setup(config))
    assert summary["completed"] and summary["error"] is None
    history = [json.loads(line) for line in (tmp_path / "run" / "checkpoint_000004" / "metrics.jsonl").open()]
    assert history[-1]["gpu_peak_allocated_gb"] > 0 and all(m["loss"] == m["loss"] for m in history)  # not NaN
