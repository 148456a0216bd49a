"""ServeConfig and serve/config.yaml: validated fields, secrets from the environment, explicit sizing."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.config import API_KEY_ENV, ServeConfig

REPO = Path(__file__).resolve().parents[2]


def yaml_args() -> dict:
    data = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    return data, data["applications"][0]["args"]


def test_config_yaml_is_a_valid_serve_config_for_the_demo_on_cpu():
    from ray.serve.schema import ServeDeploySchema

    data, args = yaml_args()
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    config = ServeConfig.from_args(args, env={})
    assert config.model is None and config.engine == "transformers" and config.api_key is None
    # the sizing is explicit, not Serve's or Serve LLM's defaults
    for name in ("max_ongoing_requests", "max_queued_requests", "target_ongoing_requests", "min_replicas",
                 "max_replicas", "upscale_delay_s", "downscale_delay_s"):
        assert name in args, name


def test_build_app_applies_sizing_and_backpressure():
    from serve.app import build_app

    _, args = yaml_args()
    app = build_app(args)
    ingress = app._bound_deployment
    options = ServeConfig.from_args(args, env={}).with_engine_resolved(0).model_deployment_options()
    assert options["max_ongoing_requests"] == args["max_ongoing_requests"]
    assert options["max_queued_requests"] == args["max_queued_requests"]
    assert options["backpressure_config"].status_code == 503
    assert options["backpressure_config"].retry_after_s == args["retry_after_s"]
    auto = options["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (
        args["min_replicas"], args["max_replicas"], args["target_ongoing_requests"])
    assert ingress.name == "ChatIngress"
    assert ingress.max_ongoing_requests == args["ingress_max_ongoing_requests"]


def test_single_layout_is_one_deployment_sized_for_the_model_and_the_http_routes():
    from serve.app import bind

    config = ServeConfig(layout="single", engine="transformers", num_cpus=2, ingress_num_cpus=0.5,
                         min_replicas=1, max_replicas=3, ingress_max_ongoing_requests=100).with_engine_resolved(0)
    app = bind(config)
    deployment = app._bound_deployment
    assert deployment.name == "VLEndpoint"
    assert deployment.max_ongoing_requests == 100  # HTTP requests; model work is admitted by InProcessModel
    assert deployment.ray_actor_options["num_cpus"] == 2.5
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 3)
    with pytest.raises(ValueError, match="layout"):
        ServeConfig(layout="two")


def test_module_level_app_exists():
    from ray.serve import Application

    from serve.app import app

    assert isinstance(app, Application)


def test_api_key_from_the_environment_and_never_printed():
    config = ServeConfig.from_args({}, env={API_KEY_ENV: "s3cret"})
    assert config.api_key == "s3cret"
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.public_dict())
    assert ServeConfig.from_args({"api_key": "a"}, env={}).api_key == "a"


def test_engine_defaults_fill_unset_sizes():
    cpu = ServeConfig().with_engine_resolved(0)
    assert cpu.engine == "transformers" and cpu.num_gpus == 0 and cpu.max_ongoing_requests == 8
    gpu = ServeConfig(engine="lmdeploy").with_engine_resolved(1)
    assert gpu.num_gpus == 1 and gpu.max_ongoing_requests == 128 and gpu.max_queued_requests == 256
    assert ServeConfig(engine="lmdeploy", max_ongoing_requests=3).with_engine_resolved(1).max_ongoing_requests == 3


@pytest.mark.parametrize("args,match", [
    ({"modle": "x"}, "unknown serve config field"),
    ({"engine": "vllm"}, "engine must be"),
    ({"max_images": 0}, "max_images"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"default_max_tokens": 10, "max_tokens_limit": 5}, "default_max_tokens"),
    ({"allowed_domains": "a.com"}, "lists of strings"),
    ({"api_key": "  "}, "api_key"),
    ({"max_tiles": 0}, "max_tiles"),
])
def test_bad_fields_are_refused_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig.from_args(args, env={})
