"""Records become model inputs the way inference builds them: same tiles, same tokens, loss on answers only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from raylens.checkpoints.formats import read_model_spec
from raylens.engines.base import VLRequest
from raylens.engines.encoding import IGNORE_INDEX, encode_request
from raylens.images import decode_prepared, pixel_values_for
from raylens.training.records import parse_record
from raylens.training.samples import BadRecord, SampleEncoder, collate


@pytest.fixture(scope="module")
def tokenizer_and_spec(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint)), read_model_spec(tiny_checkpoint)


@pytest.fixture
def encoder(tokenizer_and_spec):
    tokenizer, spec = tokenizer_and_spec
    return SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=4096)


def _png(path, size=(200, 100), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def _record(tmp_path, turns, images=(), record_id="r", **kw):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns], "image": list(images)}
    return parse_record(row, record_id=record_id, image_root=str(tmp_path), **kw)


def _inference_ids(question, image, spec, tokenizer, tiling):
    """What the engines tokenise for one question about one image (the batch job's request)."""
    return encode_request(VLRequest("q", question, image), spec=spec, tokenizer=tokenizer, tiling=tiling).input_ids


def test_one_turn_sample_is_the_inference_prompt_plus_the_answer(tmp_path, encoder, tokenizer_and_spec):
    tokenizer, spec = tokenizer_and_spec
    _png(tmp_path / "a.png")
    record = _record(tmp_path, [("human", "<image>\nWhat colour?"), ("gpt", "red")], ["a.png"])
    sample = encoder.encode(record)
    tiling = spec.tiling()
    image = decode_prepared((tmp_path / "a.png").read_bytes(), tiling)
    prompt = _inference_ids("What colour?", image, spec, tokenizer, tiling)
    assert sample.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in sample.labels[: len(prompt)])
    answer = [t for t in sample.labels if t != IGNORE_INDEX]
    assert sample.input_ids[len(prompt):] == answer
    assert tokenizer.decode(answer) == "red<|im_end|>"
    np.testing.assert_array_equal(sample.pixel_values, pixel_values_for(image, tiling))


def test_multi_turn_several_images_loss_on_every_answer(tmp_path, encoder, tokenizer_and_spec):
    tokenizer, spec = tokenizer_and_spec
    _png(tmp_path / "a.png", (300, 100))
    _png(tmp_path / "b.png", (100, 100), (0, 0, 255))
    record = _record(tmp_path, [("human", "<image> and <image>: same colour?"), ("gpt", "no"),
                                ("human", "Which is blue?"), ("gpt", "the second")], ["a.png", "b.png"])
    sample = encoder.encode(record)
    targets = tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert targets == "no<|im_end|>the second<|im_end|>"
    tiles = sample.pixel_values.shape[0]
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert sample.input_ids.count(context) == tiles * spec.image_tokens_per_tile
    assert tiles > 2  # the wide image took several tiles plus a thumbnail


def test_max_tiles_caps_the_tiles_as_at_inference(tmp_path, tokenizer_and_spec):
    tokenizer, spec = tokenizer_and_spec
    _png(tmp_path / "wide.png", (800, 100))
    record = _record(tmp_path, [("human", "Describe."), ("gpt", "wide")], ["wide.png"])
    full = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=4096).encode(record)
    capped = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=4096, max_tiles=2).encode(record)
    per_record = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=4096).encode(
        _record(tmp_path, [("human", "Describe."), ("gpt", "wide")], ["wide.png"], max_tiles=1))
    assert full.pixel_values.shape[0] > 3
    assert capped.pixel_values.shape[0] == 3  # 2 tiles + thumbnail
    assert per_record.pixel_values.shape[0] == 1  # one tile: no thumbnail


def test_system_message_of_the_record_or_the_checkpoint(tmp_path, encoder, tokenizer_and_spec):
    tokenizer, _ = tokenizer_and_spec
    own = _record(tmp_path, [("system", "Be brief."), ("human", "Hi"), ("gpt", "hello")])
    default = _record(tmp_path, [("human", "Hi"), ("gpt", "hello")])
    assert "Be brief." in tokenizer.decode(encoder.encode(own).input_ids)
    assert "InternVL" in tokenizer.decode(encoder.encode(default).input_ids)


