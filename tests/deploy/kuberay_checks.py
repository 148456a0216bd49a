"""What KubeRay's `ray.io/v1` CRDs require of a Ray cluster spec, checked without a Kubernetes cluster.

The fields follow KubeRay's API types (ray-operator/apis/ray/v1: RayClusterSpec, HeadGroupSpec,
WorkerGroupSpec): `headGroupSpec.template` and `rayStartParams`, each worker group's `groupName`,
`minReplicas`, `maxReplicas`, `rayStartParams` and pod `template`; plus what raylens relies on: the Ray
version of the image, token authentication, GPUs requested as `nvidia.com/gpu` limits.
"""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def containers(pod_template: dict) -> list[dict]:
    found = pod_template["spec"]["containers"]
    assert found and all(c.get("name") and c.get("image") for c in found), found
    return found


def check_header(manifest: dict, kind: str) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    assert manifest["metadata"]["name"]


def check_cluster_spec(spec: dict, *, ray_version: str) -> list[dict]:
    """Checks a RayClusterSpec; returns every container of every group (for image checks)."""
    assert spec["rayVersion"] == ray_version
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    every = containers(head["template"])
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker groups"
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group
        every += containers(group["template"])
    for container in every:
        resources = container.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        if "nvidia.com/gpu" in requests:
            assert limits.get("nvidia.com/gpu") == requests["nvidia.com/gpu"], container["name"]  # Kubernetes requires equal
    return every


def gpu_groups(spec: dict) -> list[dict]:
    """Worker groups whose pods ask for GPUs (as `nvidia.com/gpu` limits, which KubeRay turns into Ray GPUs)."""
    return [g for g in spec["workerGroupSpecs"]
            if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0 for c in containers(g["template"]))]
