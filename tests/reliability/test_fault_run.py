"""The fault run (issue 10, docs/reliability.md): one job over a loopback S3 while things break.

Inputs and output live on moto's S3 server, reached only through a fault-injecting proxy
(tests/fault_proxy.py) that fails 5% of all reads (GET and HEAD: listing, images, the output's own
files) with 503 SlowDown, 500 InternalError or a dropped connection. Meanwhile:

1. run 1: engine actors die (`fakes:ExitingEngine`, `os._exit` on the job's batches 3, 7 and 12, in
   whichever actor and run they fall; Ray Data starts a new actor and retries the batch), and the
   driver is killed with SIGKILL part-way;
2. run 2 (the same command): the object store starts refusing the part files' PUTs with 403
   AccessDenied after two of them, as when a bucket policy changes mid-run: the job must stop with one
   line and exit 1, keeping the shards it finished;
3. run 3 (the same command, writes allowed again): completes.

Run 1 is a child process (its driver is killed); runs 2 and 3 call the CLI's `run()` in this process
on the tests' Ray instance, which saves two Ray start-ups (the same code path minus `sys.exit`).

Then every input is in the output exactly once, no row is an error (transient read failures were
retried, not recorded), the three engine deaths happened, and the shards of runs 1 and 2 were not
rewritten. The figures are printed (`-s`) and, with RAYLENS_FAULT_REPORT=path, written as JSON.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import image_bytes, subprocess_env
from fault_proxy import FaultProxy, random_read_faults
from jobs.caption import run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 64
BATCH = 4
SHARD = 8
KILL_AT = (3, 7, 12)
READ_FAULT_RATE = 0.05
ALLOWED_PART_PUTS_IN_RUN_2 = 2


def _part_keys(s3, bucket: str) -> dict[str, str]:
    """part file key -> ETag, read from moto directly (not through the proxy)."""
    found = s3.client.list_objects_v2(Bucket=bucket, Prefix="out/part-").get("Contents", [])
    return {o["Key"]: o["ETag"] for o in found}


class _PermissionWithdrawn:
    """Reads fail as `reads` says; part-file PUTs are refused with 403 after `allowed` of them."""

    def __init__(self, reads, allowed: int) -> None:
        self.reads, self.allowed, self.lock = reads, allowed, threading.Lock()

    def __call__(self, method: str, path: str) -> str | None:
        if method == "PUT" and "/out/part-" in path:
            with self.lock:
                self.allowed -= 1
                return "403" if self.allowed < 0 else None
        return self.reads(method, path)


def test_exactly_once_through_engine_deaths_a_killed_driver_flaky_reads_and_a_refused_write(
        tmp_path, local_s3, tiny_checkpoint, ray_local, monkeypatch, capsys):
    bucket = local_s3.new_bucket("faultrun")
    ids = [f"img_{i:03d}.png" for i in range(N_IMAGES)]
    for i, name in enumerate(ids):
        local_s3.put(bucket, f"in/{name}", image_bytes((20 + i, 16)))
    kill_dir = tmp_path / "kills"
    kill_dir.mkdir()
    figures: dict = {"inputs": N_IMAGES, "shards": N_IMAGES // SHARD, "batch_size": BATCH, "kill_at_batches": list(KILL_AT),
                     "read_fault_rate": READ_FAULT_RATE}
    start = time.monotonic()

    with FaultProxy(local_s3.endpoint, random_read_faults(READ_FAULT_RATE, seed=10)) as proxy:
        aws = dict(AWS_ACCESS_KEY_ID=local_s3.settings.access_key, AWS_SECRET_ACCESS_KEY=local_s3.settings.secret_key,
                   AWS_REGION=local_s3.settings.region, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        env = subprocess_env(RAY_DATA_DISABLE_PROGRESS_BARS="1", **aws)
        args = ["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                "--model", str(tiny_checkpoint), "--engine", "fakes:ExitingEngine",
                "--batch-size", str(BATCH), "--shard-size", str(SHARD), "--batches-in-flight", "1",
                "--engine-retries", "3",  # a batch could meet all three deaths and must still finish
                "--engine-args", json.dumps({"delay_s": 0.2, "kill_dir": str(kill_dir), "kill_at": list(KILL_AT)})]

        # -- run 1: killed with SIGKILL once a few shards are written
        log = open(tmp_path / "run1.log", "w")
        first = subprocess.Popen([sys.executable, "-m", "jobs.caption", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_part_keys(local_s3, bucket)) < 2 and first.poll() is None:
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
        after_1 = _part_keys(local_s3, bucket)
        figures["run1"] = {"killed_at_s": round(time.monotonic() - start, 1), "shards_done": len(after_1)}
        assert 2 <= len(after_1) < N_IMAGES // SHARD, "run 1 should have been killed part-way:\n" + \
            (tmp_path / "run1.log").read_text()[-3000:]

        # -- run 2: the store withdraws write permission after two more part files
        for name, value in aws.items():
            monkeypatch.setenv(name, value)
        proxy.policy = _PermissionWithdrawn(random_read_faults(READ_FAULT_RATE, seed=20), ALLOWED_PART_PUTS_IN_RUN_2)
        capsys.readouterr()
        code = run(args)  # returns its exit code: an exception escaping it fails the test
        after_2 = _part_keys(local_s3, bucket)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        figures["run2"] = {"exit_code": code, "shards_done": len(after_2), "error_line": errors[-1] if errors else None}
        assert code == 1, err[-3000:]
        assert len(errors) == 1 and errors[0].startswith(f"error: cannot write --output s3://{bucket}/out/"), err[-3000:]
        assert "ACCESS_DENIED" in errors[0] and "rerun the same command to resume" in errors[0]
        assert len(after_2) == len(after_1) + ALLOWED_PART_PUTS_IN_RUN_2
        assert all(after_2[k] == etag for k, etag in after_1.items())  # finished shards kept as they were

        # -- run 3: writes allowed again
        proxy.policy = random_read_faults(READ_FAULT_RATE, seed=30)
        code = run(args)  # returns its exit code: an exception escaping it fails the test
        out = capsys.readouterr().out
        figures["run3"] = {"exit_code": code, "shards_to_do": N_IMAGES // SHARD - len(after_2)}
        assert code == 0, out[-3000:]
        assert f"{N_IMAGES // SHARD - len(after_2)} of {N_IMAGES // SHARD} shards to do" in out
        figures["proxy"] = proxy.counts.snapshot()
    figures["wall_s"] = round(time.monotonic() - start, 1)

    after_3 = _part_keys(local_s3, bucket)
    assert all(after_3[k] == etag for k, etag in after_2.items())
    rows = []
    for key in sorted(after_3):
        body = local_s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        rows += pq.read_table(io.BytesIO(body), columns=["id", "error", "text"]).to_pylist()
    got = [r["id"] for r in rows]
    kills = (kill_dir / "kills.log").read_text().splitlines()
    figures["output"] = {"rows": len(rows), "distinct_ids": len(set(got)), "error_rows": sum(r["error"] is not None for r in rows)}
    figures["engine_deaths"] = len(kills)
    figures["batches_started"] = len(list(kill_dir.glob("batch-*")))
    faults = figures["proxy"]["faults"]
    figures["read_faults_injected"] = sum(v for k, v in faults.items() if k != "403")
    _report(figures)

    assert sorted(got) == ids  # every input exactly once: none lost, none twice
    assert [r["error"] for r in rows] == [None] * N_IMAGES  # transient failures retried, never error rows
    assert all(r["text"] and r["text"].endswith("x16") for r in rows)
    assert len(kills) == len(KILL_AT)  # three engine actors died
    assert figures["read_faults_injected"] >= 5  # the faults really happened (about 5% of reads)
    summary = json.loads(local_s3.client.get_object(Bucket=bucket, Key="out/_summary.json")["Body"].read())
    assert summary["rows"] == N_IMAGES and summary["failed"] == 0


def _report(figures: dict) -> None:
    print("\nfault run figures:\n" + json.dumps(figures, indent=2))
    path = os.environ.get("RAYLENS_FAULT_REPORT")
    if path:
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")
