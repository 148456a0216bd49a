"""The RayService for the endpoint: its serveConfigV2 is exactly what `python -m deploy.kuberay.generate`
makes of serve/config.yaml, Ray Serve's own schema accepts it, and the cluster gives its replicas GPUs."""
from __future__ import annotations

import ray
import yaml

from deploy.kuberay.generate import MANIFEST, main
from kuberay_checks import check_cluster_spec, check_header, containers, gpu_groups, load


def _serve_config() -> dict:
    return yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])


def test_committed_manifest_equals_the_generated_one(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().err + "\n(run: python -m deploy.kuberay.generate)"
    assert "up to date" in capsys.readouterr().out


def test_serve_config_passes_ray_serves_schema_and_listens_beyond_the_pod():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(_serve_config()) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(_serve_config())
    assert config.http_options.host == "0.0.0.0"  # the Kubernetes Service reaches the proxy at the pod's address
    (app,) = [a for a in config.applications if a.name == "raylens"]
    assert app.import_path == "serve.app:build_app"
    assert app.args["model"] == "OpenGVLab/InternVL2-2B" and app.args["engine"] == "lmdeploy"
    assert app.args["num_gpus"] == 1


def test_serve_args_are_a_valid_serve_config():
    from serve.config import ServeConfig

    (app,) = [a for a in _serve_config()["applications"] if a["name"] == "raylens"]
    config = ServeConfig.from_args(app["args"], env={})  # unknown keys refused by name
    assert config.num_gpus == 1


def test_rayservice_cluster_has_gpu_workers_for_every_replica_and_the_api_key():
    service = load("rayservice.yaml")
    check_header(service, "RayService")
    spec = service["spec"]["rayClusterConfig"]
    every = check_cluster_spec(spec, ray_version=ray.__version__)
    (group,) = gpu_groups(spec)
    (app,) = [a for a in _serve_config()["applications"] if a["name"] == "raylens"]
    (worker,) = containers(group["template"])
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert app["args"]["max_replicas"] * app["args"]["num_gpus"] <= group["maxReplicas"] * gpus_per_pod
    assert group["minReplicas"] >= 1  # an endpoint keeps one replica up
    for container in every:  # the endpoint listens beyond the pod: every replica checks the key
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAYLENS_API_KEY"]["valueFrom"]["secretKeyRef"]["name"], container["name"]
    assert MANIFEST.name == "rayservice.yaml"
