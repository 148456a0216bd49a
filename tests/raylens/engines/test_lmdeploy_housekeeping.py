"""The lmdeploy engine's process housekeeping (host memory, the GIL switch interval), on CPU (lmdeploy itself is
not needed: the functions only touch the engine object they are given, or the interpreter)."""
from __future__ import annotations

import gc
import logging
import sys
from types import SimpleNamespace

import pytest

from raylens.engines.lmdeploy_engine import _quiet_host_memory_housekeeping, set_gil_switch_interval


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


def test_gil_switch_interval_is_set_in_milliseconds_and_bounded():
    before = sys.getswitchinterval()
    try:
        set_gil_switch_interval(0.5)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        for bad in (0, -1, 1000):
            with pytest.raises(ValueError, match="gil_switch_interval_ms"):
                set_gil_switch_interval(bad)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_an_engine_in_its_own_process_gets_the_trim_setting_through_its_environment(caplog):
    from raylens.engines.lmdeploy_engine import TRIM_COUNT_ENV, _engine_process_env

    assert _engine_process_env(8192) == {TRIM_COUNT_ENV: "8192"}
    assert _engine_process_env(-5) == {TRIM_COUNT_ENV: "0"}

    class ZMQMPEngine:  # lmdeploy's multi-process engine: nothing to set in this process, nothing to warn of
        pass

    try:
        with caplog.at_level(logging.WARNING):
            _quiet_host_memory_housekeeping(SimpleNamespace(engine=ZMQMPEngine()), 8192)
        assert "gc.collect() stays on" not in caplog.text
    finally:
        gc.unfreeze()
