"""A rerun resumes only the work that produced the output (issue 10 item 2), and what it finds there is
checked before it is trusted (item 6). `setup()` writes `_manifest.json`, so no Ray is needed here."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import image_bytes
from jobs.caption import UsageError, pending_rows, setup, summarize
from jobs.caption_config import CaptionJobConfig
from jobs.caption_output import shard_file
from jobs.caption_stages import output_schema


def _images(root: Path, n: int = 3) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img_{i}.png").write_bytes(image_bytes((20 + i, 20)))


def _config(src: Path, out: Path, **flags) -> CaptionJobConfig:
    return CaptionJobConfig(input=str(src), output=str(out), **flags)


def _refusal(cfg: CaptionJobConfig) -> str:
    with pytest.raises(UsageError) as exc:
        setup(cfg)
    message = str(exc.value)
    assert "\n" not in message and "--overwrite" in message
    return message


@pytest.mark.parametrize("flags, named", [
    ({"max_new_tokens": 100}, "--max-new-tokens: 64 -> 100"),
    ({"temperature": 0.7}, "--temperature: 0.0 -> 0.7"),
    ({"top_p": 0.5}, "--top-p: 1.0 -> 0.5"),
    ({"seed": 3}, "--seed: None -> 3"),
    ({"ignore_eos": True}, "--ignore-eos: False -> True"),
    ({"max_tiles": 1}, "--max-tiles: 2 -> 1"),
    ({"prompt": ["Other?"]}, "--prompt"),
    ({"format": "jsonl"}, "--format: 'parquet' -> 'jsonl'"),
    ({"shard_size": 2}, "--shard-size: 256 -> 2"),
    ({"max_pixels": 1000}, "--max-pixels"),
    ({"fast_jpeg_decode": True}, "--fast-jpeg-decode: (not recorded) -> True"),
    ({"alpha_background": "white"}, "--alpha-background: (not recorded) -> [255, 255, 255]"),
])
def test_a_rerun_with_other_output_settings_is_refused_naming_them(tmp_path, flags, named):
    _images(tmp_path / "in")
    setup(_config(tmp_path / "in", tmp_path / "out"))
    message = _refusal(_config(tmp_path / "in", tmp_path / "out", **flags))
    assert named in message, message


def test_every_differing_field_is_named(tmp_path):
    _images(tmp_path / "in")
    setup(_config(tmp_path / "in", tmp_path / "out"))
    message = _refusal(_config(tmp_path / "in", tmp_path / "out", max_new_tokens=10, seed=1, max_tiles=1))
    assert "--max-new-tokens: 64 -> 10" in message and "--seed: None -> 1" in message and "--max-tiles: 2 -> 1" in message


def test_settings_that_do_not_change_the_output_do_not_block_a_resume(tmp_path):
    _images(tmp_path / "in")
    setup(_config(tmp_path / "in", tmp_path / "out"))
    setup(_config(tmp_path / "in", tmp_path / "out", batch_size=3, replicas="1:4", engine_retries=0, batches_in_flight=2,
                  gpus_per_replica=0.5, max_error_rate=0.1, engine="transformers", engine_args='{"x": 1}'))
    setup(_config(tmp_path / "in", tmp_path / "out", max_tiles=2))  # the checkpoint's own value, spelt out


def test_another_folder_with_the_same_file_names_is_refused(tmp_path):
    _images(tmp_path / "in")
    shutil.copytree(tmp_path / "in", tmp_path / "copy")
    setup(_config(tmp_path / "in", tmp_path / "out"))
    assert "--input" in _refusal(_config(tmp_path / "copy", tmp_path / "out"))


def test_images_changed_in_place_are_refused(tmp_path):
    _images(tmp_path / "in")
    setup(_config(tmp_path / "in", tmp_path / "out"))
    (tmp_path / "in" / "img_1.png").write_bytes(image_bytes((99, 99)))  # same name, other image
    assert "input files" in _refusal(_config(tmp_path / "in", tmp_path / "out"))


def test_the_same_folder_reached_through_a_symlink_resumes(tmp_path):
    _images(tmp_path / "in")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    setup(_config(tmp_path / "in", tmp_path / "out"))
    setup(_config(tmp_path / "link", tmp_path / "out"))


def test_another_manifest_with_the_same_name_and_row_count_is_refused(tmp_path):
    _images(tmp_path / "imgs")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"imgs/img_{i}.png", "label": "a"}) + "\n" for i in range(3)))
    setup(_config(manifest, tmp_path / "out"))
    manifest.write_text("".join(json.dumps({"image": f"imgs/img_{2 - i}.png", "label": "a"}) + "\n" for i in range(3)))
    assert "--input" in _refusal(_config(manifest, tmp_path / "out"))
    # a manifest edited in place to the very same rows resumes (its bytes, not its date, are compared)
    manifest.write_text("".join(json.dumps({"image": f"imgs/img_{i}.png", "label": "a"}) + "\n" for i in range(3)))
    os.utime(manifest, (1, 1))
    setup(_config(manifest, tmp_path / "out"))


def test_another_model_is_refused(tmp_path, tiny_checkpoint):
    _images(tmp_path / "in")
    setup(_config(tmp_path / "in", tmp_path / "out"))
    message = _refusal(_config(tmp_path / "in", tmp_path / "out", model=str(tiny_checkpoint), max_tiles=2))
    assert "--model" in message and str(tiny_checkpoint) in message


def test_a_model_whose_weights_changed_is_refused(tmp_path, tiny_checkpoint):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    _images(tmp_path / "in")
    setup(_config(tmp_path / "in", tmp_path / "out", model=str(model)))
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a fine-tune changes weights, not names or sizes
    weights.write_bytes(bytes(data))
    assert "--model" in _refusal(_config(tmp_path / "in", tmp_path / "out", model=str(model)))


def test_output_of_an_older_raylens_is_refused_not_trusted(tmp_path):
    _images(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_manifest.json").write_text(json.dumps(
        {"num_inputs": 3, "shard_size": 256, "inputs_sha256": "0" * 64, "prompts": ["x"], "format": "parquet"}))
    _refusal(_config(tmp_path / "in", tmp_path / "out"))


# ---------------------------------------------------------------------------------------- item 6
def _write_part(plan, shard: int, rows: int) -> Path:
    table = pa.Table.from_pylist([{"id": f"img_{i}.png", "prompt_index": 0} for i in range(rows)],
                                 schema=pa.schema([("id", pa.string()), ("prompt_index", pa.int32())]))
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in output_schema(plan.extra_fields).names} for row in table.to_pylist()],
        schema=output_schema(plan.extra_fields))
    path = Path(plan.out_root) / shard_file(shard, plan.config.format)
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "too-few-rows", "other-columns"])
def test_a_damaged_part_file_is_redone_not_trusted(tmp_path, damage, caplog):
    _images(tmp_path / "in", 4)
    plan = setup(_config(tmp_path / "in", tmp_path / "out", shard_size=2))
    good = _write_part(plan, 0, 2)
    bad = _write_part(plan, 1, 2)
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-30])
    elif damage == "garbage":
        bad.write_bytes(b"PAR1 this is not parquet PAR1")
    elif damage == "too-few-rows":
        _write_part(plan, 1, 1)
    else:
        pq.write_table(pa.table({"id": ["a", "b"]}), bad)
    plan = setup(_config(tmp_path / "in", tmp_path / "out", shard_size=2))
    rows, expected = pending_rows(plan)
    assert expected == {1: 2} and [r["id"] for r in rows] == ["img_2.png", "img_3.png"]
    assert bad.name in caplog.text
    assert good.is_file()
    summary = summarize(plan, {"wall_s": 0.0, "processed_images": 0, "engine": "transformers"})  # never crashes
    if damage != "too-few-rows":  # (that one reads back fine: it is only short)
        assert summary["rows"] == 2 and summary["unreadable_parts"] == [bad.name]


def test_a_damaged_jsonl_part_file_is_redone(tmp_path):
    _images(tmp_path / "in", 2)
    plan = setup(_config(tmp_path / "in", tmp_path / "out", shard_size=1, format="jsonl"))
    names = output_schema(plan.extra_fields).names
    (tmp_path / "out" / "part-000000.jsonl").write_text(json.dumps(dict.fromkeys(names)) + "\n")
    (tmp_path / "out" / "part-000001.jsonl").write_text(json.dumps(dict.fromkeys(names))[:-5])
    rows, expected = pending_rows(plan)
    assert expected == {1: 1}
