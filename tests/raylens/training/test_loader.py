"""Which samples each rank reads at each step: every position exactly once, the same after a resume, bad
records replaced deterministically and reported."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from raylens.training.loader import (
    MAX_SUBSTITUTES,
    Order,
    RankBatches,
    load_sample,
    make_loader,
    micro_batch_positions,
)
from raylens.training.samples import BadRecord, EncodedSample


@dataclass
class FakeSource:
    """Records 0..n-1; `bad` ones raise BadRecord. Encoded samples carry the index as their only token."""

    n: int
    bad: frozenset = frozenset()

    @property
    def num_records(self):
        return self.n

    def record_id(self, index):
        return f"rec{index}"

    def encode(self, index, encoder):
        if index in self.bad:
            raise BadRecord("bad_image", f"record {index}")
        return EncodedSample(self.record_id(index), [index], [index], None)


def test_positions_partition_each_step_over_ranks():
    world, batch, accum = 3, 2, 2
    seen = []
    for step in range(4):
        for micro in range(step * accum, (step + 1) * accum):
            for rank in range(world):
                seen += list(micro_batch_positions(0, micro, rank, world, batch))
    assert sorted(seen) == list(range(4 * world * batch * accum))


def test_a_resumed_run_reads_what_the_uninterrupted_one_would():
    order = Order(10, seed=1)
    whole = [order.index(p) for m in range(6) for p in micro_batch_positions(0, m, 1, 2, 3)]
    resumed_at = 2 * 2 * 3  # two micro-batches of 2 ranks x 3 samples were consumed
    resumed = [order.index(p) for m in range(4) for p in micro_batch_positions(resumed_at, m, 1, 2, 3)]
    assert resumed == whole[2 * 3:]


def test_every_epoch_is_a_permutation_of_the_records():
    order = Order(7, seed=0)
    epochs = [[order.index(e * 7 + i) for i in range(7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert [Order(7, 0, shuffle=False).index(p) for p in range(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert Order(None, 0).index(12345) == 12345  # endless streams are read in order


def test_bad_records_are_replaced_deterministically_and_reported():
    source = FakeSource(20, bad=frozenset({3, 4, 5}))
    order = Order(20, seed=0, shuffle=False)
    sample = load_sample(source, None, order, 3)
    again = load_sample(source, None, order, 3)
    assert sample.input_ids == again.input_ids and sample.input_ids[0] not in source.bad
    assert sample.skipped[0] == ("rec3", "bad_image")
    assert load_sample(source, None, order, 6).skipped == ()


def test_a_data_set_of_only_bad_records_stops_with_a_clear_error():
    source = FakeSource(4, bad=frozenset(range(4)))
    with pytest.raises(RuntimeError, match=f"{MAX_SUBSTITUTES + 1} records in a row.*--image-root"):
        load_sample(source, None, Order(4, 0), 0)


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_loader_processes_return_micro_batches_in_order(loader_workers):
    source = FakeSource(50)
    batches = RankBatches(source, None, order=Order(50, 0, shuffle=False), start=4, rank=1, world=2, batch_size=3,
                          pad_id=0)
    stream = iter(make_loader(batches, loader_workers=loader_workers))
    got = [next(stream)["input_ids"][:, 0].tolist() for _ in range(5)]
    assert got == [[p % 50 for p in micro_batch_positions(4, m, 1, 2, 3)] for m in range(5)]
