"""`resolve_model`: demo dir, local dir, s3:// (through a pyarrow filesystem), hub ids."""
from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from raylens.checkpoints import resolve
from raylens.checkpoints.resolve import COMPLETE_MARKER, DEMO_MODEL_DIR, resolve_model


def test_demo_model_dir_is_in_the_package():
    assert DEMO_MODEL_DIR.parts[-3:] == ("raylens", "demo", "model")


def test_missing_demo_model_names_its_path(monkeypatch, tmp_path):
    monkeypatch.setattr(resolve, "DEMO_MODEL_DIR", tmp_path / "demo" / "model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "demo" / "model")):
        resolve_model(None)
    (tmp_path / "demo" / "model").mkdir(parents=True)
    (tmp_path / "demo" / "model" / "config.json").write_text("{}")
    assert resolve_model(None) == tmp_path / "demo" / "model"


def test_local_dir_is_itself(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(tmp_path) == tmp_path


def test_nonsense_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        resolve_model(str(tmp_path / "no" / "such" / "dir"))


def _bucket(tmp_path):
    """A local tree standing in for s3://bucket/models/tiny, reached through a pyarrow filesystem."""
    root = tmp_path / "store"
    model = root / "bucket" / "models" / "tiny"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    (root / "bucket" / "models" / "other.json").write_text("not mine")
    return pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())


def test_s3_prefix_is_copied_once(tmp_path):
    fs = _bucket(tmp_path)
    cache = tmp_path / "cache"
    local = resolve_model("s3://bucket/models/tiny", filesystem=fs, cache_dir=cache)
    assert local.parent == cache and local.name.startswith("tiny-")
    assert (local / "config.json").read_text() == '{"a": 1}'
    assert (local / "sub" / "weights.bin").stat().st_size == 1000
    assert not (local / "other.json").exists()
    assert (local / COMPLETE_MARKER).is_file()
    assert [p.name for p in cache.iterdir()] == [local.name]  # no staging leftovers
    # A complete copy is reused without touching the store again.
    (tmp_path / "store" / "bucket" / "models" / "tiny" / "config.json").write_text("changed")
    assert resolve_model("s3://bucket/models/tiny/", filesystem=fs, cache_dir=cache) != local  # other URI, other key
    assert resolve_model("s3://bucket/models/tiny", filesystem=fs, cache_dir=cache) == local
    assert (local / "config.json").read_text() == '{"a": 1}'


def test_empty_s3_prefix(tmp_path):
    fs = _bucket(tmp_path)
    with pytest.raises(FileNotFoundError, match="no files under s3://bucket/nothing"):
        resolve_model("s3://bucket/nothing", filesystem=fs, cache_dir=tmp_path / "cache")


def test_hub_id_goes_to_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model("OpenGVLab/InternVL2-1B") == tmp_path
    assert calls[0][0] == "OpenGVLab/InternVL2-1B" and "*.safetensors" in calls[0][1]


def test_hub_errors_say_what_to_do(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="OpenGVLab/InternVL2-2B.*no network.*local checkpoint directory"):
        resolve_model("OpenGVLab/InternVL2-2B")
