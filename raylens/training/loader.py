"""Per-worker batches for training: which samples each rank reads at each step, loaded off the critical path.

Why positions and not a shuffled dataset object: a run must resume (after a worker failure, or when the
command is rerun) exactly where its last checkpoint stopped, on however many workers. So data is one
endless stream of *positions*; position k is the record `order(k)` (epoch k // N: a permutation seeded by
(seed, epoch)); a step of the whole run takes the next `batch_size x grad_accum x workers` positions, and
rank r's micro-batch j holds positions `start + j*B*W + r*B ... + B`. A checkpoint stores only how many
positions were consumed.

Loading: each rank iterates a `RankBatches` through a torch DataLoader with `--loader-workers` processes
and prefetching, so reading, decoding, tiling, tokenising and collating happen while the model trains.
Worker w of L builds micro-batches w, w+L, ...; the DataLoader returns them in order.

A record that cannot be used (`BadRecord`, a `StructureError` is already filtered at setup) is replaced by
another record drawn from a stream seeded by its position (deterministic), and reported with the batch
(`skipped`) so the run's summary counts it; `MAX_SUBSTITUTES` failures in a row stop the worker with a
clear error (most likely a wrong `--image-root`).

Sources: `RecordSource` (records read from data files) and, through the same interface, the demo's endless
synthetic stream (`jobs.train_demo`), whose order is fixed: `num_records` None means "position k is the
k-th sample of the stream", no epochs, no shuffling.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch.utils.data

from raylens.training.records import TrainingRecord
from raylens.training.samples import BadRecord, EncodedSample, SampleEncoder, collate

MAX_SUBSTITUTES = 32


class SampleSource(Protocol):
    """Where samples come from; pickled into every loader process."""

    num_records: int | None  # None: an endless stream, position k = the k-th sample

    def encode(self, index: int, encoder: SampleEncoder) -> EncodedSample: ...  # may raise BadRecord

    def record_id(self, index: int) -> str: ...


@dataclass
class RecordSource:
    """Records read from data files (`raylens.training.records`); images are read when encoded."""

    records: Sequence[TrainingRecord]

    @property
    def num_records(self) -> int:
        return len(self.records)

    def encode(self, index: int, encoder: SampleEncoder) -> EncodedSample:
        return encoder.encode(self.records[index])

    def record_id(self, index: int) -> str:
        return self.records[index].id


@dataclass(frozen=True)
class Order:
    """Position -> record index: a fresh permutation of the N records every epoch (or none: `shuffle=False`)."""

    num_records: int | None
    seed: int
    shuffle: bool = True

    def index(self, position: int) -> int:
        if self.num_records is None:
            return position
        epoch, offset = divmod(position, self.num_records)
        if not self.shuffle:
            return offset
        return self._permutation(epoch)[offset]

    def _permutation(self, epoch: int) -> list[int]:
        cache = self.__dict__.setdefault("_cache", {})
        if epoch not in cache:
            cache.clear()  # one epoch at a time is enough
            permutation = list(range(self.num_records))
            random.Random(f"raylens.training/{self.seed}/{epoch}").shuffle(permutation)
            cache[epoch] = permutation
        return cache[epoch]

    def substitute(self, position: int, attempt: int) -> int:
        """The record tried instead of position's own after `attempt` failures (deterministic)."""
        return random.Random(f"raylens.training/substitute/{self.seed}/{position}/{attempt}").randrange(self.num_records)


def micro_batch_positions(start: int, micro_batch: int, rank: int, world: int, batch_size: int) -> range:
    """Positions of rank `rank`'s micro-batch number `micro_batch` (from 0) of a run that resumed at `start`."""
    first = start + micro_batch * batch_size * world + rank * batch_size
    return range(first, first + batch_size)


def load_sample(source: SampleSource, encoder: SampleEncoder, order: Order, position: int) -> EncodedSample:
    """The sample at `position`, or a substitute for it (see the module docstring)."""
    skipped: list[tuple[str, str]] = []
    index = order.index(position)
    for attempt in range(MAX_SUBSTITUTES + 1):
        try:
            sample = source.encode(index, encoder)
        except BadRecord as exc:
            if source.num_records is None:
                raise
            skipped.append((source.record_id(index), exc.kind))
            last = exc
            index = order.substitute(position, attempt)
            continue
        sample.skipped = tuple(skipped)
        return sample
    examples = "; ".join(f"{rid}: {kind}" for rid, kind in skipped[:3])
    raise RuntimeError(f"{MAX_SUBSTITUTES + 1} records in a row could not be used ({examples}; last: {last}). "
                       "Check --image-root and the data file")


class RankBatches(torch.utils.data.IterableDataset):
    """An iterable of collated micro-batches for one rank, from micro-batch 0 on (see module docstring).

    `torch.utils.data.get_worker_info()` splits micro-batches among loader processes; DataLoader hands them
    back in order.
    """

    def __init__(self, source: SampleSource, encoder: SampleEncoder, *, order: Order, start: int, rank: int,
                 world: int, batch_size: int, pad_id: int, pixel_dtype: torch.dtype | None = None):
        self.source, self.encoder, self.order = source, encoder, order
        self.start, self.rank, self.world, self.batch_size, self.pad_id = start, rank, world, batch_size, pad_id
        self.pixel_dtype = pixel_dtype  # the model's pixel dtype, converted to here (see `collate`)

    def batch(self, micro_batch: int) -> dict:
        positions = micro_batch_positions(self.start, micro_batch, self.rank, self.world, self.batch_size)
        return collate([load_sample(self.source, self.encoder, self.order, p) for p in positions], self.pad_id,
                       pixel_dtype=self.pixel_dtype)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        micro_batch = worker
        while True:
            yield self.batch(micro_batch)
            micro_batch += workers


def make_loader(batches: RankBatches, *, loader_workers: int, prefetch: int = 2):
    """A DataLoader over `batches` (already collated: batch_size=None)."""
    kwargs = dict(num_workers=loader_workers, batch_size=None)
    if loader_workers:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    return torch.utils.data.DataLoader(batches, **kwargs)
