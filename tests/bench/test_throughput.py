"""The GPU benchmark's own code, run on CPU with the transformers engine and a tiny checkpoint.

Catches a broken contender before it costs device time. It checks that every contender captioned every
image and that the steady-state window starts when an engine was ready; it asserts no speed.
"""
import json

import pytest

from bench.throughput import contender_layout, main


@pytest.mark.slow
def test_throughput_runs_raylens_and_transformers_contenders(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--sizes", "tiny", "--tiles", "1", "--images", "6", "--max-new-tokens", "3", "--batch-size", "4",
            "--contenders", "transformers", "raylens", "--engine", "transformers",
            "--workdir", str(tmp_path / "work"), "--timeout", "240", "--out", str(out)]
    assert main(argv) == 0
    results = {r["contender"]: r for r in json.loads(out.read_text())["results"]}
    assert "error" not in results["raylens"], results["raylens"].get("error")
    assert "error" not in results["transformers"], results["transformers"].get("error")
    for r in results.values():
        assert r["images"] == 6 and r["output_tokens"] == 6 * 3
        assert r["t_start"] < r["t_end"] and r["images_per_s"] > 0
    ray = results["raylens"]
    assert len(ray["engines"]) == 1
    engine = ray["engines"][0]
    assert 0 < engine["started"] < engine["ready"] <= ray["first_output_s"]
    assert ray["startup_s"] == engine["ready"]
    assert (tmp_path / "work" / "raylens-tiny-t1.log").exists()  # the whole output, kept beside the JSON
    assert "| tiny | 1 | raylens | 6 |" in capsys.readouterr().out


def test_contender_layouts():
    assert contender_layout("pipeline", {}) == {}
    assert contender_layout("raylens@x2", {}) == {"replicas": 2, "gpus_per_replica": 1.0}
    assert contender_layout("raylens@tp2", {}) == {"replicas": 1, "gpus_per_replica": 2.0}
    shared = contender_layout("raylens@r4", {"max_prefill_token_num": 4096})
    assert shared["gpus_per_replica"] == 0.25 and shared["engine_options"]["max_prefill_token_num"] == 4096
    with pytest.raises(ValueError, match="unknown layout"):
        contender_layout("raylens@q2", {})
