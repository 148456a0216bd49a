"""The KV-cache cap: lowers lmdeploy's fraction only where the model cannot use it."""
from __future__ import annotations

import pytest

from raylens.engines.kv_cache import CAP_HEADROOM, capped_cache_fraction, kv_cache_bytes_needed

GB = 1 << 30
DEMO = 2 * 3 * 2 * 32 * 2  # the shipped demo model: 3 layers, 2 KV heads of 32, bfloat16
INTERNVL2_2B = 2 * 24 * 8 * 128 * 2


def test_needed_is_every_slot_full():
    assert kv_cache_bytes_needed(768, max_batch_size=1024, session_len=4096) == 768 * 1024 * 4096


def test_tiny_model_on_a_big_gpu_is_capped():
    fraction = capped_cache_fraction(DEMO, max_batch_size=1024, session_len=4096, free_bytes=140 * GB)
    assert fraction < 0.03
    # what lmdeploy then allocates still holds every slot's full session
    assert fraction * 140 * GB == pytest.approx(CAP_HEADROOM * DEMO * 1024 * 4096)


def test_real_model_keeps_the_requested_fraction():
    assert capped_cache_fraction(INTERNVL2_2B, max_batch_size=1024, session_len=32768, free_bytes=78 * GB) == 0.8
    assert capped_cache_fraction(INTERNVL2_2B, max_batch_size=1024, session_len=32768, free_bytes=78 * GB,
                                 fraction=0.4) == 0.4


@pytest.mark.parametrize("kv, session, free", [(None, 4096, GB), (768, None, GB), (768, 4096, 0)])
def test_unknown_shape_leaves_the_fraction(kv, session, free):
    assert capped_cache_fraction(kv, max_batch_size=256, session_len=session, free_bytes=free) == 0.8
