"""The README's "Run on a cluster" commands against a real Ray cluster started with `ray start --head`.

One cluster for the module (token authentication on, private ports, temp dir and HOME: see
local_cluster.py), nodes configured for object storage the way an operator configures real ones (the
S3 endpoint and credentials in the nodes' environment), and the user's commands run by bash, as pasted
from the README, with only the bucket and the dashboard address put in.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from local_cluster import REPO, LocalCluster, start_local_cluster
from raylens.checkpoints.resolve import COMPLETE_MARKER, DEMO_MODEL_DIR
from raylens.demo.shapes import format_caption

pytestmark = pytest.mark.slow

README_BUCKET = "my-bucket"
README_DASHBOARD = "http://127.0.0.1:8265"
EXAMPLES = sorted((REPO / "examples" / "images").iterdir())


def readme_block(marker: str) -> str:
    """The bash block that follows `<!-- marker -->` in the README."""
    text = (REPO / "README.md").read_text()
    after = text.split(f"<!-- {marker} -->", 1)
    assert len(after) == 2, f"README has no <!-- {marker} --> block"
    return after[1].split("```bash", 1)[1].split("```", 1)[0].strip()


def for_this_cluster(block: str, cluster: LocalCluster, bucket: str) -> str:
    return block.replace(README_DASHBOARD, cluster.dashboard_url).replace(f"s3://{README_BUCKET}/", f"s3://{bucket}/")


@pytest.fixture(scope="module")
def cluster(local_s3):
    # 4 logical CPUs on this 2-core machine: two engine actors (1 CPU each) plus the decoding tasks.
    env = {
        "AWS_ENDPOINT_URL_S3": local_s3.endpoint,
        "AWS_ACCESS_KEY_ID": local_s3.settings.access_key,
        "AWS_SECRET_ACCESS_KEY": local_s3.settings.secret_key,
        "AWS_REGION": local_s3.settings.region,
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    started = start_local_cluster(num_cpus=4, env=env)
    try:
        yield started
    finally:
        started.stop()


def _submit(cluster: LocalCluster, script: str, timeout: float = 420):
    proc = cluster.run_shell("set -euo pipefail\n" + script, timeout=timeout)
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}\n{cluster.log_tail()}"
    assert "succeeded" in proc.stdout
    return proc


def _caption_rows(fs, root: str) -> list[dict]:
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith("part-")]
    return [row for path in sorted(files) for row in pq.read_table(path, filesystem=fs).to_pylist()]


def _expected_caption(path: Path) -> str:
    color, shape, _, background = path.stem.split("_")  # the examples are named after their caption
    return format_caption(color, shape, background)


def test_readme_caption_job_runs_on_the_cluster_and_a_resubmission_resumes(cluster, local_s3):
    bucket = local_s3.new_bucket("cluster-caption")
    for image in EXAMPLES:
        local_s3.put(bucket, f"images/{image.name}", image.read_bytes())
    for file in DEMO_MODEL_DIR.iterdir():  # the demo model stands in for the README's InternVL2-2B
        local_s3.put(bucket, f"models/internvl2-2b/{file.name}", file.read_bytes())
    # The README's lines; `--shard-size 3` only so that 8 images make 3 shards for the resume check.
    script = for_this_cluster(readme_block("cluster-caption"), cluster, bucket)
    script = re.sub(r"(python -m jobs\.caption .*)$", r"\1 --shard-size 3", script, flags=re.MULTILINE)
    assert script.count("--shard-size 3") == 1 and "ray job submit" in script and "--working-dir ." in script

    first = _submit(cluster, script)
    fs = local_s3.filesystem()
    out = f"{bucket}/captions"
    rows = _caption_rows(fs, out)
    assert sorted(r["id"] for r in rows) == [p.name for p in EXAMPLES]  # each image once
    for row in rows:
        assert row["error"] is None, row
        assert row["text"] == _expected_caption(Path(row["id"])), row
    parts = {i.base_name: i.mtime for i in fs.get_file_info(pafs.FileSelector(out)) if i.base_name.startswith("part-")}
    assert sorted(parts) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert "3 of 3 shards to do" in first.stdout

    # The driver (to read the model's tiling) and the engine actors on this node each resolved the
    # s3:// model: it was copied once, into the node's cache, with no half-written copy left beside it.
    cache = cluster.home / ".cache" / "raylens" / "models"
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and (cache / entries[0] / COMPLETE_MARKER).is_file(), entries
    placed = [a for a in _actors(cluster, "GenerateStage") if a.get("node_id")]
    assert placed and len({a["node_id"] for a in placed}) == 1, placed

    # A lost shard (as after a crash before it was written): the same command does only that shard.
    fs.delete_file(f"{out}/part-000001.parquet")
    time.sleep(1.1)  # object mtimes have 1 s resolution: a rewritten shard must show a newer one
    second = _submit(cluster, script)
    assert "1 of 3 shards to do (3 images)" in second.stdout, second.stdout[-3000:]
    again = _caption_rows(fs, out)
    assert sorted(r["id"] for r in again) == [p.name for p in EXAMPLES]  # nothing missing, nothing twice
    assert all(r["error"] is None and r["text"] == _expected_caption(Path(r["id"])) for r in again)
    now = {i.base_name: i.mtime for i in fs.get_file_info(pafs.FileSelector(out)) if i.base_name.startswith("part-")}
    assert now["part-000000.parquet"] == parts["part-000000.parquet"]  # finished shards untouched
    assert now["part-000002.parquet"] == parts["part-000002.parquet"]
    assert now["part-000001.parquet"] > parts["part-000001.parquet"]


def test_cluster_refuses_a_cli_without_the_token_mode(cluster):
    """What the README warns about: without RAY_AUTH_MODE=token the CLI does not send the token."""
    env = cluster.user_env()
    proc = cluster.run_shell(f"ray job list --address {shlex.quote(cluster.dashboard_url)}", timeout=120, env=env)
    assert proc.returncode != 0
    assert "401" in proc.stdout + proc.stderr or "auth" in (proc.stdout + proc.stderr).lower()
    ok = cluster.run_shell(f"RAY_AUTH_MODE=token ray job list --address {shlex.quote(cluster.dashboard_url)}",
                           timeout=120, env=env)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]


def _actors(cluster: LocalCluster, name: str) -> list[dict]:
    """Actors (alive or finished) whose class name mentions `name`, from the cluster's state API."""
    import json

    proc = cluster.run_shell(f"RAY_AUTH_MODE=token ray list actors --address {cluster.dashboard_url} --format json "
                             "--limit 10000 --detail", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [a for a in json.loads(proc.stdout) if name in (a.get("class_name") or "")]


def test_readme_serve_deploy_then_one_chat_request_with_the_openai_client(cluster, tmp_path):
    """`serve deploy serve/config.yaml` on the cluster, then the official openai client asks for a caption.
    The one change to the README's lines: a copy of serve/config.yaml that listens on a free port, since
    other programs on this machine may hold port 8000."""
    import base64

    import yaml
    from openai import OpenAI

    from local_cluster import free_ports
    from raylens.prompts import DEFAULT_CAPTION_PROMPT

    (port,) = free_ports(1)
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert config["http_options"]["port"] == 8000 and config["http_options"]["host"] == "127.0.0.1"
    config["http_options"]["port"] = port
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = readme_block("cluster-serve").replace(README_DASHBOARD, cluster.dashboard_url)
    assert "serve deploy serve/config.yaml" in script
    proc = cluster.run_shell("set -euo pipefail\n" + script.replace("serve/config.yaml", str(config_path)), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    try:
        _wait_for_health(f"http://127.0.0.1:{port}/health", cluster, timeout=300)
        image = EXAMPLES[0]
        data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", timeout=120, max_retries=0)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, temperature=0, max_tokens=64, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": DEFAULT_CAPTION_PROMPT}]}])
        assert answer.choices[0].message.content == _expected_caption(image)  # what the batch job writes
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens > 0
    finally:
        down = cluster.run_shell(f"RAY_AUTH_MODE=token serve shutdown -y --address {cluster.dashboard_url}", timeout=180)
        assert down.returncode == 0, down.stderr[-2000:]


