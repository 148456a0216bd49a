"""FSDP on 2 CPU workers (gloo) with the run directory on S3 (a moto server on loopback): parameters and
optimizer state sharded, checkpoints gathered into one and written through RunConfig's storage filesystem,
a rerun with more steps resumed from S3 (each rank loads its shard of the optimizer state), the result
merged from S3."""
from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from jobs.finetune import main, setup
from jobs.finetune_config import FinetuneConfig
from jobs.merge import merge
from raylens.checkpoints.loading import load_hf_model

pytestmark = pytest.mark.slow  # Ray Train runs: tens of seconds on 2 cores


def _data(folder, bucket, local_s3) -> str:
    from PIL import Image
    import io

    rows = []
    for i, rgb in enumerate([(200, 30, 30), (30, 160, 40), (30, 40, 200), (10, 10, 10)]):
        buffer = io.BytesIO()
        Image.new("RGB", (56, 56), rgb).save(buffer, format="PNG")
        local_s3.put(bucket, f"images/{i}.png", buffer.getvalue())
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": f"colour {i}"}]})
    return local_s3.put(bucket, "data/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def test_fsdp_run_on_s3_resumes_and_merges(tmp_path, tiny_checkpoint, local_s3, ray_local, monkeypatch):
    for name, value in (("AWS_ENDPOINT_URL", local_s3.endpoint), ("AWS_ACCESS_KEY_ID", local_s3.settings.access_key),
                        ("AWS_SECRET_ACCESS_KEY", local_s3.settings.secret_key), ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = local_s3.new_bucket("fsdp")
    data = _data(tmp_path, bucket, local_s3)
    args = dict(data=data, image_root=f"s3://{bucket}/images", output=f"s3://{bucket}/runs/fsdp",
                model=str(tiny_checkpoint), workers=2, strategy="fsdp", batch_size=2, save_every=1, keep=2,
                loader_workers=0, lr=1e-3, train_projector=True)
    first = main(setup(FinetuneConfig(**args, max_steps=2)))
    assert first["completed"] and first["error"] is None and first["checkpoints"] == ["checkpoint_000001",
                                                                                     "checkpoint_000002"]
    second = main(setup(FinetuneConfig(**args, max_steps=3)))  # a longer rerun: resumes from step 2 on S3
    assert second["completed"] and second["step"] == 3 and second["checkpoints"] == ["checkpoint_000002",
                                                                                      "checkpoint_000003"]
    fs = local_s3.filesystem()
    with fs.open_input_stream(f"{bucket}/runs/fsdp/checkpoint_000003/state.json") as f:
        state = json.loads(f.read())
    assert state["starts"] == [0, 2] and state["positions"] == 3 * 2 * 2
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/runs/fsdp/checkpoint_000003"))}
    assert {"trainable.safetensors", "optimizer.pt", "run.json", "metrics.jsonl"} <= names
    merged = tmp_path / "merged"
    merge(f"s3://{bucket}/runs/fsdp", str(merged), s3=local_s3.settings)
    model, _, spec = load_hf_model(merged)
    base, _, _ = load_hf_model(tiny_checkpoint)
    assert spec.format == "internvl_chat"
    changed = [n for n, p in model.named_parameters() if not (p == dict(base.named_parameters())[n]).all()]
    assert any("multi_modal_projector" in n for n in changed) and any("q_proj" in n for n in changed)