def test_unusable_images_and_lengths_are_bad_records(tmp_path, tokenizer_and_spec):
    tokenizer, spec = tokenizer_and_spec
    encoder = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=4096)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = {
        "missing_image": _record(tmp_path, [("human", "?"), ("gpt", "x")], ["nope.png"]),
        "bad_image": _record(tmp_path, [("human", "?"), ("gpt", "x")], ["broken.png"]),
    }
    for kind, record in cases.items():
        with pytest.raises(BadRecord) as caught:
            encoder.encode(record)
        assert caught.value.kind == kind
    _png(tmp_path / "big.png", (800, 800))
    short = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=64)
    with pytest.raises(BadRecord) as caught:
        short.encode(_record(tmp_path, [("human", "?"), ("gpt", "x")], ["big.png"]))
    assert caught.value.kind == "too_long"


def test_images_outside_the_data_roots_are_bad_records(tmp_path, tokenizer_and_spec):
    """As a batch-job manifest's rows: a record may read images only under its data's roots (issue 10 item 7)."""
    from raylens.sources import ReadRoots, SourceFilesystems

    tokenizer, spec = tokenizer_and_spec
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir(), elsewhere.mkdir()
    _png(data / "in.png"), _png(elsewhere / "out.png")
    (data / "link.png").symlink_to(elsewhere / "out.png")
    confined = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=4096,
                             filesystems=SourceFilesystems.create(roots=ReadRoots.of([str(data)])))
    turns = [("human", "?"), ("gpt", "x")]
    assert confined.encode(parse_record({"conversations": [{"from": f, "value": v} for f, v in turns],
                                         "image": "in.png"}, record_id="r", image_root=str(data))).pixel_values is not None
    for image in ("../elsewhere/out.png", str(elsewhere / "out.png"), "link.png", "/proc/self/environ"):
        record = parse_record({"conversations": [{"from": f, "value": v} for f, v in turns], "image": image},
                              record_id="r", image_root=str(data))
        with pytest.raises(BadRecord) as caught:
            confined.encode(record)
        assert caught.value.kind == "image_outside_root", image


def test_collate_pads_right_and_masks_padding(tmp_path, encoder, tokenizer_and_spec):
    tokenizer, _ = tokenizer_and_spec
    _png(tmp_path / "a.png")
    samples = [encoder.encode(_record(tmp_path, [("human", "<image>\nQ?"), ("gpt", "a long long answer")], ["a.png"])),
               encoder.encode(_record(tmp_path, [("human", "Text only."), ("gpt", "ok")]))]
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    lengths = [len(s.input_ids) for s in samples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["num_tokens"] == sum(lengths) and batch["num_samples"] == 2
    short = 1 if lengths[1] < lengths[0] else 0
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == samples[0].pixel_values.shape[0]
    assert json.dumps(batch["skipped"]) == "[]"


def test_collate_converts_pixels_to_the_models_dtype_in_the_loader(tmp_path, encoder, tokenizer_and_spec):
    """The loader processes hand over pixels in the dtype the model takes (bf16 under autocast): the training step's
    copy to the device then converts nothing on the host. Bit for bit what `.to(bfloat16)` of float32 gives."""
    import torch

    tokenizer, _ = tokenizer_and_spec
    _png(tmp_path / "a.png")
    samples = [encoder.encode(_record(tmp_path, [("human", "<image>\nQ?"), ("gpt", "an answer")], ["a.png"]))] * 2
    float32 = collate(samples, pad_id=tokenizer.pad_token_id)
    half = collate(samples, pad_id=tokenizer.pad_token_id, pixel_dtype=torch.bfloat16)
    assert float32["pixel_values"].dtype == torch.float32 and half["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(half["pixel_values"], float32["pixel_values"].to(torch.bfloat16))
    assert torch.equal(half["input_ids"], float32["input_ids"]) and torch.equal(half["labels"], float32["labels"])
