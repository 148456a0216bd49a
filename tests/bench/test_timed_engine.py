"""The benchmark engine's record of garbage-collection pauses (what froze the engine actor's loop?)."""
from __future__ import annotations

import gc

from bench.timed_engine import GcPauses


def test_gc_pauses_are_recorded_until_stopped():
    pauses: list = []
    recorder = GcPauses(pauses, min_s=0.0)  # every collection, however short
    junk = [[i] for i in range(50_000)]  # something for a full collection to walk
    gc.collect(2)
    recorded = list(pauses)
    recorder.stop()
    gc.collect(2)
    del junk
    assert recorded, "a full collection was not recorded"
    start, seconds, generation, collected = recorded[-1]
    assert generation == 2 and seconds >= 0 and start > 0 and collected >= 0
    assert pauses == recorded  # nothing after stop()


def test_short_collections_are_left_out():
    pauses: list = []
    recorder = GcPauses(pauses, min_s=60.0)
    gc.collect(0)
    recorder.stop()
    assert pauses == []
