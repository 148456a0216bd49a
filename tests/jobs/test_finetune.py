"""`python -m jobs.finetune` end to end, as a user runs it: a real CLI process with its own Ray instance and 2
CPU workers, LoRA on the shipped demo model. One scenario (Ray Train runs are the expensive part of the
suite), several checks:

* it learns: the demo model answers any question with a caption ("a red circle on a white background.").
  Taught to answer "What shape is this?" with "a circle", merged (jobs.merge) and run by
  `jobs.caption --question-column` on held-out images (a split training never sees), its exact-match
  accuracy goes from ~0 to >= 90%;
* it survives failures: one training worker process is SIGKILLed mid-run (Ray Train replaces the worker
  group, training continues from the last checkpoint, not from step 0); then the whole command is killed
  (every process of its session) and rerun unchanged, and it resumes from its last checkpoint and finishes.
  The evidence is the run's own record: the last checkpoint's `starts` (the step each attempt began at)
  is [0, a, b], and its metrics history holds each step exactly once;
* it counts the records it skips (bad JSON, empty answer, tags without images at setup; a missing and a
  corrupt image while training), keeps the last --keep checkpoints, reports per-step metrics and describes
  itself in run.json; rerunning a finished run does nothing; another run in the same --output is refused.

Progress is watched on the filesystem (checkpoint directories appear as they are written; Ray's log
forwarding lags by many steps on a busy machine) and workers are found in the command's process tree.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import subprocess_env
from readme_blocks import readme_commands
from jobs.finetune import UsageError, main, setup
from jobs.finetune_config import FinetuneConfig
from raylens.training.checkpoint import checkpoint_step, list_checkpoints
from raylens.training.demo_data import write_shape_questions

pytestmark = pytest.mark.slow  # Ray Train runs: tens of seconds on 2 cores

STEPS = 40
SAVE_EVERY = 10
TIMEOUT_S = 900
ROOT = Path(__file__).resolve().parents[2]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (session id, command line) of every process we can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (int(stat[stat.rfind(")") + 2:].split()[3]), cmdline)
    return out


class Cli:
    """`python -m jobs.finetune ...` in a session of its own; its output goes to a file."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-u", "-m", "jobs.finetune", *args], cwd=ROOT, stdout=f,
                                         stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)

    def workers(self) -> set[int]:
        """pids of this command's Ray Train worker processes."""
        return {pid for pid, (sid, cmd) in _processes().items()
                if sid == self.proc.pid and cmd.startswith("ray::RayTrainWorker")}

    def kill_session(self) -> None:
        """SIGKILL to every process of the command's session (Ray's actors have process groups of their own)."""
        for pid, (sid, _) in _processes().items():
            if sid == self.proc.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=60)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, condition, deadline: float, what: str):
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"jobs.finetune exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.05)
        self.kill_session()
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")


def _state(out: Path, step: int) -> dict | None:
    try:
        return json.loads((out / f"checkpoint_{step:06d}" / "state.json").read_text())
    except (OSError, ValueError):  # not there yet, or being written
        return None


def _latest_state(out: Path) -> dict | None:
    """The state of the latest *complete* checkpoint, the one a resume starts from. A checkpoint's state.json
    can be there before its other files (Ray copies them one by one): once in CI the first command was killed
    when only the newest checkpoint's state.json had been copied, the rerun rightly resumed from the checkpoint
    before, and the starts this test expects were not recorded. So the kills wait for a complete checkpoint."""
    found = list_checkpoints(pafs.LocalFileSystem(), str(out))
    return _state(out, found[-1][0]) if found else None


def _qa(record_id, image, question="<image>\nWhat shape is this?", answer="a circle"):
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    paths = write_shape_questions(root, train=96, held_out=40, seed=0)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with open(paths["train"], "a") as f:
        for row in (_qa("missing", "images/nope.png"), _qa("broken", "images/broken.png"),
                    _qa("empty", "images/train/00000.png", answer=" "),
                    _qa("tags", "images/train/00000.png", question="<image><image> which?"),
                    {"id": "silent", "image": "images/train/00000.png", "conversations": []},
                    _qa("long", "images/train/00000.png",  # over the default --max-length of 4096 tokens
                        question="<image>\n" + " ".join(f"w{i}" for i in range(6000)))):
            f.write(json.dumps(row) + "\n")
        f.write("{not json\n")
    out = root / "run"
    # The README's command (its data and run directory here), plus checkpoints often enough to kill around.
    (readme,) = [w for w in readme_commands("finetune-local") if "jobs.finetune" in w]
    flags = readme[readme.index("jobs.finetune") + 1:]
    for flag in ("--data", "--output"):
        del flags[flags.index(flag):flags.index(flag) + 2]
    args = ["--data", str(paths["train"]), "--output", str(out), *flags, "--save-every", str(SAVE_EVERY),
            "--keep", "2", "--loader-workers", "1", "--max-failures", "2", "--log-every", "5"]
    assert args[args.index("--max-steps") + 1] == str(STEPS) and args[args.index("--workers") + 1] == "2"
    deadline = time.monotonic() + TIMEOUT_S

    first = Cli(args, root / "first.log")
    first.wait(lambda: _latest_state(out), deadline, "the first complete checkpoint")
    workers = first.wait(first.workers, deadline, "the worker processes")
    before_kill = _latest_state(out)["step"]
    os.kill(sorted(workers)[-1], signal.SIGKILL)
    # the worker group is replaced, resumes from a checkpoint and saves a later one
    after_restart = first.wait(lambda: (s := _latest_state(out)) and len(s["starts"]) == 2 and s, deadline,
                               "a checkpoint written after the worker group was replaced")
    replaced = first.workers().isdisjoint(workers)
    first.kill_session()
    summary_after_kill = (out / "_summary.json").exists()

    second = Cli(args, root / "second.log")
    code = second.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    assert code == 0, second.output()[-4000:]
    return dict(root=root, paths=paths, out=out, args=args, before_kill=before_kill, after_restart=after_restart,
                replaced=replaced, summary_after_kill=summary_after_kill, second=second)


