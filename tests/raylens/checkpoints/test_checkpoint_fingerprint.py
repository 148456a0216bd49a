"""raylens.checkpoints.fingerprint: one hash of a checkpoint directory for the caption job, fine-tuning and the
merge (they used to hash differently: fine-tuning read every weight byte)."""
from __future__ import annotations

import shutil

import pytest

from raylens.checkpoints.fingerprint import _HASH_WHOLE_BELOW, model_fingerprint


def _checkpoint(root, weights: bytes):
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "internvl_chat"}')
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_same_content_anywhere_same_fingerprint_and_markers_do_not_count(tmp_path):
    weights = bytes(range(256)) * (_HASH_WHOLE_BELOW // 256 + 4096)  # large: sampled, not read whole
    a = _checkpoint(tmp_path / "a", weights)
    b = shutil.copytree(a, tmp_path / "elsewhere" / "b")
    (b / ".raylens-complete").write_text("")
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "x.pyc").write_bytes(b"cache")
    assert model_fingerprint(a) == model_fingerprint(b)


def test_any_changed_weight_file_or_name_changes_it(tmp_path):
    weights = bytearray(bytes(range(256)) * (_HASH_WHOLE_BELOW // 256 + 4096))
    base = model_fingerprint(_checkpoint(tmp_path / "base", bytes(weights)))
    tuned = bytearray(weights)
    tuned[100] ^= 1  # one byte of a sampled window (a fine-tune moves every weight, so every window)
    assert model_fingerprint(_checkpoint(tmp_path / "tuned", bytes(tuned))) != base
    longer = _checkpoint(tmp_path / "longer", bytes(weights) + b"\0")
    assert model_fingerprint(longer) != base
    renamed = _checkpoint(tmp_path / "renamed", bytes(weights))
    (renamed / "model.safetensors").rename(renamed / "model-00001.safetensors")
    assert model_fingerprint(renamed) != base


def test_an_empty_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files"):
        model_fingerprint(tmp_path)
