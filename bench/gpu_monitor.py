"""Sample GPU utilisation with nvidia-smi while a contender runs (no extra Python dependency)."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time


class GpuMonitor:
    """`with GpuMonitor() as m: ...` then `m.samples`: (wall-clock time.time(), [util% per GPU])."""

    def __init__(self, interval_ms: int = 500) -> None:
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, list[int]]] = []
        self._proc = None
        self._thread = None

    def __enter__(self) -> "GpuMonitor":
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
            stdout=subprocess.PIPE, text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        gpus: list[int] = []
        n = None
        for line in self._proc.stdout:
            if n is None:
                n = int(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.count("GPU "))
            gpus.append(int(line.strip() or 0))
            if len(gpus) == n:
                self.samples.append((round(time.time(), 2), gpus))
                gpus = []

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def mean_between(self, start: float, end: float) -> float | None:
        vals = [sum(u) / len(u) for t, u in self.samples if start <= t <= end and u]
        return round(sum(vals) / len(vals), 1) if vals else None
