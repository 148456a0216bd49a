"""Training data files: LLaVA JSON/JSONL and InternVL meta JSON become records; bad records are skipped with
their reason, never raised."""
from __future__ import annotations

import json

import pytest

from raylens.training.records import StructureError, parse_record, read_training_data


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _qa(question="<image>\nWhat is it?", answer="a cat", **extra):
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


def test_llava_jsonl_records_with_ids_images_and_turns(tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", [
        _qa(id="a", image="imgs/a.png"),
        {"id": 7, "image": ["x.png", "y.png"], "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image> vs <image>: which is larger?"}, {"from": "gpt", "value": "the first"},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "it is wider"}]},
        _qa(question="No image here.", answer="fine"),
    ])
    result = read_training_data(str(data))
    assert [r.id for r in result.records] == ["a", "7", "train.jsonl:3"]
    first, second, third = result.records
    assert first.images == (str(tmp_path / "imgs" / "a.png"),)
    assert first.conversation.turns[0].num_images == 1
    assert second.conversation.system == "Be brief."
    assert [(t.num_images, t.assistant) for t in second.conversation.turns] == [(2, "the first"), (0, "it is wider")]
    assert second.images == (str(tmp_path / "x.png"), str(tmp_path / "y.png"))
    assert third.images == () and third.conversation.turns[0].num_images == 0
    assert result.skipped == {} and result.files == [str(data)] and len(result.fingerprint) == 64


def test_untagged_images_go_in_front_of_the_first_question(tmp_path):
    record = parse_record(_qa(question="Describe.", image=["a.png", "b.png"]), record_id="r", image_root="/data")
    assert record.conversation.turns[0].num_images == 2
    assert record.images == ("/data/a.png", "/data/b.png")


@pytest.mark.parametrize("row, kind", [
    ([1, 2], "bad_record"),
    ({"image": "a.png"}, "no_conversations"),
    ({"conversations": []}, "no_conversations"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "bad_turns"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]}, "bad_turns"),
    (_qa(answer="  "), "empty_answer"),
    (_qa(question="<image><image> two?", image="one.png"), "image_tags"),
    (_qa(question="<image> one of two?", image=["a.png", "b.png"]), "image_tags"),
    ({"image": 3, "conversations": _qa()["conversations"]}, "bad_record"),
    ({"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "x"}]}, "bad_record"),
])
def test_records_that_cannot_be_trained_on_name_their_reason(row, kind):
    with pytest.raises(StructureError) as caught:
        parse_record(row, record_id="r", image_root="/data")
    assert caught.value.kind == kind


def test_bad_records_are_counted_not_raised(tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", [
        _qa(id="good", image="a.png"), "{not json", _qa(id="empty", answer=""), _qa(id="tags", question="<image>"),
        {"id": "none"},
    ])
    result = read_training_data(str(data))
    assert [r.id for r in result.records] == ["good"]
    assert result.skipped == {"bad_record": ["train.jsonl:2"], "empty_answer": ["empty"], "image_tags": ["tags"],
                              "no_conversations": ["none"]}
    assert result.num_skipped == 4


def test_llava_json_list_and_image_root(tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([_qa(image="a.png"), _qa(id="b", image="/abs/b.png")]))
    result = read_training_data(str(data), image_root="s3://bucket/imgs/")
    assert [r.images for r in result.records] == [("s3://bucket/imgs/a.png",), ("/abs/b.png",)]
    assert result.records[0].id == "train.json:0"
    assert result.roots == ["s3://bucket/imgs/"]  # /abs/b.png is outside it: training will refuse to read it


def test_internvl_meta_file_with_roots_repeats_and_tile_caps(tmp_path):
    (tmp_path / "ann").mkdir()
    _write_jsonl(tmp_path / "ann" / "food.jsonl", [_qa(id=f"f{i}", image=f"{i}.jpg") for i in range(4)])
    _write_jsonl(tmp_path / "ann" / "docs.jsonl", [_qa(id=f"d{i}", image=f"{i}.png") for i in range(4)])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "food": {"root": "images/food", "annotation": "ann/food.jsonl", "repeat_time": 2, "data_augment": False},
        "docs": {"root": "/data/docs", "annotation": "ann/docs.jsonl", "repeat_time": 0.5, "max_dynamic_patch": 2},
    }))
    result = read_training_data(str(meta), seed=3)
    food = [r for r in result.records if r.id.startswith("f")]
    docs = [r for r in result.records if r.id.startswith("d")]
    assert [r.id for r in food] == ["f0", "f1", "f2", "f3"] * 2
    assert food[0].images == (str(tmp_path / "images" / "food" / "0.jpg"),) and food[0].max_tiles is None
    assert len(docs) == 2 and len({r.id for r in docs}) == 2 and all(r.max_tiles == 2 for r in docs)
    assert docs[0].images[0].startswith("/data/docs/")
    assert result.files == [str(meta), str(tmp_path / "ann" / "food.jsonl"), str(tmp_path / "ann" / "docs.jsonl")]
    # the fraction kept is seeded: the same seed keeps the same records
    assert [r.id for r in read_training_data(str(meta), seed=3).records] == [r.id for r in result.records]
    # an --image-root is where relative roots live
    rooted = read_training_data(str(meta), image_root="/mnt", seed=3)
    assert rooted.records[0].images == ("/mnt/images/food/0.jpg",)
    # the places images may be read from: each entry's root
    assert result.roots == [str(tmp_path / "images" / "food"), "/data/docs"]
    assert rooted.roots == ["/mnt/images/food", "/data/docs"]


def test_unreadable_data_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_training_data(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="neither JSON Lines"):
        read_training_data(str(bad))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="neither a LLaVA list"):
        read_training_data(str(other))


def test_data_and_images_on_s3(local_s3):
    bucket = local_s3.new_bucket("ftdata")
    uri = local_s3.put(bucket, "sets/train.jsonl", json.dumps(_qa(id="s", image="img/a.png")) + "\n")
    result = read_training_data(uri, s3=local_s3.settings)
    assert result.records[0].images == (f"s3://{bucket}/sets/img/a.png",)
    assert result.files == [uri]
