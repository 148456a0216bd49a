"""bench.finetune_compare's CPU smoke preset runs every contender end to end, so the GPU comparison the lead
runs (bench/scripts/finetune_gpu.sh) cannot rot."""
from __future__ import annotations

import json

from bench.finetune_compare import grid_for, main


def test_grid_gives_the_asked_tiles():
    assert grid_for(6) == (3, 2) and grid_for(1) == (1, 1) and grid_for(12) == (4, 3) and grid_for(7) == (7, 1)


def test_tiny_preset_compares_raylens_with_a_plain_loop(tmp_path, ray_local):
    # (the fsdp contender is the same run with --strategy fsdp, which tests/jobs/test_finetune_fsdp.py covers)
    report = main(["--tiny", "--contenders", "raylens", "plain", "--workdir", str(tmp_path / "work"),
                   "--out", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert set(results) == {"raylens", "plain"}
    for name, result in results.items():
        assert "error" not in result, (name, result)
        assert result["samples_per_s"] > 0 and result["measured_steps"] == 2 and result["final_loss"] > 0
    assert report["raylens_vs_plain_speed"] > 0


def test_a_contender_runs_in_a_process_of_its_own(tmp_path):
    from bench.finetune_compare import Settings, run_in_subprocess, write_data
    from bench.throughput import ensure_checkpoint

    model = ensure_checkpoint(tmp_path, "tiny")
    data = write_data(tmp_path / "data", 4, 1, 112)
    settings = Settings(model=str(model), data=str(data), workdir=str(tmp_path), tiles=1, steps=2, warmup_steps=1,
                        batch_size=2, dtype="float32", loader_workers=0, gpu=False, threads=1)
    result = run_in_subprocess("plain", settings, timeout_s=300)
    assert "error" not in result, result
    assert result["measured_steps"] == 1 and result["samples_per_s"] > 0
    assert result["torch_threads"] == 1  # --threads: the same torch threads in every contender
