"""What the job does when things go wrong: engines that die, error budgets, a driver killed mid-run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from conftest import image_bytes, subprocess_env
from fakes import POISON_WIDTH
from jobs.caption import main, run, setup
from jobs.caption_config import CaptionJobConfig

REPO = Path(__file__).resolve().parents[2]


def _images(root: Path, sizes: list[tuple[int, int]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        (root / f"img_{i:03d}.png").write_bytes(image_bytes(size))


def test_a_batch_that_kills_its_engine_becomes_error_rows(tmp_path, tiny_checkpoint, ray_local):
    sizes = [(40 + i, 30) for i in range(7)] + [(POISON_WIDTH, 20)]
    _images(tmp_path / "in", sizes)
    cfg = CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                           engine="fakes:CrashingEngine", batch_size=2, shard_size=4, engine_retries=1,
                           batches_in_flight=1,  # batches on the engine when it dies are lost with it
                           prompt=["first?", "second?"])
    summary = main(setup(cfg))
    rows = pq.read_table(tmp_path / "out").to_pylist()
    keys = [(r["id"], r["prompt_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * len(sizes)  # every (image, prompt) exactly once
    failed = {r["id"] for r in rows if r["error"]}
    assert "img_007.png" in failed  # the poison
    assert len(failed) <= 2  # only its batch (of 2 images)
    for r in rows:
        if r["id"] in failed:
            assert r["error"].startswith("BatchFailed:") and r["text"] is None and r["error_kind"] == "engine.batch_failed"
        else:
            assert r["text"] == f"{r['prompt']} | {sizes[int(r['id'][4:7])][0]}x{sizes[int(r['id'][4:7])][1]}"
    assert summary["errors_by_kind"] == {"engine.batch_failed": 2 * len(failed)}


def test_an_engine_that_dies_restarts_its_actor_instead_of_failing_rows(tmp_path, tiny_checkpoint, ray_local):
    """EngineDeadError ends the actor's process; Ray restarts it and retries the batch (issue 11)."""
    sizes = [(40 + i, 30) for i in range(6)]
    _images(tmp_path / "in", sizes)
    marker = tmp_path / "died"
    cfg = CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                           engine="fakes:DyingEngine", engine_args=json.dumps({"marker": str(marker)}), batch_size=2,
                           shard_size=4, engine_retries=1, batches_in_flight=1)
    summary = main(setup(cfg))
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert marker.exists()  # the engine did die once
    assert len(set((tmp_path / "died.built").read_text().split())) >= 2  # in two processes: the actor was rebuilt
    assert [r["error"] for r in rows] == [None] * len(sizes)
    assert sorted(r["text"] for r in rows) == sorted(f"{cfg.prompt[0]} | {w}x{h}" for w, h in sizes)
    assert summary["failed"] == 0


def test_max_error_rate_fails_the_job(tmp_path, tiny_checkpoint, ray_local, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.png").write_bytes(image_bytes())
    (tmp_path / "in" / "bad1.png").write_bytes(b"")
    (tmp_path / "in" / "bad2.png").write_bytes(b"junk")
    args = ["--input", str(tmp_path / "in"), "--model", str(tiny_checkpoint), "--engine", "fakes:EchoEngine"]
    assert run([*args, "--output", str(tmp_path / "a"), "--max-error-rate", "0.5"]) == 1
    assert "--max-error-rate" in capsys.readouterr().err
    assert run([*args, "--output", str(tmp_path / "b"), "--max-error-rate", "0.7"]) == 0


def test_jsonl_output(tmp_path, tiny_checkpoint, ray_local):
    _images(tmp_path / "in", [(30, 30), (60, 20)])
    code = run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
                "--engine", "fakes:EchoEngine", "--format", "jsonl", "--prompt", "what?"])
    assert code == 0
    lines = (tmp_path / "out" / "part-000000.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == ["img_000.png", "img_001.png"]
    assert rows[1]["text"] == "what? | 60x20" and rows[1]["error"] is None


def test_rerun_after_the_driver_is_killed_completes_without_duplicates(tmp_path, tiny_checkpoint):
    n = 24
    _images(tmp_path / "in", [(20 + i, 20) for i in range(n)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.caption", "--input", str(tmp_path / "in"), "--output", str(out),
           "--model", str(tiny_checkpoint), "--engine", "fakes:EchoEngine", "--shard-size", "2", "--batch-size", "2",
           "--batches-in-flight", "1", "--engine-args", '{"delay_s": 0.4}']
    env = subprocess_env(RAY_DATA_DISABLE_PROGRESS_BARS="1")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-run, without any chance to clean up
    first.wait()
    done_before = len(list(out.glob("part-*.parquet")))
    assert 2 <= done_before < n // 2, "the first run should have been killed part-way"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"{n // 2 - done_before} of {n // 2} shards to do" in second.stdout
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == [f"img_{i:03d}.png" for i in range(n)]  # none missing, none twice
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == n and summary["processed_images"] == n - 2 * done_before


def test_an_engine_that_cannot_be_built_fails_the_job_with_its_error(tmp_path, tiny_checkpoint):
    """A constructor error (e.g. an option lmdeploy does not know) is one clear line and exit code 1."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.caption", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
         "--model", str(tiny_checkpoint), "--engine", "fakes:UnbuildableEngine", "--engine-args", '{"num_gpu_blockz": 8}'],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=subprocess_env(RAY_DATA_DISABLE_PROGRESS_BARS="1"),
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("error: the engine could not start: TypeError: UnbuildableEngine.__init__() got an unexpected keyword "
            "argument 'num_gpu_blockz'") in proc.stderr
    # that line, not Ray's tracebacks of the actor (it printed about 190 lines before; issue 10 item 15)
    assert "Traceback" not in proc.stdout + proc.stderr and len((proc.stdout + proc.stderr).splitlines()) < 20
