"""The lmdeploy engine's host-memory housekeeping, on CPU (lmdeploy itself is not needed: the function
only touches the engine object it is given)."""
from __future__ import annotations

import gc
import logging
from types import SimpleNamespace

from raylens.engines.lmdeploy_engine import _quiet_host_memory_housekeeping


def test_trim_count_is_raised_and_startup_objects_are_frozen_out_of_collections():
    backend = SimpleNamespace(_multimodal_session_trim_count=128)
    before = gc.get_freeze_count()
    try:
        _quiet_host_memory_housekeeping(SimpleNamespace(engine=backend), 8192)
        assert backend._multimodal_session_trim_count == 8192
        assert gc.get_freeze_count() > before  # what was alive (this test's objects included) is frozen
    finally:
        gc.unfreeze()


def test_zero_turns_the_trim_off_and_an_unknown_engine_is_reported(caplog):
    backend = SimpleNamespace(_multimodal_session_trim_count=128)
    try:
        _quiet_host_memory_housekeeping(SimpleNamespace(engine=backend), 0)
        assert backend._multimodal_session_trim_count == 0
        with caplog.at_level(logging.WARNING):
            _quiet_host_memory_housekeeping(SimpleNamespace(engine=SimpleNamespace()), 8192)  # an lmdeploy without it
        assert "gc.collect() stays on" in caplog.text
    finally:
        gc.unfreeze()
