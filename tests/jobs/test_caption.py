"""The caption job end to end on a local Ray instance: one row per input file, errors as data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import bomb_png, image_bytes
from jobs.caption import SUMMARY_FILE, main, run, setup
from jobs.caption_config import CaptionJobConfig
from raylens.demo.shapes import format_caption

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "red.png": image_bytes((64, 48)),
    "nested/deeper/blue.JPG": image_bytes((300, 200), (20, 20, 220), "JPEG"),
    "with space/grün bild.webp": image_bytes((40, 90), (20, 200, 20), "WEBP"),
    "gray.bmp": image_bytes((33, 33), 128, "BMP", mode="L"),
    "tiny.gif": image_bytes((1, 1), 7, "GIF", mode="P"),
    "panorama.png": image_bytes((8000, 40)),
}
BAD = {
    "empty.png": (b"", "ImageError(empty)"),
    "not-an-image.jpg": (b"this is text, not a JPEG", "ImageError(not_an_image)"),
    "truncated.png": (image_bytes((256, 256), (1, 2, 3))[:200], "ImageError("),
    "bomb.png": (bomb_png(), "ImageError(too_large)"),
}


def _write_inputs(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out)
    rows = table.to_pylist()
    return {r["id"]: r for r in rows}


def test_good_and_bad_images_give_one_row_each(tmp_path, tiny_checkpoint, ray_local):
    src = tmp_path / "in"
    _write_inputs(src, {**GOOD, **{k: v[0] for k, v in BAD.items()}})
    (src / "README.txt").write_text("not an image extension: not an input")
    out = tmp_path / "out"
    cfg = CaptionJobConfig(input=str(src), output=str(out), model=str(tiny_checkpoint), engine="transformers",
                           max_new_tokens=4, batch_size=4, max_tiles=2, shard_size=4)
    summary = main(setup(cfg))

    rows = _rows(out)
    assert set(rows) == set(GOOD) | set(BAD)  # exactly once: no duplicates (dict) and none missing
    assert pq.read_table(out).num_rows == len(GOOD) + len(BAD)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    for rel in GOOD:
        r = rows[rel]
        assert r["error"] is None, r
        assert r["text"] is not None and r["num_input_tokens"] > 0 and r["num_output_tokens"] >= 1
        assert r["image"] == str(src / rel) and r["model"] == str(tiny_checkpoint)
        assert 1 <= r["num_tiles"] <= 3
    for rel, (_, prefix) in BAD.items():
        r = rows[rel]
        assert r["text"] is None and r["error"].startswith(prefix), r
        assert r["stage"] == "decode" and r["error_kind"].startswith("image."), r
    assert all(rows[rel]["error_kind"] is None for rel in GOOD)
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk["rows"] == summary["rows"] == len(GOOD) + len(BAD)
    assert on_disk["succeeded"] == len(GOOD) and on_disk["failed"] == len(BAD)
    assert on_disk["errors_by_kind"]["image.too_large"] == 1
    assert on_disk["errors_by_kind"]["image.empty"] == 1 and on_disk["errors_by_kind"]["image.not_an_image"] == 1
    assert on_disk["images_per_s"] > 0


def test_tiles_made_in_the_cpu_stage_give_the_same_rows(tmp_path, tiny_checkpoint, ray_local):
    """--tiles-on-cpu moves cutting and normalising out of the engine actor; every row stays what it was."""
    src = tmp_path / "in"
    _write_inputs(src, {**GOOD, "empty.png": b""})
    results = {}
    for on_cpu in (False, True):
        out = tmp_path / f"out-{on_cpu}"
        cfg = CaptionJobConfig(input=str(src), output=str(out), model=str(tiny_checkpoint), engine="transformers",
                               max_new_tokens=6, batch_size=3, max_tiles=4, tiles_on_cpu=on_cpu)
        main(setup(cfg))
        results[on_cpu] = {k: (r["text"], r["num_tiles"], r["num_input_tokens"], r["error_kind"]) for k, r in _rows(out).items()}
    assert results[True] == results[False]
    assert results[True]["empty.png"][3] == "image.empty" and results[True]["red.png"][0]


def test_only_bad_images_exit_1(tmp_path, tiny_checkpoint, ray_local):
    src = tmp_path / "in"
    _write_inputs(src, {"a.png": b"", "b.jpg": b"nope"})
    code = run(["--input", str(src), "--output", str(tmp_path / "out"), "--model", str(tiny_checkpoint), "--engine", "transformers"])
    assert code == 1
    assert len(_rows(tmp_path / "out")) == 2


def test_missing_input_exits_2_with_one_line(tmp_path, capsys):
    code = run(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--input" in err[0]


def test_unwritable_output_exits_2(tmp_path, capsys):
    _write_inputs(tmp_path / "in", {"a.png": image_bytes()})
    (tmp_path / "file").write_text("x")
    code = run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write --output" in err


def test_output_with_foreign_files_needs_overwrite(tmp_path, capsys):
    _write_inputs(tmp_path / "in", {"a.png": image_bytes()})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_bytes(b"not ours")
    code = run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_empty_input_dir_exits_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    code = run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert code == 2 and "no image files" in capsys.readouterr().err


def _caption_parts(name: str) -> tuple[str, str, str]:
    color, shape, _, background = Path(name).stem.split("_")  # files are named after their caption
    return color, shape, background


@pytest.mark.slow
def test_quick_start_command_captions_the_examples_with_the_demo_model(tmp_path):
    """The README's first command, as a user runs it: a fresh process that starts its own Ray."""
    out = tmp_path / "captions"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.caption", "--input", str(REPO / "examples" / "images"), "--output", str(out), "--overwrite"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo model" in proc.stdout and "OpenGVLab/InternVL2-2B" in proc.stdout
    assert "summary:" in proc.stdout
    rows = _rows(out)
    examples = sorted(p.name for p in (REPO / "examples" / "images").iterdir())
    assert sorted(rows) == examples
    for name, r in rows.items():
        assert r["error"] is None
        assert r["text"] == format_caption(*_caption_parts(name)), (name, r["text"])


