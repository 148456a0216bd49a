"""Input kinds -> InputItems -> bytes: directories, manifests (Parquet/CSV/JSON), WebDataset shards, S3."""
from __future__ import annotations

import datetime
import io
import json
import pickle
import tarfile

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import image_bytes
from raylens.fetch import FetchError, UrlFetcher
from raylens.sources import (
    InputItem,
    SourceError,
    SourceFilesystems,
    detect_input_kind,
    iter_inputs,
    parse_tar_source,
    read_source,
    tar_source,
)
from raylens.storage import resolve_filesystem

RED, BLUE = image_bytes(color=(200, 0, 0)), image_bytes(color=(0, 0, 200), fmt="JPEG")
LOCAL = SourceFilesystems(local=pafs.LocalFileSystem())
FETCHER = UrlFetcher()


def items_of(path, **kwargs) -> list[InputItem]:
    fs, root = resolve_filesystem(str(path))
    return list(iter_inputs(fs, root, **kwargs))


def read(source, filesystems=LOCAL, fetcher=FETCHER) -> bytes:
    return read_source(source, filesystems=filesystems, fetcher=fetcher)


def error_of(source, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        read(source, **kwargs)
    return info.value


@pytest.fixture
def images(tmp_path):
    """imgs/red.png and imgs/sub/blue.jpg next to where the manifests go."""
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "red.png").write_bytes(RED)
    (tmp_path / "imgs" / "sub" / "blue.jpg").write_bytes(BLUE)
    return tmp_path


# ------------------------------------------------------------------------------------ directories
def test_a_directory_of_images(images):
    (images / "imgs" / "notes.txt").write_text("not an image")
    items = items_of(images / "imgs")
    assert [(i.id, i.source) for i in items] == [
        ("red.png", str(images / "imgs" / "red.png")), ("sub/blue.jpg", str(images / "imgs" / "sub" / "blue.jpg"))]
    assert all(i.question is None and i.extra == () for i in items)
    assert read(items[1].source) == BLUE
    with pytest.raises(ValueError, match="question column 'q' needs a manifest"):
        items_of(images / "imgs", question_column="q")


# ------------------------------------------------------------------------------------ manifests
ROWS = [  # image, question, label, score, flag
    ("imgs/red.png", "What colour?", 1, 0.5, True),
    (None, "Null image?", 2, 1.5, False),
    ("imgs/sub/blue.jpg", None, 3, 2.5, True),
    ("imgs/gone.png", "Missing file?", 4, 3.5, False),
    ("ABSOLUTE", "Absolute path?", 5, 4.5, True),
    ("https://images.example/cat.jpg", "A URL?", 6, 5.5, False),
    ("s3://bucket/key.png", "An S3 URI?", 7, 6.5, True),
]


def _rows(root):
    return [(str(root / "imgs" / "red.png") if r[0] == "ABSOLUTE" else r[0], *r[1:]) for r in ROWS]


def write_parquet(path, rows):
    table = pa.table({
        "image": [r[0] for r in rows], "question": [r[1] for r in rows], "label": [r[2] for r in rows],
        "score": [r[3] for r in rows], "flag": [r[4] for r in rows],
        "tags": [["a", "b"]] * len(rows), "when": [datetime.date(2024, 1, 2)] * len(rows),
        "blob": [b"\x00\x01"] * len(rows),
    })
    pq.write_table(table, path)


