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


@pytest.mark.parametrize("value, expected", [("1", (1, 1)), ("4", (4, 4)), ("2:8", (2, 8))])
def test_replicas_fixed_or_autoscaling(value, expected):
    assert CaptionJobConfig(input="i", output="o", replicas=value).replica_range() == expected


@pytest.mark.parametrize("value", ["0", "3:2", "a", "1:"])
def test_bad_replicas_are_refused(value):
    with pytest.raises(ValueError, match="--replicas"):
        CaptionJobConfig(input="i", output="o", replicas=value)


@pytest.mark.parametrize("gpus, tp", [(0.25, 1), (1.0, 1), (2.0, 2), (4, 4)])
def test_whole_gpus_above_one_mean_tensor_parallelism(gpus, tp):
    assert CaptionJobConfig(input="i", output="o", gpus_per_replica=gpus).tensor_parallel() == tp


def test_fractional_gpus_above_one_are_refused():
    with pytest.raises(ValueError, match="whole number"):
        CaptionJobConfig(input="i", output="o", gpus_per_replica=1.5)


def test_engine_args_must_be_a_json_object():
    assert CaptionJobConfig(input="i", output="o", engine_args='{"tp": 2}').engine_options() == {"tp": 2}
    for bad in ("[1]", "{nope"):
        with pytest.raises(ValueError, match="--engine-args"):
            CaptionJobConfig(input="i", output="o", engine_args=bad)


def test_repeated_prompt_flags_ask_several_prompts():
    cfg = CaptionJobConfig.from_args(["--input", "i", "--output", "o", "--prompt", "a?", "--prompt", "b?"])
    assert cfg.prompt == ["a?", "b?"]


def test_engine_options_follow_the_layout():
    from jobs.caption import engine_options_for

    def options(engine, has_gpus, **flags):
        return engine_options_for(CaptionJobConfig(input="i", output="o", **flags), engine, has_gpus)

    # a quarter of a GPU: a quarter of lmdeploy's usual 0.8 KV share, so four engines fit on one GPU
    assert options("lmdeploy", True, gpus_per_replica=0.25) == {"cache_max_entry_count": 0.2}
    # unless the user chose a share
    assert options("lmdeploy", True, gpus_per_replica=0.25,
                   engine_args='{"cache_max_entry_count": 0.3}') == {"cache_max_entry_count": 0.3}
    assert options("lmdeploy", True, gpus_per_replica=2) == {"tp": 2}
    assert options("lmdeploy", True) == {}
    # on a CPU-only cluster the GPU layout means nothing
    assert options("transformers", False, gpus_per_replica=0.5, batch_size=8) == {"max_batch_size": 8}


def test_an_lmdeploy_batch_cap_below_the_requests_in_flight_is_warned_about(caplog):
    from jobs.caption import engine_options_for

    def options(**flags):
        caplog.clear()
        return engine_options_for(CaptionJobConfig(input="i", output="o", **flags), "lmdeploy", True)

    with caplog.at_level("WARNING", logger="raylens.caption"):
        # 16 batches of 32 in flight, lmdeploy capped at 256: half of them would wait outside its scheduler
        assert options(batch_size=32, batches_in_flight=16, engine_args='{"max_batch_size": 256}') == {"max_batch_size": 256}
        assert "max_batch_size 256 is below the 512 requests" in caplog.text
        options(batch_size=32, batches_in_flight=8, engine_args='{"max_batch_size": 256}')  # exactly enough
        assert caplog.text == ""
        options(batch_size=32, batches_in_flight=16)  # lmdeploy's own default for the GPU: not ours to judge
        assert caplog.text == ""
