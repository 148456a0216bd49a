"""An engine that records when it was built, so the benchmark can time the job's steady state.

The job's engines live in Ray actors the benchmark cannot reach. Passed as `--engine
bench.timed_engine:TimedEngine` with `{"ready_dir": DIR, "inner": "lmdeploy"}` in the engine options, each
engine writes `DIR/engine-<pid>.json` = {"started": t, "ready": t} (wall-clock `time.time()`), then works
exactly like the `inner` engine. Throughput measured from the first engine's `ready` to the last output includes the
pipeline's fill and drain but no start-up, which makes it a conservative steady-state figure.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from raylens.engines.base import SamplingParams, VLRequest, VLResult


class TimedEngine:
    def __init__(self, model_dir: str, *, ready_dir: str, inner: str = "lmdeploy", **options: Any) -> None:
        from raylens.engines import create_engine

        started = time.time()
        self._engine = create_engine(inner, model_dir, **options)
        self.spec, self.model_name = self._engine.spec, self._engine.model_name
        Path(ready_dir).mkdir(parents=True, exist_ok=True)
        Path(ready_dir, f"engine-{os.getpid()}.json").write_text(json.dumps({"started": started, "ready": time.time()}))

    async def generate(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        return await self._engine.generate(requests, params)

    def close(self) -> None:
        self._engine.close()


def read_ready_times(ready_dir: str) -> list[dict]:
    """Every engine's {"started", "ready"} written under `ready_dir`, earliest ready first."""
    found = [json.loads(p.read_text()) for p in Path(ready_dir).glob("engine-*.json")]
    return sorted(found, key=lambda r: r["ready"])
