"""The job over inputs from strangers (issue 10 items 3, 5, 7, 9, 11): every bad row is an error row
of its own kind, nothing outside the manifest's folder is read unless --image-root allows it, and
odd trees (link loops, names that are not UTF-8) list each image once."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from conftest import image_bytes
from jobs.caption import main, run, setup
from jobs.caption_config import CaptionJobConfig


def _job(tmp_path, tiny_checkpoint, input_path, **kwargs):
    cfg = CaptionJobConfig(input=str(input_path), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                           engine="fakes:EchoEngine", prompt=["what?"], overwrite=True, **kwargs)
    summary = main(setup(cfg))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    return summary, rows


def test_manifest_rows_outside_the_manifest_folder_fifos_and_bad_lines_are_error_rows(tmp_path, tiny_checkpoint, ray_local):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "data" / "imgs" / "ok.png").write_bytes(image_bytes((40, 30)))
    (tmp_path / "secret" / "s.png").write_bytes(image_bytes((50, 20)))
    os.mkfifo(tmp_path / "data" / "imgs" / "fifo.png")
    lines = [json.dumps({"image": "imgs/ok.png", "n": 0}), json.dumps({"image": "../secret/s.png", "n": 1}),
             json.dumps({"image": "/proc/self/environ", "n": 2}), json.dumps({"image": "imgs/fifo.png", "n": 3}),
             '{"image": "imgs/ok.png", "n": ', json.dumps({"image": str(tmp_path / "secret" / "s.png"), "n": 5})]
    (tmp_path / "data" / "list.jsonl").write_text("\n".join(lines) + "\n")

    summary, rows = _job(tmp_path, tiny_checkpoint, tmp_path / "data" / "list.jsonl")
    errors = {i: (rows[f"list.jsonl:{i}"]["error"] or "").split(":")[0] for i in range(6)}
    assert errors == {0: "", 1: "SourceError(outside_root)", 2: "SourceError(outside_root)",
                      3: "SourceError(not_a_file)", 4: "SourceError(bad_row)", 5: "SourceError(outside_root)"}
    assert rows["list.jsonl:0"]["text"] == "what? | 40x30"
    assert "line 5 is not valid JSON" in rows["list.jsonl:4"]["error"]
    assert rows["list.jsonl:4"]["stage"] == "read" and rows["list.jsonl:4"]["n"] is None
    assert summary["rows"] == 6 and summary["succeeded"] == 1

    summary, rows = _job(tmp_path, tiny_checkpoint, tmp_path / "data" / "list.jsonl",
                         image_root=[str(tmp_path / "secret")])
    assert rows["list.jsonl:1"]["text"] == rows["list.jsonl:5"]["text"] == "what? | 50x20"
    assert summary["succeeded"] == 3


def test_a_tree_with_link_loops_and_an_undecodable_name_lists_each_image_once(tmp_path, tiny_checkpoint, ray_local):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(image_bytes((20, 10)))
    (src / "sub" / "b.png").write_bytes(image_bytes((30, 10)))
    with open(os.path.join(os.fsencode(src), b"caf\xe9.png"), "wb") as f:
        f.write(image_bytes((40, 10)))
    os.symlink(".", src / "loop")
    os.symlink("..", src / "sub" / "up")
    summary, rows = _job(tmp_path, tiny_checkpoint, src)
    assert sorted(rows) == ["a.png", "caf\\xe9.png", "sub/b.png"]
    assert rows["caf\\xe9.png"]["text"] == "what? | 40x10"
    assert rows["caf\\xe9.png"]["image"] == f"file://{src}/caf%E9.png"
    assert summary["failed"] == 0


def test_repeated_csv_columns_and_misplaced_image_roots_exit_2_with_one_line(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "m.csv").write_text("image,label,label\na.png,cat,dog\n")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(image_bytes())
    common = ["--output", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert run(["--input", str(tmp_path / "m.csv"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read --input") and "repeats column names ('label' is columns 2, 3)" in err
    assert len(err.splitlines()) == 1
    assert run(["--input", str(tmp_path / "imgs"), "--image-root", str(tmp_path), *common]) == 2
    assert "--image-root widens what manifest rows may read" in capsys.readouterr().err
