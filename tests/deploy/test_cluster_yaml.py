"""cluster.yaml passes the checks `ray up` makes before it calls AWS, and says what the README says.

Offline: Ray's own `prepare_config` + `validate_config` (defaults merged, JSON schema, node types,
Docker settings), and each node type's `node_config` against botocore's shape of EC2 RunInstances
(the call the launcher makes with it), so a misspelt EC2 field fails here rather than at launch.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_passes_rays_own_cluster_config_validation(config):
    prepared = _prepared(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_validation_is_real_a_misspelt_field_fails(config):
    """The check above would catch a mistake: the same validation rejects a misspelt node-type field."""
    import jsonschema

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_inference"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        _prepared(broken)


def test_node_configs_are_valid_ec2_run_instances_arguments(config):
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    for name, node_type in config["available_node_types"].items():
        params = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    misspelt = {"InstanceTyp": "g6.2xlarge", "MinCount": 1, "MaxCount": 1}
    assert ParamValidator().validate(misspelt, shape).has_errors()  # the check can fail


def test_node_types_head_cpu_autoscaling_inference_and_training_gpus(config):
    types = config["available_node_types"]
    assert set(types) == {"head", "gpu_inference", "gpu_training"}
    assert types["head"]["node_config"]["InstanceType"].startswith(("m6i.", "m7i.", "m5."))  # no GPU on the head
    inference, training = types["gpu_inference"], types["gpu_training"]
    assert inference["node_config"]["InstanceType"].startswith(("g6.", "g5."))  # L4 / A10G
    assert training["node_config"]["InstanceType"].startswith(("p4d.", "p4de.", "p5."))  # A100 / H100
    for node_type in (inference, training):
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1  # scale from zero
    assert config["max_workers"] >= inference["max_workers"] + training["max_workers"]


def test_image_is_ray_of_the_pinned_version_python_312_cuda_128(config):
    import ray

    pinned = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert pinned and pinned.group(1) == ray.__version__
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py312-cu128"


def test_nodes_install_raylens_with_the_gpu_extra_and_overrides(config):
    commands = " ".join(config["setup_commands"])
    assert re.search(r'-e "\$HOME/raylens\[gpu\]"', commands)
    assert "--override \"$HOME/raylens/deploy/gpu-overrides.txt\"" in commands
    assert "--torch-backend cu128" in commands
    assert config["file_mounts"]["~/raylens"] == "."  # the repository the commands install
    assert (REPO / "deploy" / "gpu-overrides.txt").is_file()


def test_gpu_overrides_pin_exact_versions():
    from packaging.requirements import Requirement

    lines = [line.strip() for line in (REPO / "deploy" / "gpu-overrides.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert {r.name for r in requirements} >= {"torch", "torchvision", "peft"}
    for requirement in requirements:
        (spec,) = requirement.specifier
        assert spec.operator == "==", requirement


def test_every_node_starts_ray_with_token_authentication(config):
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token ray start" in command, command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node


def test_repository_sync_leaves_out_what_git_ignores(config):
    assert ".gitignore" in config["rsync_filter"]
    assert any(".git" in pattern for pattern in config["rsync_exclude"])
