import os

import pyarrow.fs as pafs
import pytest

from raylens.storage import (
    S3Settings,
    ensure_writable_dir,
    list_files,
    read_bytes,
    relative_id,
    resolve_filesystem,
    to_uri,
)


def test_s3_settings_prefer_the_flag_then_the_s3_specific_variable():
    env = {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2", "AWS_REGION": "eu-west-1"}
    assert S3Settings.from_env(env).endpoint == "http://b:2"
    assert S3Settings.from_env(env, endpoint="http://c:3").endpoint == "http://c:3"
    assert S3Settings.from_env({"AWS_ENDPOINT_URL": "http://a:1"}).endpoint == "http://a:1"
    assert S3Settings.from_env(env).region == "eu-west-1"


def test_s3_uri_resolves_to_an_s3_filesystem_with_the_endpoint():
    fs, path = resolve_filesystem("s3://bucket/some/prefix/", S3Settings(endpoint="http://127.0.0.1:9", region="us-east-1"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/some/prefix"
    assert to_uri(fs, path) == "s3://bucket/some/prefix"


def test_other_schemes_are_refused():
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        resolve_filesystem("gs://bucket/x")


def test_listing_is_recursive_sorted_and_case_insensitive(tmp_path):
    (tmp_path / "sub dir" / "ünï").mkdir(parents=True)
    for name in ["b.JPG", "a.png", "sub dir/c.webp", "sub dir/ünï/d.TIFF", "notes.txt", "sub dir/e.jpeg.bak"]:
        (tmp_path / name).write_bytes(b"x")
    fs, root = resolve_filesystem(str(tmp_path))
    found = [relative_id(root, p) for p in list_files(fs, root, {".jpg", ".png", ".webp", ".tiff"})]
    assert found == ["a.png", "b.JPG", "sub dir/c.webp", "sub dir/ünï/d.TIFF"]
    assert read_bytes(fs, os.path.join(root, "a.png")) == b"x"


def test_writable_dir_check_creates_and_cleans_up(tmp_path):
    fs, root = resolve_filesystem(str(tmp_path / "out" / "nested"))
    ensure_writable_dir(fs, root)
    assert os.listdir(root) == []


def test_unwritable_dir_raises(tmp_path):
    # Below a regular file nothing can be created, even as root (CI runs as root, so chmod proves nothing).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fs, root = resolve_filesystem(str(blocker / "out"))
    with pytest.raises(OSError):
        ensure_writable_dir(fs, root)


# ------------------------------------------------------------------------------- links and odd names
IMAGES = {".png", ".jpg"}


def _ids(root):
    fs, path = resolve_filesystem(str(root))
    return [relative_id(path, p) for p in list_files(fs, path, IMAGES)]


def test_a_link_to_its_own_folder_lists_each_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "sub" / "b.jpg").write_bytes(b"b")
    os.symlink(".", tmp_path / "loop")  # issue 10: one such link gave 41 rows per image
    os.symlink("..", tmp_path / "sub" / "up")
    assert _ids(tmp_path) == ["a.png", "sub/b.jpg"]


def test_two_loops_terminate(tmp_path):
    """Two links to the root made the old listing run forever with growing memory."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.png").write_bytes(b"a")
    os.symlink(str(tmp_path), tmp_path / "x" / "back")
    os.symlink("x", tmp_path / "y")
    os.symlink("../y", tmp_path / "x" / "sideways")
    assert _ids(tmp_path) == ["x/a.png"]


def test_links_reach_files_and_folders_outside_once_each(tmp_path):
    """Files reached through links are listed once, under the first path that reaches them: real
    paths before linked ones, then in sorted order. Folders are visited once."""
    inside, outside = tmp_path / "in", tmp_path / "elsewhere"
    (inside / "real").mkdir(parents=True)
    (outside / "deep").mkdir(parents=True)
    (inside / "real" / "r.png").write_bytes(b"r")
    (outside / "o.png").write_bytes(b"o")
    (outside / "deep" / "d.jpg").write_bytes(b"d")
    os.symlink(outside, inside / "b-link")            # a folder outside the input: followed
    os.symlink(outside, inside / "a-link")            # the same folder again: visited once, as a-link
    os.symlink(inside / "real" / "r.png", inside / "0-alias.png")  # a link to a file listed already
    os.symlink(outside / "o.png", inside / "z-file.png")           # a link to a file outside
    os.symlink(tmp_path / "nowhere.png", inside / "dangling.png")  # skipped: nothing behind it
    os.symlink("self.png", inside / "self.png")                    # a link to itself: skipped
    assert _ids(inside) == ["a-link/deep/d.jpg", "a-link/o.png", "real/r.png"]


def test_non_regular_files_are_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    os.mkfifo(tmp_path / "fifo.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.mkdir(tmp_path / "folder.png")
    assert _ids(tmp_path) == ["a.png"]


def test_non_utf8_names_are_listed_not_crashed_on(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1, as old archives write it: undecodable as UTF-8
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), "wb") as f:
        f.write(b"x")
    (tmp_path / "b.png").write_bytes(b"b")
    assert _ids(tmp_path) == ["b.png", name]


# ------------------------------------------------------------------------------- transient S3 failures
def test_a_small_read_answered_with_an_s3_error_is_retried(local_s3):
    """The AWS SDK in pyarrow writes an error answer's XML body into the buffer of a ranged read; a
    body longer than the range (any read under ~250 bytes, e.g. a small _manifest.json or a Parquet
    column chunk) turns into a non-retried INTERNAL_FAILURE "Failed to flush response stream"
    (apache/doris#66557 describes the same SDK behaviour). read_bytes retries those itself."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fault_proxy import FaultProxy, first_n_reads_fail

    bucket = local_s3.new_bucket("small")
    local_s3.put(bucket, "tiny.json", b'{"a": 1}')
    with FaultProxy(local_s3.endpoint) as proxy:
        settings = S3Settings(endpoint=proxy.endpoint, region=local_s3.settings.region,
                              access_key=local_s3.settings.access_key, secret_key=local_s3.settings.secret_key)
        fs = settings.filesystem()
        get_only = first_n_reads_fail(1, "503")
        proxy.policy = lambda method, path: get_only(method, path) if method == "GET" else None
        with pytest.raises(OSError, match="Failed to flush response stream"):  # what pyarrow alone does
            with fs.open_input_stream(f"{bucket}/tiny.json") as f:
                f.read()
        get_only = first_n_reads_fail(2, "500")
        assert read_bytes(fs, f"{bucket}/tiny.json") == b'{"a": 1}'
        assert proxy.counts.snapshot()["faults"] == {"503": 1, "500": 2}
    with pytest.raises(FileNotFoundError):  # a missing key is not retried
        read_bytes(local_s3.filesystem(), f"{bucket}/nope.json")
