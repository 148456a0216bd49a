"""The smallest reproduction of the 1B puzzle (docs/benchmarks.md): torch's CPU ops slow down many times
over when they run on every core of a machine some of whose cores are busy.

    python -m bench.omp_straggler --out straggler.json

lmdeploy preprocesses images on a thread of the engine's process with torchvision's `to_tensor` and
`normalize`, i.e. torch CPU ops, which split each op over `torch.get_num_threads()` threads (one per core by
default; Ray sets 1 in its workers). Every split waits for its slowest thread, so when other threads of
the machine keep some cores busy (lmdeploy's engine loop is one, at 63% of a core on the 1B shape), an
op waits for a thread the OS has descheduled. This times one 448x448 tile's to_tensor + normalize (the
same torch ops) with 0..2 busy processes beside it, for several thread counts. No GPU, no lmdeploy.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _busy(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def time_tile_ms(threads: int, repeats: int = 60) -> float:
    """Median ms of torchvision's ToTensor + Normalize arithmetic on one uint8 448x448x3 tile."""
    import torch

    torch.set_num_threads(threads)
    tile = np.random.default_rng(0).integers(0, 256, size=(448, 448, 3), dtype=np.uint8)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x = torch.from_numpy(tile).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # to_tensor
        x.sub_(mean).div_(std)  # normalize
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.omp_straggler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    p.add_argument("--threads", type=int, nargs="+", default=sorted({cores, 4, 1}, reverse=True))
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside the timed one")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for busy in a.busy:
        stop = mp.Event()
        procs = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
        for proc in procs:
            proc.start()
        time.sleep(0.5)
        for threads in a.threads:
            rows.append({"busy_processes": busy, "torch_threads": threads, "tile_ms": round(time_tile_ms(threads), 3)})
            print(json.dumps(rows[-1]), flush=True)
        stop.set()
        for proc in procs:
            proc.join()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"cores": cores, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
