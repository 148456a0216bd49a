"""The fine-tuning CLI: the issue's flags, the official LoRA recipe as defaults, clear refusals, a --help that
shows how to run it locally and on a cluster."""
from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.finetune import UsageError, setup
from readme_blocks import readme_commands
from jobs.finetune_config import FinetuneConfig

ISSUE_FLAGS = ["--data", "--image-root", "--output", "--model", "--workers", "--gpus-per-worker", "--max-steps",
               "--epochs", "--batch-size", "--grad-accum", "--lr", "--lora-r", "--lora-alpha", "--lora-dropout",
               "--lora-targets", "--train-projector", "--vision-lora", "--max-tiles", "--max-length", "--save-every",
               "--keep", "--strategy", "--seed"]


def test_every_flag_of_the_issue_parses():
    config = FinetuneConfig.from_args([
        "--data", "d.jsonl", "--image-root", "s3://b/img", "--output", "out", "--model", "OpenGVLab/InternVL2-2B",
        "--workers", "4", "--gpus-per-worker", "1", "--max-steps", "100", "--batch-size", "2", "--grad-accum", "8",
        "--lr", "3e-5", "--lora-r", "8", "--lora-alpha", "32", "--lora-dropout", "0.1", "--lora-targets", "wqkv", "wo",
        "--train-projector", "--vision-lora", "4", "--max-tiles", "6", "--max-length", "8192", "--save-every", "50",
        "--keep", "3", "--strategy", "fsdp", "--seed", "7"])
    assert (config.workers, config.grad_accum, config.lora_targets, config.strategy) == (4, 8, ["wqkv", "wo"], "fsdp")
    spec = config.trainable()
    assert (spec.lora_r, spec.lora_alpha, spec.vision_lora_r, spec.vision_lora_alpha, spec.train_projector) == (8, 32, 4, 8, True)
    assert FinetuneConfig.from_args(["--data", "d", "--output", "o", "--epochs", "2"]).epochs == 2


def test_defaults_are_internvls_lora_recipe():
    config = FinetuneConfig(data="d", output="o")
    spec = config.trainable()
    assert (spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.lora_targets) == (16, 32, 0.05, ())
    assert not spec.train_projector and not spec.vision_lora_r and not spec.full
    assert (config.lr, config.warmup_ratio, config.weight_decay, config.epochs, config.strategy) == (4e-5, 0.03, 0.01, 1.0, "ddp")


def test_full_fine_tuning_is_a_mode():
    assert FinetuneConfig(data="d", output="o", full=True).trainable().full
    assert FinetuneConfig(data="d", output="o", lora_r=0).trainable().full
    assert not FinetuneConfig(data="d", output="o", lora_r=0, train_projector=True).trainable().full


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "5", "--epochs", "1"], "exclude each other"),
    (["--strategy", "zero3"], "invalid choice"),
    (["--full", "--vision-lora", "8"], "--full trains every weight"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        FinetuneConfig.from_args(["--data", "d", "--output", "o", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_shows_the_local_and_cluster_commands():
    out = subprocess.run([sys.executable, "-m", "jobs.finetune", "--help"], capture_output=True, text=True, check=True).stdout
    assert "ray job submit --working-dir . -- python -m jobs.finetune" in out
    assert "python -m jobs.merge" in out
    for flag in ISSUE_FLAGS:
        assert flag in out


def test_setup_refuses_unusable_data_model_and_output(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"conversations": []}\n')
    with pytest.raises(UsageError, match="no record to train on .*no_conversations"):
        setup(FinetuneConfig(data=str(tmp_path / "empty.jsonl"), output=str(tmp_path / "o")))
    with pytest.raises(UsageError, match="--data"):
        setup(FinetuneConfig(data=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "o")))
    (tmp_path / "ok.jsonl").write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n')
    with pytest.raises(UsageError, match="--model"):
        setup(FinetuneConfig(data=str(tmp_path / "ok.jsonl"), output=str(tmp_path / "o"), model=str(tmp_path)))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a raylens run"):
        setup(FinetuneConfig(data=str(tmp_path / "ok.jsonl"), output=str(tmp_path / "taken")))
    with pytest.raises(UsageError, match="--output: unsupported URI scheme"):
        setup(FinetuneConfig(data=str(tmp_path / "ok.jsonl"), output="ftp://host/run"))


def test_the_readmes_fine_tuning_commands_are_valid():
    from jobs.merge import build_parser as merge_parser

    commands = readme_commands("finetune-local") + readme_commands("finetune-cluster")
    seen = set()
    for words in commands:
        module = words[words.index("-m") + 1]
        args = words[words.index("-m") + 2:]
        seen.add(module)
        if module == "jobs.finetune":
            FinetuneConfig.from_args(args)
        elif module == "jobs.merge":
            merge_parser().parse_args(args)
    assert {"raylens.training.demo_data", "jobs.finetune", "jobs.merge", "jobs.caption"} <= seen
