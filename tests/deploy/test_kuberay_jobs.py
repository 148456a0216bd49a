"""The KubeRay RayJobs (caption, fine-tune) and the image they run: the fields KubeRay's CRDs require,
entrypoints that the jobs' own argument parsers accept, one Ray version and one image everywhere."""
from __future__ import annotations

import re
import shlex

import pytest
import ray
import yaml

from kuberay_checks import REPO, check_cluster_spec, check_header, containers, gpu_groups, load

RAYJOBS = ["rayjob-caption.yaml", "rayjob-finetune.yaml"]


def _argv(entrypoint: str, module: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", module], words[:3]
    return words[3:]


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_has_what_kuberay_requires(name):
    job = load(name)
    check_header(job, "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string, as KubeRay passes it to Ray
    assert isinstance(runtime_env, dict) and set(runtime_env) <= {"env_vars", "pip", "working_dir", "py_modules", "config"}
    assert spec["shutdownAfterJobFinishes"] is True  # the GPUs go away with the job
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["backoffLimit"] >= 1  # a retry resumes
    check_cluster_spec(spec["rayClusterSpec"], ray_version=ray.__version__)
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    groups = gpu_groups(spec["rayClusterSpec"])
    assert groups and all(g["minReplicas"] == 0 for g in groups)  # GPU pods only while the job needs them


def test_caption_rayjob_entrypoint_is_a_valid_caption_command():
    from jobs.caption_config import CaptionJobConfig

    config = CaptionJobConfig.from_args(_argv(load("rayjob-caption.yaml")["spec"]["entrypoint"], "jobs.caption"))
    assert config.input.startswith("s3://") and config.output.startswith("s3://")  # reachable from every pod
    assert config.model == "OpenGVLab/InternVL2-2B"
    low, high = config.replica_range()
    group = gpu_groups(load("rayjob-caption.yaml")["spec"]["rayClusterSpec"])[0]
    assert high <= group["maxReplicas"]  # one engine per one-GPU pod


def test_finetune_rayjob_entrypoint_is_a_valid_finetune_command():
    finetune_config = pytest.importorskip("jobs.finetune_config", reason="jobs.finetune is not on main yet")
    job = load("rayjob-finetune.yaml")
    config = finetune_config.FinetuneConfig.from_args(_argv(job["spec"]["entrypoint"], "jobs.finetune"))
    assert config.output.startswith("s3://")
    (group,) = gpu_groups(job["spec"]["rayClusterSpec"])
    (worker,) = containers(group["template"])
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert config.workers * config.gpus_per_worker <= gpus_per_pod * group["maxReplicas"]


def test_one_image_everywhere_built_from_the_cluster_yaml_base():
    images = set()
    for name in RAYJOBS + ["rayservice.yaml"]:
        path = REPO / "deploy" / "kuberay" / name
        if not path.exists():
            continue
        manifest = yaml.safe_load(path.read_text())
        spec = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
        images |= {c["image"] for c in check_cluster_spec(spec, ray_version=ray.__version__)}
    assert images == {"raylens:0.1.0"}
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert base == yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    assert "--override deploy/gpu-overrides.txt" in dockerfile and '".[gpu]"' in dockerfile
