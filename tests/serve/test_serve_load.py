"""bench/serve_load.py's own servers on CPU (the demo model, the transformers engine): the raylens endpoint
in both layouts, started and swept by the script the GPU session runs, so it cannot rot between GPU sessions.
A subprocess: the script starts its own private Ray instance."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.serve_load import steady_rate
from raylens.checkpoints.resolve import DEMO_MODEL_DIR


def test_steady_rate_is_littles_law_over_the_answers_under_full_load():
    # 8 clients, each answer 2 s: 4 answers a second, however long the level and however its edges fall
    assert steady_rate(8, [2.0] * 40) == 4.0
    assert steady_rate(8, [1.0, 3.0]) == 4.0  # the mean latency, not the median
    assert steady_rate(8, []) is None  # nothing answered before the level ended: no figure


@pytest.mark.slow
def test_serve_load_starts_and_sweeps_both_layouts(tmp_path):
    out = tmp_path / "load.json"
    command = [sys.executable, "-m", "bench.serve_load", "--checkpoint", str(DEMO_MODEL_DIR), "--engine", "transformers",
               "--tiles", "1", "--contenders", "raylens", "raylens-single", "--concurrency", "1", "2",
               "--level-seconds", "2", "--max-tokens", "4", "--workdir", str(tmp_path / "work"), "--out", str(out),
               "--serve-args", '{"max_ongoing_requests": 6}']
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    contenders = json.loads(out.read_text())["contenders"]
    assert set(contenders) == {"raylens", "raylens-single"}
    for name, result in contenders.items():
        assert "error" not in result, (name, result)
        assert result["serve_config"]["max_ongoing_requests"] == 6  # --serve-args reached the endpoint
        assert result["serve_config"]["layout"] == ("single" if name == "raylens-single" else "split")
        levels, probe = result["levels"][:-1], result["levels"][-1]
        assert [row["concurrency"] for row in levels] == [1, 2]
        assert probe["probe"] == "max_tokens=1" and probe["ok"] >= 1 and probe["mean_output_tokens"] == 1
        for row in levels:
            assert row["ok"] >= row["concurrency"] and not row["failures"], (name, row)
            assert row["steady_requests"] >= 1 and row["steady_requests_per_s"] > 0, (name, row)
            assert row["mean_output_tokens"] == 4
