"""Where the job may write and what --overwrite may delete (issue 10 items 1 and 4): no Ray needed,
every refusal happens in `setup()` before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import image_bytes
from jobs.caption import UsageError, run, setup
from jobs.caption_config import CaptionJobConfig
from jobs.caption_output import Location, output_overlap


def _images(root: Path, names=("a.png", "b.png")) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    files = {name: image_bytes((20 + i, 20)) for i, name in enumerate(names)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "inside", "inside-through-symlink", "input-is-symlink"])
def test_overwrite_refuses_an_output_that_overlaps_the_input_and_deletes_nothing(tmp_path, capsys, where):
    src = tmp_path / "x"
    _images(src)
    (tmp_path / "link").symlink_to(src)
    input_arg, output = {
        "same": (src, src),
        "parent": (src, tmp_path),
        "inside": (src, src / "out"),
        "inside-through-symlink": (src, tmp_path / "link" / "out"),
        "input-is-symlink": (tmp_path / "link", src),
    }[where]
    before = _snapshot(tmp_path)
    code = run(["--input", str(input_arg), "--output", str(output), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--output" in err[0] and "--input" in err[0]
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing written


def test_output_inside_a_folder_of_manifests_is_refused(tmp_path, capsys):
    """Item 4: the job's own .jsonl/.parquet part files would be read back as manifests on a rerun."""
    _images(tmp_path / "imgs")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "m.jsonl").write_text(json.dumps({"image": "../imgs/a.png"}) + "\n")
    code = run(["--input", str(manifests), "--output", str(manifests / "out"), "--format", "jsonl"])
    assert code == 2 and "inside --input" in capsys.readouterr().err
    assert not (manifests / "out").exists()
    # beside the folder is fine, and a single manifest file's folder may hold the output
    setup(CaptionJobConfig(input=str(manifests), output=str(tmp_path / "out"), format="jsonl"))
    setup(CaptionJobConfig(input=str(manifests / "m.jsonl"), output=str(manifests / "out2"), format="jsonl"))


@pytest.mark.parametrize("input_loc, output_loc, problem", [
    (("s3", "b/in"), ("s3", "b/in"), "is --input"),
    (("s3", "b/in"), ("s3", "b/in/out"), "inside --input"),
    (("s3", "b/in"), ("s3", "b"), "contains --input"),
    (("s3", "b/in"), ("s3", "b/in-captions"), None),  # a sibling prefix, not a folder below
    (("s3", "b/in"), ("s3", "other/in"), None),
    (("s3", "b/in"), ("local", "/b/in"), None),
    (("local", "/"), ("local", "/tmp/out"), "inside --input"),
    (("local", "/data/m.jsonl"), ("local", "/data"), "contains --input"),
])
def test_output_overlap_compares_buckets_prefixes_and_paths_by_component(input_loc, output_loc, problem):
    found = output_overlap(Location(*input_loc), Location(*output_loc))
    assert (found is None) if problem is None else (problem in found), found


def test_overwrite_deletes_only_what_the_job_wrote(tmp_path):
    src = tmp_path / "in"
    _images(src)
    out = tmp_path / "out"
    cfg = CaptionJobConfig(input=str(src), output=str(out))
    setup(cfg)  # writes _manifest.json: the folder is now raylens output
    ours = ["part-000000.parquet", "part-000001.jsonl", "_summary.json", ".part-000002.parquet.tmp",
            "._manifest.json.tmp", ".raylens-write-check"]
    for name in ours:
        (out / name).write_bytes(b"ours")
    theirs = {"notes.txt": b"mine", "part-1.parquet": b"spark's", "sub/part-000003.parquet": b"below: not ours",
              "sub/_manifest.json": b"{}"}
    for name, data in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)

    setup(CaptionJobConfig(input=str(src), output=str(out), overwrite=True))

    left = _snapshot(out)
    assert {k: v for k, v in left.items() if k != "_manifest.json"} == theirs
    assert "_manifest.json" in left  # the new run's


def test_foreign_files_need_overwrite_which_keeps_them(tmp_path, capsys):
    src = tmp_path / "in"
    _images(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = run(["--input", str(src), "--output", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    setup(CaptionJobConfig(input=str(src), output=str(out), overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "_manifest.json").is_file()


def test_part_files_without_a_manifest_are_never_deleted_or_replaced(tmp_path, capsys):
    """Files named like ours but no _manifest.json: not ours, so not even --overwrite touches them."""
    src = tmp_path / "in"
    _images(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-000000.parquet").write_bytes(b"someone else's")
    for extra in ([], ["--overwrite"]):
        code = run(["--input", str(src), "--output", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "part-000000.parquet" in err, err
    assert (out / "part-000000.parquet").read_bytes() == b"someone else's"


def test_a_corrupt_manifest_file_is_a_one_line_refusal(tmp_path, capsys):
    src = tmp_path / "in"
    _images(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text("{not json")
    code = run(["--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "_manifest.json" in err[0]
    with pytest.raises(UsageError):
        setup(CaptionJobConfig(input=str(src), output=str(out)))
