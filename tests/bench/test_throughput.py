"""The GPU benchmark's own code, run on CPU with the transformers engine and a tiny checkpoint.

Catches a broken contender before it costs device time. It checks that every contender captioned every
image and that the steady-state window starts when an engine was ready; it asserts no speed.
"""
import json

import pytest

from bench.throughput import contender_layout, gpus_used, main, table


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
    assert ray["settings"]["tiles_on_cpu"] is True  # the job's default reaches the contender
    assert (tmp_path / "work" / "raylens-tiny-t1.log").exists()  # the whole output, kept beside the JSON
    assert "| tiny | 1 | raylens | 6 |" in capsys.readouterr().out


@pytest.mark.slow
def test_mixed_workload_gives_each_image_its_own_answer_length(tmp_path):
    """`--workload mixed`: images of every size group, and each answer exactly `output_length(image)` long."""
    from bench.data import output_length

    out = tmp_path / "bench.json"
    argv = ["--sizes", "tiny", "--tiles", "2", "--images", "5", "--workload", "mixed", "--batch-size", "4",
            "--contenders", "raylens", "--engine", "transformers", "--timeline", "--no-tiles-on-cpu",
            "--workdir", str(tmp_path / "work"), "--timeout", "240", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())["results"][0]
    assert "error" not in result, result.get("error")
    names = sorted(p.name for p in (tmp_path / "work" / "images-mixed").glob("*.jpg"))
    assert len(names) == 5  # only the images the run uses are written
    assert result["images"] == 5 and result["output_tokens"] == sum(output_length(n) for n in names)
    assert result["flops_per_image"] > 0 and result["bound_images_per_s"] is None  # no GPU: no measured rate
    assert result["timelines"] and result["timelines"][0]["batches"]
    assert result["settings"]["tiles_on_cpu"] is False  # the opt-out reaches the job


def test_contender_layouts():
    assert contender_layout("pipeline") == {}
    assert contender_layout("raylens@x2") == {"replicas": 2, "gpus_per_replica": 1.0}
    assert contender_layout("raylens@tp2") == {"replicas": 1, "gpus_per_replica": 2.0}
    shared = contender_layout("raylens@r4")
    assert shared == {"replicas": 4, "gpus_per_replica": 0.25}  # the options (and the job's cache share) stay
    assert contender_layout("raylens@x4tp2") == {"replicas": 4, "gpus_per_replica": 2.0}
    assert [gpus_used(c) for c in ("raylens", "raylens@r4", "raylens@x8", "raylens@tp2", "raylens@x4tp2")] == [1, 1, 8, 2, 8]
    for bad in ("raylens@q2", "raylens@x0", "raylens@tp2x4"):
        with pytest.raises(ValueError, match="unknown layout"):
            contender_layout(bad)


def test_table_over_several_result_files(tmp_path, capsys):
    """Runs of one device call with different image counts compare against each other's pipeline."""
    def result(contender, ips):
        return dict(contender=contender, size="2b", max_tiles=1, workload="fixed", images=100, images_per_s=ips,
                    output_tokens_per_s=0, gpu_util_mean=0, startup_s=30, bound_images_per_s=400.0)

    (tmp_path / "a.json").write_text(json.dumps({"results": [result("pipeline", 50.0)]}))
    (tmp_path / "b.json").write_text(json.dumps({"results": [result("raylens", 160.0)]}))
    assert main(["table", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "| raylens | 100 | 160.0 | 0 | 0 | 3.20x | - | 400.0 (40%) | 30 |" in rows[3]


def test_table_over_files_bounds_every_run_by_the_best_measured_gpu_rate(tmp_path, capsys):
    """A run whose matmul probe shared the GPU measured a lower rate; the bound is the GPU's, not the probe's."""
    def run(contender, ips, tflops):
        r = dict(contender=contender, size="2b", max_tiles=12, workload="fixed", images=100, images_per_s=ips,
                 output_tokens_per_s=0, gpu_util_mean=0, startup_s=30, flops_per_image=20e12,
                 bound_images_per_s=round(tflops / 20, 1))
        return {"results": [r], "bf16_tflops": tflops}

    (tmp_path / "a.json").write_text(json.dumps(run("pipeline", 10.0, 800.0)))
    (tmp_path / "b.json").write_text(json.dumps(run("raylens", 18.0, 320.0)))
    assert main(["table", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "| 40.0 (25%) |" in rows[2] and "| 40.0 (45%) |" in rows[3]  # 800 TFLOP/s / 20 TFLOP per image


def test_table_gives_scaling_efficiency_against_one_gpu():
    def result(contender, ips, size="1b"):
        return dict(contender=contender, size=size, max_tiles=1, images=100, images_per_s=ips,
                    output_tokens_per_s=0, gpu_util_mean=0, startup_s=30)

    rows = table([result("raylens", 80.0), result("raylens@x8", 600.0), result("raylens@x4tp2", 320.0),
                  result("raylens@x2", 150.0, size="2b")]).splitlines()
    assert "| 7.50x on 8 GPUs (94%) |" in rows[3]
    assert "| 4.00x on 8 GPUs (50%) |" in rows[4]
    assert "| 0 | - | - | - | 30 |" in rows[5]  # no 1-GPU raylens run of the 2B shape to compare with; no bound


def _orphaned_raylets() -> set[int]:
    """Raylets whose driver is gone: a Ray session is named after its driver's pid (`session_..._<pid>`)."""
    import os
    import re

    from bench.throughput import descendants

    orphans = set()
    for pid in descendants(1):
        match = re.search(r"raylet.*?/session_[^/]*_(\d+)/", _cmdline(pid))
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            orphans.add(pid)
    return orphans


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_contender_past_its_time_limit_is_reported_and_leaves_no_ray_behind(tmp_path):
    """The raylens contender starts a Ray instance of its own. Killed at its limit, it gives an error result, and
    no Ray of its own outlives it. (The benchmark used to `ray stop --force` here, which stops every Ray on the
    machine, and to read the contender's output from pipes, which on the GPU machine waited for its Ray workers.)"""
    import subprocess
    import sys

    before = _orphaned_raylets()
    out = tmp_path / "bench.json"
    # 400 images of 128 tokens: far more than 25 s of work on any CI machine (400 of 8 tokens once finished in time)
    argv = ["--sizes", "tiny", "--tiles", "1", "--images", "400", "--max-new-tokens", "128", "--batch-size", "4",
            "--contenders", "raylens", "--engine", "transformers", "--workdir", str(tmp_path / "work"),
            "--timeout", "25", "--out", str(out)]
    code = "import sys; from bench.throughput import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert "timed out after 25 s" in result["error"]
    assert _orphaned_raylets() <= before  # the killed contender's Ray went with it
