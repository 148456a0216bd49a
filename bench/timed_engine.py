"""An engine that records when it was built, and what it was doing afterwards, for the benchmark.

The job's engines live in Ray actors the benchmark cannot reach. Passed as `--engine
bench.timed_engine:TimedEngine` with `{"ready_dir": DIR, "inner": "lmdeploy"}` in the engine options, each
engine writes `DIR/engine-<pid>.json` = {"started": t, "ready": t} (wall-clock `time.time()`), then works
exactly like the `inner` engine. Throughput measured from the first engine's `ready` to the last output includes the
pipeline's fill and drain but no start-up, which makes it a conservative steady-state figure.

With `"timeline": true` it also samples, every 100 ms, how many requests the engine holds (submitted to
`generate` and not returned) and, for lmdeploy, its scheduler's running and waiting sequences; and it
logs each batch's arrival and return. That is what shows whether the GPU idles because the engine has
nothing queued (the feed) or because queued requests are not yet scheduled (the engine). Written to
`DIR/timeline-<pid>.json` every second and whenever the engine falls idle (so a run shorter than a second
still leaves its batches); `read_timelines` collects them. The timeline's "gc" lists the actor's garbage
collections that took 20 ms or more (`GcPauses`): session 9's timeline showed the actor's event loop frozen for
up to 1.35 s with the GPU idle, and a full collection of a process holding lmdeploy is one suspect.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from raylens.engines.base import SamplingParams, VLRequest, VLResult


class TimedEngine:
    def __init__(self, model_dir: str, *, ready_dir: str, inner: str = "lmdeploy", timeline: bool = False,
                 profile: dict | None = None, vary_output: bool = False, **options: Any) -> None:
        """`profile` = {"dir", "after_s", "duration_s"}: py-spy this actor for a window of its steady state,
        counted from its first batch (bench/self_profile.py). `vary_output`: each request generates
        `bench.data.output_length(<its image>)` tokens instead of the job's --max-new-tokens (the mixed
        workload of bench.throughput), exactly as the pipeline contender is told."""
        from raylens.engines import create_engine

        started = time.time()
        self._engine = create_engine(inner, model_dir, **options)
        self.spec, self.model_name = self._engine.spec, self._engine.model_name
        self._dir = Path(ready_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        Path(ready_dir, f"engine-{os.getpid()}.json").write_text(json.dumps({"started": started, "ready": time.time()}))
        self._timeline = {"samples": [], "batches": [], "gc": []} if timeline else None
        self._gc = GcPauses(self._timeline["gc"]) if timeline else None
        self._held = 0
        self._sampler: asyncio.Task | None = None
        self._profile = profile
        self._vary_output = vary_output

    def __getattr__(self, name: str):  # tiling(), stream(), ...: whatever the inner engine offers
        if name == "_engine":  # not built (yet): no recursion
            raise AttributeError(name)
        return getattr(self._engine, name)

    async def generate(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        if self._profile:
            from bench.self_profile import profile_later

            profile_later(self._profile["dir"], "engine-actor", self._profile["after_s"], self._profile["duration_s"])
            self._profile = None
        if self._vary_output:
            return await self._by_output_length(requests, params)
        return await self._timed(requests, params)

    async def _timed(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        if self._timeline is None:
            return await self._engine.generate(requests, params)
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample())
        arrived = time.time()
        self._held += len(requests)
        try:
            return await self._engine.generate(requests, params)
        finally:
            self._held -= len(requests)
            self._timeline["batches"].append((round(arrived, 3), round(time.time(), 3), len(requests)))
            if self._held == 0:  # idle (the run's end, at the latest): the file gets every batch so far
                self._write_timeline()

    async def _by_output_length(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        """One inner call per answer length, all at once (an async engine batches them together)."""
        from dataclasses import replace

        from bench.data import output_length

        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):  # request ids are "<image id>#<prompt index>"
            groups.setdefault(output_length(r.request_id.rsplit("#", 1)[0]), []).append(i)
        outs = await asyncio.gather(*(self._timed([requests[i] for i in idx], replace(params, max_new_tokens=n))
                                      for n, idx in groups.items()))
        results: list[VLResult | None] = [None] * len(requests)
        for idx, out in zip(groups.values(), outs):
            for i, res in zip(idx, out):
                results[i] = res
        return results

    def _scheduler(self):
        """lmdeploy's PyTorch scheduler when the engine runs in this process, else None."""
        backend = getattr(getattr(self._engine, "_engine", None), "engine", None)
        return getattr(backend, "scheduler", None)

    def _write_timeline(self) -> None:
        self._dir.joinpath(f"timeline-{os.getpid()}.json").write_text(json.dumps(self._timeline))

    async def _sample(self) -> None:
        last_write = 0.0
        while True:
            scheduler = self._scheduler()
            running = waiting = None
            if scheduler is not None:
                try:
                    running, waiting = scheduler.num_running(), scheduler.num_waiting()
                except Exception:  # noqa: BLE001 - an lmdeploy internal; the sample just lacks it
                    pass
            now = time.time()
            self._timeline["samples"].append((round(now, 3), self._held, running, waiting))
            if now - last_write > 1.0:
                self._write_timeline()
                last_write = now
            await asyncio.sleep(0.1)

    def close(self) -> None:
        if self._gc is not None:
            self._gc.stop()
        self._engine.close()


class GcPauses:
    """Appends `(start, seconds, generation, collected)` to `into` for every garbage collection of this process
    that takes at least `min_s` (through `gc.callbacks`, from construction until `stop`)."""

    def __init__(self, into: list, min_s: float = 0.02) -> None:
        self._into, self._min_s, self._started = into, min_s, 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.time()
        elif self._started:
            seconds = time.time() - self._started
            if seconds >= self._min_s:
                self._into.append((round(self._started, 3), round(seconds, 4), info.get("generation"), info.get("collected")))

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


def read_ready_times(ready_dir: str) -> list[dict]:
    """Every engine's {"started", "ready"} written under `ready_dir`, earliest ready first."""
    found = [json.loads(p.read_text()) for p in Path(ready_dir).glob("engine-*.json")]
    return sorted(found, key=lambda r: r["ready"])


def read_timelines(ready_dir: str) -> list[dict]:
    """Every engine's timeline ({"samples": [(t, held, running, waiting)], "batches": [(in, out, n)],
    "gc": [(start, seconds, generation, collected)]})."""
    return [json.loads(p.read_text()) for p in sorted(Path(ready_dir).glob("timeline-*.json"))]
