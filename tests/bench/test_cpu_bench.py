"""The CPU part of the benchmark runs (small) in CI, so a regression shows in its printed table.

It asserts that the benchmark produced sane measurements, never how fast they are.
"""
import json

from bench.cpu import main


def test_cpu_benchmark_reports_preprocessing_and_pipeline_overhead(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["--seconds", "0.2", "--images", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["preprocessing_one_core"]
    assert {(r["image"], r["max_tiles"]) for r in rows} >= {("640x480", 1), ("4032x3024", 12)}
    assert all(r["decode_grid_downscale_per_s"] > 0 and r["tile_normalise_per_s"] > 0 and r["fast_jpeg_per_s"] > 0
               for r in rows)
    # The fast path only differs where it drafts (a JPEG at least twice its canvas in both dimensions).
    assert next(r for r in rows if r["image"] == "640x480" and r["max_tiles"] == 1)["fast_max_levels"] == 0
    assert next(r for r in rows if r["image"] == "4032x3024" and r["max_tiles"] == 1)["fast_max_levels"] > 0
    assert next(r for r in rows if r["image"] == "640x480" and r["max_tiles"] == 12)["tiles"] == 13
    overhead = result["pipeline_overhead"]
    assert overhead["images"] == 8 and overhead["ray_job_images_per_s"] > 0 and overhead["direct_images_per_s"] > 0
    print(capsys.readouterr().out)  # the table, in CI's log
