"""A local output disk that fills up mid-run (docs/reliability.md): the job stops with one line and
exit 1, the shards it finished stay as they were, and the same command completes once there is room.

The disk is a real one: a 32 KiB tmpfs mounted on the output folder (room for the manifest and three
part files), grown with a remount before the rerun. Mounting needs CAP_SYS_ADMIN; where the tests
lack it the test is skipped, and test_fault_run's refused S3 write covers a failing output instead.
"""
from __future__ import annotations

import subprocess

import pyarrow.parquet as pq
import pytest

from conftest import image_bytes
from jobs.caption import run

pytestmark = pytest.mark.slow
N_IMAGES = 24
SHARD = 4


def _mount(path, options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount(disk, "size=32k")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_output_disk_stops_the_job_keeps_finished_shards_and_the_rerun_completes(
        tmp_path, small_disk, tiny_checkpoint, ray_local, capsys):
    (tmp_path / "in").mkdir()
    for i in range(N_IMAGES):
        (tmp_path / "in" / f"img_{i:03d}.png").write_bytes(image_bytes((20 + i, 10)))
    args = ["--input", str(tmp_path / "in"), "--output", str(small_disk), "--model", str(tiny_checkpoint),
            "--engine", "fakes:EchoEngine", "--shard-size", str(SHARD), "--batch-size", str(SHARD)]

    capsys.readouterr()
    assert run(args) == 1  # returned, not raised: no exception escaped the job
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write --output {small_disk}: "), err[-3000:]
    assert "No space left on device" in errors[0] and "rerun the same command to resume" in errors[0]
    kept = {p.name: p.read_bytes() for p in small_disk.glob("part-*.parquet")}
    with capsys.disabled():  # the figure docs/reliability.md quotes
        print(f"\ndisk full: {len(kept)} of {N_IMAGES // SHARD} shards written before it; {errors[0]}")
    assert 1 <= len(kept) < N_IMAGES // SHARD

    assert subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)]).returncode == 0
    assert run(args) == 0
    assert f"{N_IMAGES // SHARD - len(kept)} of {N_IMAGES // SHARD} shards to do" in capsys.readouterr().out
    assert all((small_disk / name).read_bytes() == data for name, data in kept.items())
    ids = pq.read_table(small_disk, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"img_{i:03d}.png" for i in range(N_IMAGES)]
