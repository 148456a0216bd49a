"""Shared fixtures: a tiny checkpoint per format, one local Ray instance, image writers."""
from __future__ import annotations
pytest_plugins = ["s3_fixture"]  # the `local_s3` fixture (tests/s3_fixture.py)

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; say so instead of failing where there is none."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine, see docs/benchmarks.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny original-format (hub layout) InternVL2 checkpoint with a Qwen2 LLM, random weights."""
    from raylens.checkpoints.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-internvl2", format="internvl_chat", seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test that runs a pipeline in-process."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    _add_tests_to_worker_path()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")  # never join another Ray on the machine
    yield ray
    ray.shutdown()


TESTS_DIR = Path(__file__).resolve().parent


def _add_tests_to_worker_path() -> None:
    """Ray workers inherit the environment: let them import tests/fakes.py (`--engine fakes:...`)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(TESTS_DIR) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *parts])


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for running the job's CLI in a child process that can import tests/fakes.py."""
    _add_tests_to_worker_path()
    return {**os.environ, **extra}


def image_bytes(size=(64, 48), color=(200, 30, 30), fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A small valid PNG whose header declares a huge image (a decompression bomb)."""
    data = bytearray(image_bytes((8, 8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)
