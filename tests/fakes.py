"""Engines for tests that need behaviour a real model cannot be asked for: speed, crashes.

Loaded by the job through `--engine fakes:Name` (tests/ is on the Ray workers' PYTHONPATH, see conftest).
They implement the real `VLEngine` protocol; everything around them (Ray Data, shards, Parquet) is real.
"""
from __future__ import annotations

import asyncio
import os
import time

from raylens.checkpoints.formats import read_model_spec
from raylens.engines.base import EngineDeadError, SamplingParams, VLDelta, VLRequest, VLResult

POISON_WIDTH = 13  # an image this wide kills the engine's process


class EchoEngine:
    """Answers `<question> | <width>x<height>` after `delay_s` per batch."""

    def __init__(self, model_dir: str, *, model_name: str | None = None, delay_s: float = 0.0, **_: object) -> None:
        self.spec = read_model_spec(model_dir)
        self.model_name = model_name or model_dir
        self.delay_s = delay_s

    async def generate(self, requests, params: SamplingParams) -> list[VLResult]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        out = []
        for r in requests:
            size = "none" if r.image is None else "x".join(map(str, r.image.original_size))
            out.append(VLResult(r.request_id, f"{r.question} | {size}", num_input_tokens=1, num_output_tokens=1, finish_reason="stop"))
        return out

    async def stream(self, request: VLRequest, params: SamplingParams):
        """The answer `generate` gives, one word per delta."""
        [result] = await self.generate([request], params)
        words = result.text.split(" ")
        for i, word in enumerate(words):
            yield VLDelta(request.request_id, word if i == 0 else " " + word, 1, i + 1)
        yield VLDelta(request.request_id, "", 1, len(words), finish_reason="stop")

    def close(self) -> None:
        pass


class CrashingEngine(EchoEngine):
    """Like EchoEngine, but a request whose image is POISON_WIDTH pixels wide kills the process."""

    async def generate(self, requests: list[VLRequest], params: SamplingParams) -> list[VLResult]:
        if any(r.image is not None and r.image.original_size[0] == POISON_WIDTH for r in requests):
            os._exit(17)
        return await super().generate(requests, params)


class UnbuildableEngine(EchoEngine):
    """An engine whose constructor rejects its options, as lmdeploy does with a misspelt --engine-args key."""

    def __init__(self, model_dir: str, **options: object) -> None:
        raise TypeError(f"UnbuildableEngine.__init__() got an unexpected keyword argument {sorted(options)[-1]!r}")


class DyingEngine(EchoEngine):
    """An engine whose device fails once: the first batch any instance sees raises EngineDeadError (a file
    `marker` records that it happened, so the restarted actor's engine works). Each construction appends a
    line to `marker + ".built"`."""

    def __init__(self, model_dir: str, *, marker: str, **options: object) -> None:
        super().__init__(model_dir, **options)
        self.marker = marker
        with open(marker + ".built", "a") as f:
            f.write(f"{os.getpid()}\n")

    async def generate(self, requests, params: SamplingParams) -> list[VLResult]:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise EngineDeadError("the device is gone (test)")
        return await super().generate(requests, params)


class SlowEngine(EchoEngine):
    """Streams back the words of the last user message, `word_delay_s` apart: an answer still running when a
    test stops it (the web page's Stop button) or keeps the replica busy (overload)."""

    def __init__(self, model_dir: str, *, word_delay_s: float = 0.25, **options: object) -> None:
        super().__init__(model_dir, **options)
        self.word_delay_s = word_delay_s

    async def stream(self, request: VLRequest, params: SamplingParams):
        conversation, _ = request.as_conversation()
        words = conversation.turns[-1].user.split()
        for i, word in enumerate(words):
            await asyncio.sleep(self.word_delay_s)
            yield VLDelta(request.request_id, word if i == 0 else " " + word, 1, i + 1)
        yield VLDelta(request.request_id, "", 1, len(words), finish_reason="stop")


class ExitingEngine(EchoEngine):
    """Like EchoEngine, but its process dies (`os._exit`) on chosen batches of the whole job.

    Every `generate` call, in any actor of any run, claims the next number in `kill_dir` (a file
    created with O_EXCL: numbers are unique across processes and survive a killed driver). A call
    whose number is in `kill_at` appends a line to `kill_dir/kills.log` and exits the process, so
    exactly len(kill_at) engine actors die once that many batches were started, wherever they ran."""

    def __init__(self, model_dir: str, *, kill_dir: str, kill_at: list[int], **options: object) -> None:
        super().__init__(model_dir, **options)
        self.kill_dir = kill_dir
        self.kill_at = frozenset(kill_at)
        self._next = 0

    def _claim(self) -> int:
        while True:
            try:
                os.close(os.open(os.path.join(self.kill_dir, f"batch-{self._next:06d}"), os.O_CREAT | os.O_EXCL))
                return self._next
            except FileExistsError:
                self._next += 1

    async def generate(self, requests: list[VLRequest], params: SamplingParams) -> list[VLResult]:
        number = self._claim()
        if number in self.kill_at:
            with open(os.path.join(self.kill_dir, "kills.log"), "a") as log:
                log.write(f"{time.time():.3f} pid={os.getpid()} batch={number}\n")
            os._exit(17)
        return await super().generate(requests, params)