def _wait_for_health(url: str, cluster: LocalCluster, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(2)
    status = cluster.run_shell(f"RAY_AUTH_MODE=token serve status --address {cluster.dashboard_url}", timeout=60)
    raise AssertionError(f"{url} not healthy after {timeout:.0f} s\n{status.stdout}\n{cluster.log_tail()}")


@pytest.mark.skipif(importlib.util.find_spec("jobs.finetune_config") is None,
                    reason="fine-tuning (jobs/finetune.py) is not on main yet")
def test_readme_finetune_job_trains_with_two_workers_on_the_cluster(cluster, local_s3, tmp_path):
    """The README's fine-tuning submission: 2 Ray Train workers on the cluster, data, base model and
    checkpoints in S3. Appended to the README's line only to keep it short: `--max-steps 2`."""
    import json

    from raylens.training.demo_data import write_shape_questions

    bucket = local_s3.new_bucket("cluster-finetune")
    data = write_shape_questions(tmp_path / "data", train=8, held_out=1, seed=0)["train"]
    local_s3.put(bucket, "train/train.jsonl", data.read_bytes())
    for image in sorted((data.parent / "images" / "train").iterdir()):
        local_s3.put(bucket, f"train/images/train/{image.name}", image.read_bytes())
    for file in DEMO_MODEL_DIR.iterdir():
        local_s3.put(bucket, f"models/internvl2-2b/{file.name}", file.read_bytes())
    script = for_this_cluster(readme_block("cluster-finetune"), cluster, bucket)
    script = re.sub(r"(python -m jobs\.finetune .*)$", r"\1 --max-steps 2", script, flags=re.MULTILINE)
    assert script.count("--max-steps 2") == 1 and "--workers 2" in script and "--working-dir ." in script

    _submit(cluster, script, timeout=600)
    fs = local_s3.filesystem()
    run = f"{bucket}/runs/shapes-lora"
    with fs.open_input_stream(f"{run}/_summary.json") as f:
        summary = json.loads(f.read())
    assert summary["completed"] and summary["step"] == 2 and summary["error"] is None, summary
    assert summary["latest_checkpoint"] in summary["checkpoints"]
    files = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{run}/{summary['latest_checkpoint']}"))}
    assert files, "the checkpoint in S3 is empty"
    workers = [a for a in _actors(cluster, "TrainWorker") if a.get("node_id")]
    assert len(workers) >= 2, [a["class_name"] for a in workers]
