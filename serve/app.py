"""The Serve application: `serve run serve/config.yaml` (settings in its `args`), or `serve run serve.app:app`
(every default: the shipped demo model on CPU, no key).

    layout: split (default)  ChatIngress (FastAPI; auth, validation, image intake, SSE) --handle--> VLModel (one
                             engine per replica)
    layout: single           ChatIngress with a VLModel in its own replica (serve.model_client)

`build_app(args)` is the application builder the YAML names; `args` are `ServeConfig` fields, and
`RAYLENS_API_KEY` from the environment sets the key. Each deployment gets its admission limits and
autoscaling from the config (`ServeConfig.model_deployment_options`), never Serve's defaults.
"""
from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve import Application

from serve.config import ServeConfig
from serve.ingress import ChatIngress
from serve.model import VLModel


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The bound application for `args` (ServeConfig fields) plus environment overrides."""
    config = ServeConfig.from_args(args, env=os.environ).with_engine_resolved(_cluster_gpus())
    return bind(config)


def bind(config: ServeConfig) -> Application:
    """The application for a resolved config (tests and the benchmark build configs directly)."""
    if config.layout == "single":
        endpoint = serve.deployment(serve.ingress()(ChatIngress), name="VLEndpoint")
        return endpoint.options(**config.single_deployment_options()).bind(config)
    model = serve.deployment(VLModel, name="VLModel").options(**config.model_deployment_options())
    ingress = serve.deployment(serve.ingress()(ChatIngress), name="ChatIngress").options(**config.ingress_deployment_options())
    return ingress.bind(config, model.bind(config))


def _cluster_gpus() -> float:
    """GPUs of the cluster the app is deployed to (for engine `auto`), or of this machine outside Ray."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    try:
        import torch

        return float(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch CUDA: no GPUs
        return 0.0


app = build_app({})