def write_csv(path, rows):
    lines = ["image,question,label,score,flag"]
    lines += [f"{r[0] or ''},{r[1] or ''},{r[2]},{r[3]},{r[4]}" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def write_jsonl(path, rows):
    keys = ("image", "question", "label", "score", "flag")
    path.write_text("\n".join(json.dumps(dict(zip(keys, r))) for r in rows) + "\n")


def write_json_array(path, rows):
    keys = ("image", "question", "label", "score", "flag")
    path.write_text(json.dumps([dict(zip(keys, r)) for r in rows], indent=1))


WRITERS = {"parquet": write_parquet, "csv": write_csv, "jsonl": write_jsonl, "json": write_json_array}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_manifest_formats(images, fmt):
    manifest = images / f"list.{fmt}"
    WRITERS[fmt](manifest, _rows(images))
    fs, root = resolve_filesystem(str(manifest))
    assert detect_input_kind(fs, root) == "manifest"
    items = items_of(manifest, question_column="question")
    assert [i.id for i in items] == [f"list.{fmt}:{n}" for n in range(len(ROWS))]
    assert [i.source for i in items] == [
        str(images / "imgs" / "red.png"), "", str(images / "imgs" / "sub" / "blue.jpg"), str(images / "imgs" / "gone.png"),
        str(images / "imgs" / "red.png"), "https://images.example/cat.jpg", "s3://bucket/key.png"]
    assert [i.question for i in items] == [r[1] for r in ROWS]
    first = dict(items[0].extra)
    if fmt == "csv":  # CSV has no types: every value is carried as the text it was
        assert first == {"label": "1", "score": "0.5", "flag": "True"}
    elif fmt == "parquet":
        assert first == {"label": 1, "score": 0.5, "flag": True, "tags": '["a", "b"]', "when": "2024-01-02", "blob": None}
    else:
        assert first == {"label": 1, "score": 0.5, "flag": True}
    assert list(dict(items[0].extra)) == [k for k, _ in items[0].extra]  # column order kept

    assert read(items[0].source) == RED and read(items[2].source) == BLUE and read(items[4].source) == RED
    assert error_of(items[1].source).kind == "bad_source"
    missing = error_of(items[3].source)
    assert missing.kind == "missing" and str(images / "imgs" / "gone.png") in str(missing)
    assert items == items_of(manifest, question_column="question")  # deterministic


def test_without_a_question_column_the_question_is_carried_as_extra(images):
    manifest = images / "list.jsonl"
    write_jsonl(manifest, _rows(images)[:1])
    [item] = items_of(manifest)
    assert item.question is None
    assert dict(item.extra)["question"] == "What colour?"


def test_odd_rows_become_items_with_an_empty_source(images):
    manifest = images / "odd.jsonl"
    manifest.write_text('{"image": 42, "n": 1}\n{"n": 2}\n"just a string"\n{"image": "   ", "n": 4}\n'
                        '{"image": ["imgs/red.png"], "n": 5}\n')
    items = items_of(manifest)
    assert [i.source for i in items] == ["", "", "", "", ""]
    assert [dict(i.extra)["n"] for i in items] == [1, 2, None, 4, 5]
    assert [i.id for i in items] == [f"odd.jsonl:{n}" for n in range(5)]


def test_a_directory_of_manifests_in_sorted_order(images):
    (images / "lists" / "sub").mkdir(parents=True)
    (images / "lists" / "b.csv").write_text("image\n../imgs/red.png\n")
    (images / "lists" / "sub" / "a.jsonl").write_text('{"image": "../../imgs/sub/blue.jpg"}\n')
    (images / "lists" / "_SUCCESS").write_text("")
    (images / "lists" / ".hidden.csv").write_text("nope\n")
    fs, root = resolve_filesystem(str(images / "lists"))
    assert detect_input_kind(fs, root) == "manifest"
    items = items_of(images / "lists")
    assert [(i.id, i.source) for i in items] == [
        ("b.csv:0", str(images / "imgs" / "red.png")), ("sub/a.jsonl:0", str(images / "imgs" / "sub" / "blue.jpg"))]


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", '[{"image": "a.png"}, ', "bad.json is not valid JSON"),
    ("bad.parquet", "not parquet at all", "bad.parquet is not valid parquet"),
    ("noimage.csv", "path,label\na.png,1\n", "no image column 'image'"),
])
def test_unreadable_manifests_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        items_of(tmp_path / name)


def test_a_missing_question_column_names_the_file(tmp_path):
    (tmp_path / "m.csv").write_text("image\na.png\n")
    with pytest.raises(ValueError, match=r"m.csv has no question column 'prompt'"):
        items_of(tmp_path / "m.csv", question_column="prompt")


def test_another_image_column(tmp_path):
    (tmp_path / "m.csv").write_text("url,caption\nhttps://x.example/a.jpg,a cat\n")
    [item] = items_of(tmp_path / "m.csv", image_column="url")
    assert (item.source, item.extra) == ("https://x.example/a.jpg", (("caption", "a cat"),))


# ------------------------------------------------------------------------------------ WebDataset
def write_shard(path, samples):
    """img2dataset's layout: <key>.jpg / .txt / .json per sample, in key order."""
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _meta(key, url, caption):
    return json.dumps({"url": url, "key": key, "status": "success", "caption": caption, "width": 64,
                       "height": 48, "exif": {"Make": "x"}, "txt": "dup"}).encode()


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    write_shard(root / "00000.tar", [
        ("000000001.jpg", BLUE), ("000000001.txt", b"a blue square"), ("000000001.json", _meta("000000001", "http://u/1", "blue")),
        ("000000002.png", RED), ("000000002.txt", b"a red square"),
        ("000000003.txt", b"caption without an image"), ("000000003.json", b"{}"),
        ("000000004.jpg", BLUE), ("000000004.png", RED),  # two images: jpg is preferred
    ])
    write_shard(root / "00001.tar", [("000010000.webp", RED), ("000010000.json", b"[1, 2]")])
    (root / "00000.parquet").write_bytes(b"img2dataset's per-shard metadata, ignored")
    (root / "00000_stats.json").write_text("{}")
    (root / "_SUCCESS").write_text("")
    return root


