import pytest

from jobs.caption_config import CaptionJobConfig


def test_cli_flags_map_to_typed_fields():
    cfg = CaptionJobConfig.from_args(["--input", "in", "--output", "out", "--max-tiles", "6", "--temperature", "0.5", "--overwrite"])
    assert (cfg.input, cfg.output, cfg.max_tiles, cfg.temperature, cfg.overwrite) == ("in", "out", 6, 0.5, True)
    assert cfg.engine == "auto" and cfg.model is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tiles", "0"], "--max-tiles"),
        (["--temperature", "3"], "--temperature"),
        (["--batch-size", "0"], "--batch-size"),
        (["--prompt", " "], "--prompt"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        CaptionJobConfig.from_args(["--input", "i", "--output", "o", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_input_and_output_are_required(capsys):
    with pytest.raises(SystemExit) as exc:
        CaptionJobConfig.from_args([])
    assert exc.value.code == 2
    assert "--input" in capsys.readouterr().err


def test_engine_choices_are_enforced():
    with pytest.raises(SystemExit):
        CaptionJobConfig.from_args(["--input", "i", "--output", "o", "--engine", "vllm"])
