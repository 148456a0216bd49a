"""Which Ray the job runs on and what it prints (issue 10 items 12 and 15)."""
from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import image_bytes, subprocess_env
from jobs.caption import run
from jobs.caption_runtime import configure_logging, failure_message, ray_address

REPO = Path(__file__).resolve().parents[2]
BARE_INIT = "import os, ray; ray.init(); print('JOINED', os.getpid(), ray.get_runtime_context().gcs_address)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_job_does_not_join_another_ray_on_the_machine_and_prints_no_ray_noise(tmp_path, tiny_checkpoint, ray_local):
    """A Ray that `ray start` left on the machine is what a bare `ray.init()` joins (through the address
    file in Ray's temp dir). Here that Ray is this test process's own instance, advertised in a private
    temp dir; the job must start its own instead, and its console must be the progress and the summary:
    no Ray deprecation warnings, no `E ... core_worker.cc` line, no token notice, no traceback."""
    from ray._private.state import jobs  # the GCS job table: the only record of which drivers joined

    ray_tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(ray_local.get_runtime_context().gcs_address)
        env = subprocess_env(RAY_TMPDIR=str(ray_tmp))
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)

        control = subprocess.run([sys.executable, "-c", BARE_INIT], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert "JOINED" in control.stdout, control.stderr[-2000:]  # a bare ray.init() would have joined it

        (tmp_path / "in").mkdir()
        for i in range(2):
            (tmp_path / "in" / f"{i}.png").write_bytes(image_bytes((20 + i, 20)))
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.caption", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
             "--model", str(tiny_checkpoint), "--engine", "fakes:EchoEngine", "--batch-size", "2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    console = stdout + stderr
    assert job.returncode == 0, console[-3000:]
    drivers = {j["DriverPid"] for j in jobs()}
    assert int(control.stdout.split()[1]) in drivers  # a driver that joined is seen here
    assert job.pid not in drivers
    assert "summary:" in stdout
    for noise in ("Deprecat", "core_worker.cc", "Token authentication is enabled", "Traceback", " E "):
        assert noise not in console, (noise, console[-3000:])
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["succeeded"] == 2


def test_an_unreachable_ray_address_is_one_line_in_seconds_before_any_work(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes())
    address = f"127.0.0.1:{_free_port()}"
    code = run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--ray-address", address])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert address in err[0] and "--ray-address local" in err[0]
    assert not (tmp_path / "out").exists()


def test_which_ray_the_job_uses():
    assert ray_address(None, {}) == "local"  # a private instance, never whatever runs on the machine
    assert ray_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"  # what `ray job submit` sets
    assert ray_address("local", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "local"  # the flag wins
    message = failure_message("10.0.0.1:6379", ConnectionError("GCS is gone\nmore detail"))
    assert "\n" not in message and "ConnectionError: GCS is gone" in message and "--ray-address local" in message


def test_log_level_shows_raylens_own_lines_through_a_handler_installed_at_run_time(capsys):
    probe = subprocess.run([sys.executable, "-c", "import logging, jobs.caption, jobs.caption_stages, jobs.caption_runtime; "
                            "print([h.name for n in ('raylens', 'jobs') for h in logging.getLogger(n).handlers])"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # nothing installed at import
    log = logging.getLogger("raylens.caption")
    try:
        configure_logging("INFO")
        log.info("KV cache: 0.5 of the GPU")
        configure_logging("WARNING")
        log.info("placement group abc")
        log.warning("a real warning")
    finally:
        configure_logging("WARNING")
    err = capsys.readouterr().err
    assert "INFO raylens.caption: KV cache: 0.5 of the GPU" in err
    assert "placement group" not in err and "WARNING raylens.caption: a real warning" in err
    assert err.count("a real warning") == 1  # one handler, however often it is configured


def test_ray_failing_mid_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """How `run()` reports Ray itself failing during the pipeline (a cluster or node that died): the
    failure is raised here by hand, since killing a real Ray under the test session would take the
    other tests' instance with it; what is tested is the CLI's answer to it."""
    import ray.exceptions

    import jobs.caption as caption

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes())

    def cluster_lost(plan):
        raise ray.exceptions.RaySystemError("System error: the GCS at 10.0.0.1:6379 is unreachable\nlong details")

    monkeypatch.setattr(caption, "main", cluster_lost)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "failed during the run" in err[0] and "a rerun resumes" in err[0] and "GCS" in err[0]
