"""The job over every kind of input: S3 (moto's server on loopback), manifests, WebDataset, odd images."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from conftest import image_bytes
from jobs.caption import main, setup
from jobs.caption_config import CaptionJobConfig


def _env(s3) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3.settings.access_key, "AWS_SECRET_ACCESS_KEY": s3.settings.secret_key,
            "AWS_REGION": s3.settings.region, "AWS_ENDPOINT_URL_S3": s3.endpoint}


def _read_s3_output(s3, prefix: str):
    fs = s3.filesystem()
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=False))
    tables = [pq.read_table(i.path, filesystem=fs) for i in sorted(infos, key=lambda i: i.path) if i.base_name.endswith(".parquet")]
    return [row for t in tables for row in t.to_pylist()], {i.base_name for i in infos}


def test_s3_images_model_and_output(local_s3, tiny_checkpoint, ray_local):
    bucket = local_s3.new_bucket("job")
    local_s3.put(bucket, "in/a.png", image_bytes((64, 48)))
    local_s3.put(bucket, "in/deep/b.JPG", image_bytes((90, 60), (0, 0, 255), "JPEG"))
    local_s3.put(bucket, "in/broken.png", b"\x89PNG not really")
    for f in Path(tiny_checkpoint).iterdir():  # the model itself comes from object storage too
        local_s3.put(bucket, f"models/tiny/{f.name}", f.read_bytes())
    cfg = CaptionJobConfig(input=f"s3://{bucket}/in/", output=f"s3://{bucket}/out/", model=f"s3://{bucket}/models/tiny",
                           engine="transformers", max_new_tokens=3, batch_size=2)
    summary = main(setup(cfg, env=_env(local_s3)))
    rows, names = _read_s3_output(local_s3, f"{bucket}/out")
    assert {"_manifest.json", "_summary.json", "part-000000.parquet"} <= names
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"a.png", "deep/b.JPG", "broken.png"}
    assert by_id["a.png"]["image"] == f"s3://{bucket}/in/a.png" and by_id["a.png"]["error"] is None
    assert by_id["a.png"]["num_input_tokens"] > 0
    assert by_id["broken.png"]["error"].startswith("ImageError(")
    assert summary["succeeded"] == 2 and summary["failed"] == 1


def test_manifest_with_questions_and_carried_columns(tmp_path, local_s3, tiny_checkpoint, ray_local):
    bucket = local_s3.new_bucket("manifest")
    remote = local_s3.put(bucket, "pics/remote.png", image_bytes((70, 30)))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "local.png").write_bytes(image_bytes((50, 40)))
    rows = [
        {"image": "imgs/local.png", "question": "What colour?", "label": "red", "score": 0.5},
        {"image": remote, "question": "How wide?", "label": "remote", "score": 1.5},
        {"image": "imgs/local.png", "question": "Again?", "label": "repeat", "score": None},
        {"image": "imgs/missing.png", "question": "Where?", "label": "gone", "score": 2.0},
        {"image": None, "question": "No image?", "label": "null", "score": 3.0},
        {"image": "http://127.0.0.1:9/x.png", "question": "Internal?", "label": "ssrf", "score": 4.0},
        {"image": "imgs/local.png", "question": "", "label": "no question", "score": 5.0},
    ]
    manifest = tmp_path / "vqa.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CaptionJobConfig(input=str(manifest), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                           engine="fakes:EchoEngine", question_column="question", batch_size=3, shard_size=4,
                           image_root=[f"s3://{bucket}/pics"])  # the remote image is outside the manifest's folder
    main(setup(cfg, env=_env(local_s3)))
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert [r["id"] for r in out] == [f"vqa.jsonl:{i}" for i in range(len(rows))]
    by_label = {r["label"]: r for r in out}
    assert by_label["red"]["text"] == "What colour? | 50x40" and by_label["red"]["score"] == 0.5
    assert by_label["remote"]["text"] == "How wide? | 70x30" and by_label["remote"]["prompt"] == "How wide?"
    assert by_label["repeat"]["text"] == "Again? | 50x40" and by_label["repeat"]["score"] is None
    assert by_label["gone"]["error"].startswith("SourceError(missing)") and "missing.png" in by_label["gone"]["error"]
    assert by_label["null"]["error"].startswith("SourceError(bad_source)")
    assert by_label["ssrf"]["error"].startswith("SourceError(blocked)")  # loopback is never fetched
    assert by_label["no question"]["error"].startswith("MissingQuestion")
    assert [by_label[k]["error_kind"] for k in ("gone", "null", "ssrf", "no question", "red")] == [
        "source.missing", "source.bad_source", "source.blocked", "input.missing_question", None]
    assert all(r["text"] is None for r in out if r["error"])


def test_several_prompts_give_one_row_each(tmp_path, tiny_checkpoint, ray_local):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(image_bytes((30, 20)))
    cfg = CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                           engine="fakes:EchoEngine", prompt=["Caption?", "Colour?", "Shape?"])
    main(setup(cfg))
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert [(r["id"], r["prompt_index"], r["text"]) for r in out] == [
        ("x.png", 0, "Caption? | 30x20"), ("x.png", 1, "Colour? | 30x20"), ("x.png", 2, "Shape? | 30x20")]


def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_from_img2dataset(tmp_path, tiny_checkpoint, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", {
        "000000000": {"jpg": image_bytes((40, 30), fmt="JPEG"), "txt": b"a red thing", "json": b'{"url": "http://x/0.jpg", "width": 40}'},
        "000000001": {"jpg": image_bytes((20, 60), fmt="JPEG"), "txt": b"a tall thing", "json": b'{"url": "http://x/1.jpg", "width": 20}'},
    })
    _tar(shards / "00001.tar", {"000010000": {"png": image_bytes((33, 33)), "txt": b"square"}})
    (shards / "00000.parquet").write_bytes(b"img2dataset writes these beside the shards")
    cfg = CaptionJobConfig(input=str(shards), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                           engine="fakes:EchoEngine", prompt=["Describe."])
    main(setup(cfg))
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(out) == {"00000.tar/000000000", "00000.tar/000000001", "00001.tar/000010000"}
    assert out["00000.tar/000000001"]["text"] == "Describe. | 20x60"
    assert out["00000.tar/000000001"]["txt"] == "a tall thing" and out["00000.tar/000000001"]["url"] == "http://x/1.jpg"
    assert out["00001.tar/000010000"]["url"] is None and out["00001.tar/000010000"]["error"] is None


def _odd_images() -> dict[str, bytes]:
    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    gray16 = Image.fromarray(np.full((12, 10), 40000, dtype=np.uint16))
    return {
        "cmyk.JPEG": save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"),
        "gray16.png": save(gray16, "PNG"),
        "rgba transparent.png": save(rgba, "PNG"),
        "palette.png": save(palette, "PNG", transparency=0),
        "animated.gif": gif.getvalue(),
        "one pixel.bmp": save(Image.new("RGB", (1, 1), (1, 2, 3)), "BMP"),
        "panorama.webp": save(Image.new("RGB", (8000, 40), (9, 9, 9)), "WEBP"),
        "ünïcode/nested/grey.TIFF": save(Image.new("L", (25, 25), 128), "TIFF"),
    }


def test_valid_but_unusual_images_are_all_captioned(tmp_path, tiny_checkpoint, ray_local):
    files = _odd_images()
    for rel, data in files.items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(data)
    cfg = CaptionJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                           engine="fakes:EchoEngine", prompt=["?"])
    summary = main(setup(cfg))
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(out) == set(files)
    assert all(r["error"] is None for r in out.values()), {k: r["error"] for k, r in out.items() if r["error"]}
    assert out["panorama.webp"]["text"] == "? | 8000x40" and out["one pixel.bmp"]["text"] == "? | 1x1"
    assert summary["failed"] == 0
