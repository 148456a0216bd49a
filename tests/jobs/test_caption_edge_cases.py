"""Odd inputs and flags that used to give a traceback or bad output (issue 10 items 10, 13, 14, 16).

The stages run here in-process, without Ray (`prepare_batch`, `GenerateStage` with the fake engine,
`ShardWriter`): what is tested is what the job does with the rows, not Ray's scheduling."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import image_bytes
from jobs.caption import UsageError, main, pending_rows, run, setup
from jobs.caption_config import CaptionJobConfig
from jobs.caption_output import SUMMARY_FILE, ShardWriter
from jobs.caption_stages import LISTING_SCHEMA, GenerateStage, output_schema, prepare_batch
from raylens.engines.base import SamplingParams
from raylens.fetch import UrlFetcher
from raylens.sources import SourceFilesystems

BIG = 2**70  # beyond int64 and uint64


def _run_stages_in_process(plan) -> None:
    """What the job's pipeline does for these rows, one batch, with the fake engine and no Ray."""
    rows, expected = pending_rows(plan)
    listing = pa.Table.from_pylist(rows, schema=pa.schema(list(LISTING_SCHEMA) + list(plan.extra_fields)))
    prepared = prepare_batch(listing, filesystems=SourceFilesystems.create(plan.s3, roots=plan.read_roots),
                             fetcher=UrlFetcher(), tiling=plan.tiling, max_pixels=plan.config.max_pixels)
    stage = GenerateStage(engine="fakes:EchoEngine", model=plan.config.model, s3=plan.s3, model_name=plan.model_name,
                          engine_options={}, params=SamplingParams(), prompts=list(plan.config.prompt),
                          use_question_column=False, extra_fields=plan.extra_fields)
    writer = ShardWriter(plan.out_fs, plan.out_root, plan.config.format, expected, output_schema(plan.extra_fields))
    writer.add(asyncio.run(stage(prepared)))
    assert not writer.incomplete()


def _manifest(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "a.png").write_bytes(image_bytes((30, 20)))
    path = tmp_path / "m.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_clashing_column_names_huge_integers_and_nan_give_rows_not_tracebacks(tmp_path):
    """`text` beside `input.text` (our `text` renames the first), an integer above 2^63, and NaN/Infinity
    in a float column, written as JSON Lines: strict JSON, every value kept."""
    manifest = _manifest(tmp_path, [
        f'{{"image": "a.png", "text": "t0", "input.text": "u0", "big": {BIG}, "f": NaN, "g": 1}}',
        '{"image": "a.png", "text": "t1", "input.text": "u1", "big": 7, "f": 1.5, "g": Infinity}',
    ])
    plan = setup(CaptionJobConfig(input=str(manifest), output=str(tmp_path / "out"), format="jsonl", prompt=["?"],
                                  model=None))
    names = [f.name for f in plan.extra_fields]
    assert len(names) == len(set(names)) and {"input.text", "input.input.text", "big", "f", "g"} <= set(names)
    assert plan.extra_names == {"text": "input.input.text", "input.text": "input.text", "big": "big", "f": "f", "g": "g"}
    _run_stages_in_process(plan)

    def strict(constant):
        raise AssertionError(f"bare {constant} in JSON Lines output")

    lines = (tmp_path / "out" / "part-000000.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=strict) for line in lines]
    assert [r["text"] for r in rows] == ["? | 30x20"] * 2  # our column, the model's answer
    assert [r["input.input.text"] for r in rows] == ["t0", "t1"] and [r["input.text"] for r in rows] == ["u0", "u1"]
    assert [r["big"] for r in rows] == [str(BIG), "7"]  # a column that does not fit 64 bits is text
    assert [r["f"] for r in rows] == [None, 1.5] and [r["g"] for r in rows] == [1.0, None]


def test_huge_integers_in_parquet_output_are_text(tmp_path):
    manifest = _manifest(tmp_path, [f'{{"image": "a.png", "big": {BIG}}}', '{"image": "a.png", "big": -3}'])
    plan = setup(CaptionJobConfig(input=str(manifest), output=str(tmp_path / "out"), prompt=["?"]))
    _run_stages_in_process(plan)
    assert pq.read_table(tmp_path / "out").column("big").to_pylist() == [str(BIG), "-3"]


@pytest.mark.parametrize("flags, says", [
    (["--max-new-tokens", "100000"], ["--max-new-tokens 100000", "context of 4096"]),
    (["--max-new-tokens", "4060"], ["--max-new-tokens 4060", "at most 4048"]),
    (["--max-new-tokens", "4000", "--max-tiles", "6", "--model", "{tiny}"], ["--max-tiles to at most 5"]),
])
def test_max_new_tokens_is_checked_against_the_context_up_front(tmp_path, capsys, tiny_checkpoint, flags, says):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes())
    flags = [f.format(tiny=tiny_checkpoint) for f in flags]
    code = run(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(s in err[0] for s in says), err[0]
    assert not (tmp_path / "out").exists()  # refused before the output is touched
    # what fits is accepted
    setup(CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "ok"), max_new_tokens=4048))