def test_webdataset_shards(shards):
    fs, root = resolve_filesystem(str(shards))
    assert detect_input_kind(fs, root) == "webdataset"
    items = items_of(shards)
    assert [i.id for i in items] == ["00000.tar/000000001", "00000.tar/000000002", "00000.tar/000000004",
                                     "00001.tar/000010000"]
    first = items[0]
    assert first.source.startswith(f"tar://{shards / '00000.tar'}#000000001.jpg?offset=")
    assert first.extra == (("txt", "a blue square"), ("url", "http://u/1"), ("key", "000000001"),
                           ("status", "success"), ("caption", "blue"), ("width", 64), ("height", 48),
                           ("exif", '{"Make": "x"}'), ("json.txt", "dup"))
    assert items[1].extra == (("txt", "a red square"),)
    assert items[3].extra == (("json", "[1, 2]"),)
    assert [read(i.source) for i in items] == [BLUE, RED, BLUE, RED]
    assert items == items_of(shards)


def test_webdataset_question_from_metadata(shards):
    items = items_of(shards, question_column="txt")
    assert [i.question for i in items] == ["a blue square", "a red square", None, None]
    assert all(k != "txt" for i in items for k, _ in i.extra)


def test_a_single_shard_file(shards):
    fs, root = resolve_filesystem(str(shards / "00001.tar"))
    assert detect_input_kind(fs, root) == "webdataset"
    assert [i.id for i in items_of(shards / "00001.tar")] == ["00001.tar/000010000"]


def test_tar_sources_with_and_without_a_range(shards):
    shard = str(shards / "00000.tar")
    assert read(tar_source(shard, "000000002.png")) == RED  # no range: found by scanning the headers
    item = items_of(shards)[0]
    _, member, offset, size = parse_tar_source(item.source)
    assert (member, size) == ("000000001.jpg", len(BLUE))
    wrong = error_of(tar_source(shard, member, offset + 512, size))  # a range that is not this member's
    assert wrong.kind == "read" and "000000001.jpg" in str(wrong)
    gone = error_of(tar_source(shard, "000000099.jpg"))
    assert gone.kind == "missing" and "000000099.jpg" in str(gone)
    no_shard = error_of(tar_source(str(shards / "nope.tar"), "a.jpg", 512, 3))
    assert no_shard.kind == "missing" and "nope.tar" in str(no_shard)
    assert error_of("tar://no-hash-here").kind == "bad_source"
    assert error_of(tar_source(shard, member), fetcher=UrlFetcher(max_bytes=10)).kind == "too_large"


def test_a_damaged_shard_names_itself(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"\x01" * 2048)
    with pytest.raises(ValueError, match="00000.tar is not a readable tar"):
        items_of(tmp_path)


# ------------------------------------------------------------------------------------ detection
def test_detect_input_kind_edge_cases(tmp_path, images):
    fs = pafs.LocalFileSystem()
    (tmp_path / "empty").mkdir()
    assert detect_input_kind(fs, str(tmp_path / "empty")) == "directory"
    assert items_of(tmp_path / "empty") == []
    with pytest.raises(FileNotFoundError, match="nowhere"):
        detect_input_kind(fs, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="neither a manifest"):
        detect_input_kind(fs, str(images / "imgs" / "red.png"))
    (images / "imgs" / "meta.csv").write_text("image\nred.png\n")  # images win over a stray manifest
    assert detect_input_kind(fs, str(images / "imgs")) == "directory"


# ------------------------------------------------------------------------------------ read_source
@pytest.mark.parametrize("source", ["", "   ", None, 42, "relative/red.png", "file://relative/red.png",
                                    "ftp://example.com/a.jpg", "s3://bucket/key.png"])
def test_bad_sources(source):
    error = error_of(source)
    assert error.kind == "bad_source", error


def test_local_limits_and_directories(images):
    assert error_of(str(images / "imgs" / "red.png"), fetcher=UrlFetcher(max_bytes=10)).kind == "too_large"
    assert error_of(str(images / "imgs")).kind == "not_a_file"