@pytest.mark.gpu
@pytest.mark.parametrize("layout, gpus_needed", [
    ([], 1),
    (["--replicas", "2", "--gpus-per-replica", "0.5"], 1),  # two engines share one GPU
    (["--replicas", "2"], 2),  # one engine per GPU
    (["--gpus-per-replica", "2"], 2),  # one engine over two GPUs (lmdeploy tp=2 in the actor's placement group)
    (["--no-tiles-on-cpu"], 1),  # tiles made by the engine actor instead of the CPU stage (bf16 there by default)
], ids=["one-gpu", "two-engines-one-gpu", "two-gpus", "tensor-parallel-2", "tiles-in-engine"])
def test_job_on_gpu_with_lmdeploy_engine(tmp_path, layout, gpus_needed):
    """The same job on the GPU machine: GPU actors running the lmdeploy engine, demo model, in each layout
    the CLI offers. lmdeploy's KV-cache sizing is left to the engine (capped at what the model can use)."""
    import torch

    if torch.cuda.device_count() < gpus_needed:
        pytest.skip(f"needs {gpus_needed} GPUs, this machine has {torch.cuda.device_count()}")
    out = tmp_path / "captions"
    env = {**__import__("os").environ, "LMDEPLOY_SKIP_WARMUP": "1", "LMDEPLOY_ENABLE_CHECK_ENV": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.caption", "--input", str(REPO / "examples" / "images"), "--output", str(out),
         "--engine", "lmdeploy", "--batch-size", "4", *layout],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == len(list((REPO / "examples" / "images").iterdir()))
    assert all(r["error"] is None and r["text"].endswith("background.") for r in rows.values()), rows
    right = sum(r["text"] == format_caption(*_caption_parts(name)) for name, r in rows.items())
    assert right >= len(rows) - 2, rows  # the demo model's captions, allowing bf16 kernels a near miss


TP_JOB = """
import sys
import ray
from ray.util import placement_group_table
from jobs.caption import run

ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)  # logical GPUs: the job's layout, not CUDA
rc = run(sys.argv[1:])
print("RC", rc, "GROUPS", len(placement_group_table()))
"""


def test_tensor_parallel_layout_gets_one_placement_group_per_engine(tmp_path, tiny_checkpoint):
    """`--gpus-per-replica 2` puts each engine actor in its own group of 2 GPU bundles, and only that: an
    extra group (Ray Data calls `ray_remote_args_fn` outside actor creation too) used to be waited for
    and hung the job. Run in a child process with its own Ray, whose 2 GPUs are logical."""
    from conftest import subprocess_env

    out = tmp_path / "captions"
    proc = subprocess.run(
        [sys.executable, "-c", TP_JOB, "--input", str(REPO / "examples" / "images"), "--output", str(out),
         "--model", str(tiny_checkpoint), "--engine", "fakes:EchoEngine", "--gpus-per-replica", "2",
         "--batch-size", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert "RC 0 GROUPS 1" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == len(list((REPO / "examples" / "images").iterdir()))
    assert all(r["error"] is None for r in rows.values()), rows
