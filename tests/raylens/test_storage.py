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