def test_a_killed_worker_is_replaced_and_training_continues_from_its_checkpoint(scenario):
    restart_step = scenario["after_restart"]["starts"][1]
    assert scenario["before_kill"] <= restart_step < scenario["after_restart"]["step"] < STEPS
    assert scenario["replaced"]  # Ray Train restarts the whole worker group
    assert not scenario["summary_after_kill"]  # the first command never finished


def test_a_rerun_command_resumes_from_its_last_checkpoint_and_finishes(scenario):
    out = scenario["out"]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["completed"] and summary["error"] is None
    assert (summary["step"], summary["samples_seen"]) == (STEPS, STEPS * 2 * 4)
    starts = _state(out, STEPS)["starts"]
    assert len(starts) == 3 and starts[1] == scenario["after_restart"]["starts"][1]
    assert starts[2] >= scenario["after_restart"]["step"]
    assert f"resumed from checkpoint at step {starts[2]}" in scenario["second"].output()
    history = [json.loads(line) for line in (out / f"checkpoint_{STEPS:06d}" / "metrics.jsonl").open()]
    assert [m["step"] for m in history] == list(range(1, STEPS + 1))
    assert [m["samples"] for m in history] == [8 * s for s in range(1, STEPS + 1)]


def test_skipped_records_are_counted_and_the_last_checkpoints_kept(scenario):
    summary = json.loads((scenario["out"] / "_summary.json").read_text())
    assert summary["skipped_records"] == {"bad_record": 1, "empty_answer": 1, "image_tags": 1, "missing_image": 1,
                                          "bad_image": 1, "no_conversations": 1, "too_long": 1}
    assert summary["checkpoints"] == [f"checkpoint_{STEPS - SAVE_EVERY:06d}", f"checkpoint_{STEPS:06d}"]
    kept = sorted(p.name for p in scenario["out"].glob("checkpoint_*") if checkpoint_step(p.name) is not None)
    assert kept == summary["checkpoints"]


def test_each_step_records_loss_lr_and_throughput_and_the_loss_falls(scenario):
    history = [json.loads(line) for line in (scenario["out"] / f"checkpoint_{STEPS:06d}" / "metrics.jsonl").open()]
    assert all(m["samples_per_s"] > 0 and m["tokens_per_s"] > m["samples_per_s"] and m["lr"] > 0 for m in history)
    assert history[0]["lr"] < history[1]["lr"]  # warm-up
    assert history[-1]["loss"] < history[0]["loss"] / 20
    assert "step 40/40  loss" in scenario["second"].output()  # the progress line


def test_the_run_and_its_checkpoints_describe_themselves(scenario):
    out = scenario["out"]
    for description in (json.loads((out / "run.json").read_text()),
                        json.loads((out / f"checkpoint_{STEPS:06d}" / "run.json").read_text())):
        assert description["base_model"]["model"] is None and len(description["base_model"]["fingerprint"]) == 64
        assert description["base_model"]["template"] == "Hermes-2"
        assert description["tiling"]["tile_size"] == 112 and description["tiling"]["max_tiles"] == 2
        assert description["trainable"]["lora_r"] == 16 and description["trainable"]["lora_alpha"] == 32
        assert description["config"]["lr"] == 5e-3
        assert description["data"]["files"] == [str(scenario["paths"]["train"])]
        assert description["raylens_version"]


def test_rerunning_a_finished_run_does_nothing_and_another_run_is_refused(scenario):
    config = FinetuneConfig.from_args(scenario["args"])
    again = main(setup(config))
    assert again["step"] == STEPS and again["wall_s"] == 0.0
    with pytest.raises(UsageError, match="--lr differs"):
        setup(FinetuneConfig.from_args([*scenario["args"], "--lr", "1e-4"]))


def _accuracy(output_dir) -> float:
    table = pq.read_table(output_dir).to_pandas()
    assert table["error"].isna().all(), table["error"].dropna().tolist()[:3]
    return float((table["text"] == table["answer"]).mean())


def test_the_merged_model_answers_what_the_demo_model_could_not(scenario, tmp_path, ray_local):
    from jobs.caption import main as caption_main
    from jobs.caption import setup as caption_setup
    from jobs.caption_config import CaptionJobConfig
    from jobs.merge import merge

    merge(str(scenario["out"]), str(tmp_path / "merged"))

    def caption(model, out):
        config = CaptionJobConfig(input=str(scenario["paths"]["held_out"]), output=str(tmp_path / out),
                                  question_column="question", model=model, engine="transformers",
                                  max_new_tokens=12, batch_size=20)
        caption_main(caption_setup(config))
        return _accuracy(tmp_path / out)

    before = caption(None, "before")
    after = caption(str(tmp_path / "merged"), "after")
    assert before <= 0.1, f"the demo model already answers {before:.0%} of the shape questions"
    assert after >= 0.9, f"after fine-tuning only {after:.0%} of held-out shape questions are answered exactly"
