"""A process profiles itself with py-spy for a window of its steady state: all threads (idle ones shown)
and, separately, only the thread holding the GIL. Used where wrapping a whole process tree in py-spy
costs too much (a Ray engine actor, a pipeline in the middle of its run).

`profile_later(out_dir, label, after_s, duration_s)` returns at once; the records land as
`out_dir/<label>-<pid>-all.txt` and `-gil.txt` (py-spy's raw collapsed stacks; `bench.profile_summary`
reads them). Needs `py-spy` on PATH; without it nothing happens.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path


def profile_later(out_dir: str | os.PathLike, label: str, after_s: float, duration_s: int) -> None:
    spy = shutil.which("py-spy")
    if spy is None:
        return
    pid = os.getpid()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def record() -> None:
        time.sleep(after_s)
        common = [spy, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", "50", "--nonblocking",
                  "--format", "raw"]
        for suffix, extra in (("all", ["--idle"]), ("gil", ["--gil"])):
            subprocess.Popen([*common, *extra, "--output", str(out / f"{label}-{pid}-{suffix}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    threading.Thread(target=record, daemon=True).start()