def test_a_rerun_with_nothing_to_do_keeps_the_figures_of_the_runs_that_did_the_work(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(image_bytes((30, 20)))
    cfg = CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), prompt=["?"])
    plan = setup(cfg)
    _run_stages_in_process(plan)
    first = {"started": "2026-01-01T00:00:00Z", "wall_s": 12.5, "processed_images": 1, "images_per_s": 0.08,
             "engine": "lmdeploy", "shards_written": 1}
    (tmp_path / "out" / SUMMARY_FILE).write_text(json.dumps({"runs": [first], "wall_s": 12.5, "engine": "lmdeploy"}))

    summary = main(setup(cfg))  # nothing to do: no Ray is started for it either

    on_disk = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert on_disk == summary
    assert summary["wall_s"] == 12.5 and summary["engine"] == "lmdeploy" and summary["processed_images"] == 1
    assert summary["images_per_s"] == 0.08 and summary["rows"] == 1 and summary["succeeded"] == 1
    assert [r["processed_images"] for r in summary["runs"]] == [1, 0]
    assert summary["runs"][0] == first and summary["runs"][1]["engine"] is None


def test_the_readme_lists_every_error_kind_the_job_can_write():
    """`error_kind` is a documented vocabulary: a kind added to the code must reach the README's table."""
    from jobs import caption_stages
    from raylens.images import ERROR_KINDS
    from raylens.sources import SOURCE_ERROR_KINDS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    kinds = {f"image.{k}" for k in ERROR_KINDS} | {f"source.{k}" for k in SOURCE_ERROR_KINDS} | {
        caption_stages.MISSING_QUESTION, caption_stages.ENGINE_REQUEST, caption_stages.ENGINE_FAILED,
        caption_stages.BATCH_FAILED, "internal.read", "internal.decode"}
    assert not [k for k in sorted(kinds) if f"`{k}`" not in readme]


def test_engine_actors_that_would_take_every_cpu_are_refused_on_a_private_instance(monkeypatch, caplog):
    """--replicas 2 on a 2-CPU machine used to wait for ever: the engine actors held both CPUs and no
    prepare task could start. A private instance cannot grow, so that is a usage error naming the fix; a
    cluster may add nodes, so there it is a warning."""
    from jobs.caption import _check_cpus_left_for_preprocessing

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = CaptionJobConfig(input="in", output="out", replicas="1:2")
    with pytest.raises(UsageError, match=r"take 2 of the 2 CPUs.*--replicas 1 or fewer"):
        _check_cpus_left_for_preprocessing(config, {"CPU": 2.0})
    _check_cpus_left_for_preprocessing(config, {"CPU": 3.0})  # one CPU left for decoding: fine
    on_cluster = CaptionJobConfig(input="in", output="out", replicas="2", ray_address="10.0.0.1:6379")
    with caplog.at_level("WARNING"):
        _check_cpus_left_for_preprocessing(on_cluster, {"CPU": 2.0})
    assert "waits until the cluster adds CPUs" in caplog.text