def test_urls_go_through_the_fetcher(no_traffic):
    class Recorder:  # stands in for UrlFetcher: what read_source uses of it
        max_bytes = 1000

        def __init__(self):
            self.urls = []

        def fetch(self, url):
            self.urls.append(url)
            if "fail" in url:
                raise FetchError("http_status", f"{url}: HTTP 404 Not Found")
            return b"fetched"

    recorder = Recorder()
    assert read("https://images.example/a.jpg", fetcher=recorder) == b"fetched"
    error = error_of("HTTP://images.example/fail.jpg", fetcher=recorder)
    assert (error.kind, str(error)) == ("http_status", "HTTP://images.example/fail.jpg: HTTP 404 Not Found")
    assert recorder.urls == ["https://images.example/a.jpg", "HTTP://images.example/fail.jpg"]
    blocked = error_of("http://169.254.169.254/latest/meta-data/")  # the real fetcher, default policy
    assert blocked.kind == "blocked" and "169.254.169.254" in str(blocked)


@pytest.fixture
def no_traffic(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_errors_and_settings_pickle(local_s3):
    error = pickle.loads(pickle.dumps(SourceError("missing", "s3://b/k does not exist")))
    assert (type(error), error.kind, str(error)) == (SourceError, "missing", "s3://b/k does not exist")
    with pytest.raises(ValueError):
        SourceError("weird", "x")
    both = SourceFilesystems.create(local_s3.settings)
    again = pickle.loads(pickle.dumps(both))
    assert isinstance(again.local, pafs.LocalFileSystem) and isinstance(again.s3, pafs.S3FileSystem)


# ------------------------------------------------------------------------------------ S3
def test_s3_prefix_of_images(local_s3):
    bucket = local_s3.new_bucket("prefix")
    local_s3.put(bucket, "in/red.png", RED)
    local_s3.put(bucket, "in/sub/blue.jpg", BLUE)
    local_s3.put(bucket, "in/readme.txt", "no")
    fs, root = resolve_filesystem(f"s3://{bucket}/in/", local_s3.settings)
    assert isinstance(fs, pafs.S3FileSystem) and root == f"{bucket}/in"
    assert detect_input_kind(fs, root) == "directory"
    items = list(iter_inputs(fs, root))
    assert [(i.id, i.source) for i in items] == [
        ("red.png", f"s3://{bucket}/in/red.png"), ("sub/blue.jpg", f"s3://{bucket}/in/sub/blue.jpg")]
    filesystems = SourceFilesystems(local=pafs.LocalFileSystem(), s3=fs)
    assert [read(i.source, filesystems=filesystems) for i in items] == [RED, BLUE]
    missing = error_of(f"s3://{bucket}/in/gone.png", filesystems=filesystems)
    assert missing.kind == "missing" and f"s3://{bucket}/in/gone.png" in str(missing)
    no_bucket = error_of("s3://no-such-bucket-here/x.png", filesystems=filesystems)
    assert no_bucket.kind == "missing" and "s3://no-such-bucket-here/x.png" in str(no_bucket)


def test_s3_manifest(local_s3):
    bucket = local_s3.new_bucket("manifest")
    local_s3.put(bucket, "data/imgs/red.png", RED)
    other = local_s3.put(bucket, "elsewhere/blue.jpg", BLUE)
    local_s3.put(bucket, "data/list.csv", f"image,prompt\nimgs/red.png,What?\n{other},Which?\n,Nothing?\n")
    fs, root = resolve_filesystem(f"s3://{bucket}/data/list.csv", local_s3.settings)
    assert detect_input_kind(fs, root) == "manifest"
    items = list(iter_inputs(fs, root, question_column="prompt"))
    assert [(i.id, i.source, i.question) for i in items] == [
        ("list.csv:0", f"s3://{bucket}/data/imgs/red.png", "What?"), ("list.csv:1", other, "Which?"),
        ("list.csv:2", "", "Nothing?")]
    filesystems = SourceFilesystems.create(local_s3.settings)
    assert read(items[0].source, filesystems=filesystems) == RED
    assert read(items[1].source, filesystems=filesystems) == BLUE


def test_s3_webdataset_reads_one_range(local_s3, tmp_path):
    bucket = local_s3.new_bucket("wds")
    write_shard(tmp_path / "00000.tar", [("000000001.jpg", BLUE), ("000000001.txt", b"blue")])
    local_s3.put(bucket, "shards/00000.tar", (tmp_path / "00000.tar").read_bytes())
    fs, root = resolve_filesystem(f"s3://{bucket}/shards", local_s3.settings)
    assert detect_input_kind(fs, root) == "webdataset"
    [item] = iter_inputs(fs, root)
    assert item.id == "00000.tar/000000001" and item.source.startswith(f"tar://s3://{bucket}/shards/00000.tar#000000001.jpg?")
    assert read(item.source, filesystems=SourceFilesystems.create(local_s3.settings)) == BLUE
    assert error_of(item.source).kind == "bad_source"  # no S3 filesystem given: says so, names the source
