"""`ServeConfig`: the one typed config of the endpoint, read from the Serve YAML's `args`.

Why one dataclass (like `CaptionJobConfig`): `serve run serve/config.yaml`, `serve run serve.app:app`,
the tests and the benchmark all build the same object, validated in one place, with each field's
meaning written beside it. Secrets never need to be in the YAML: `RAYLENS_API_KEY` in the environment of
the process that builds the application (`serve run`, or the application's `runtime_env.env_vars` under
`serve deploy`) sets the key, and the key is never printed (`repr` and `public_dict` hide it).

Sizing (what the issue asks to be explicit): a model replica admits `max_ongoing_requests` at once, each
caller (ingress replica) queues at most `max_queued_requests` more, and past that a request is answered
503 with `Retry-After: retry_after_s` at once. The autoscaler keeps about `target_ongoing_requests` per
replica between `min_replicas` and `max_replicas`. Unset sizes take the engine's defaults
(`ENGINE_SIZING`): a CPU transformers replica runs a few requests per batch, an lmdeploy replica keeps
its continuous batching fed with many.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

API_KEY_ENV = "RAYLENS_API_KEY"
ENGINES = ("auto", "transformers", "lmdeploy")
LAYOUTS = ("split", "single")
DEMO_MODEL_NAME = "raylens-demo"

# Per-engine defaults for the fields left unset: (max_ongoing, max_queued, target_ongoing, max_batch_size).
ENGINE_SIZING = {
    "transformers": dict(max_ongoing_requests=8, max_queued_requests=16, target_ongoing_requests=4, max_batch_size=8),
    "lmdeploy": dict(max_ongoing_requests=128, max_queued_requests=256, target_ongoing_requests=64, max_batch_size=128),
}


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ServeConfig:
    # -- model and engine -------------------------------------------------------------------
    model: str | None = _f(None, "Hugging Face id, local directory or s3:// prefix; default: the shipped demo model")
    model_name: str | None = _f(None, "the model id clients send and /v1/models lists (default: --model, or raylens-demo)")
    engine: str = _f("auto", "auto (lmdeploy where the cluster has GPUs and lmdeploy is installed) | transformers | lmdeploy | package.module:Class")
    engine_args: dict = _f(None, "engine constructor options (lmdeploy: any PytorchEngineConfig field)")
    max_tiles: int | None = _f(None, "tiles per image (+ thumbnail) by default and at most; a request may ask fewer with `max_tiles`")
    # -- generation limits ------------------------------------------------------------------
    default_max_tokens: int = _f(256, "answer length when a request sets neither max_tokens nor max_completion_tokens")
    max_tokens_limit: int = _f(2048, "largest max_tokens a request may ask (400 above)")
    # -- request limits (each refusal is a 4xx with an OpenAI-style error body) -----------------
    max_body_bytes: int = _f(32 * 1024 * 1024, "largest request body (413 above)")
    max_messages: int = _f(128, "most messages in one request")
    max_text_chars: int = _f(200_000, "most characters of text over all messages")
    max_images: int = _f(8, "most images in one request (400 above)")
    max_image_bytes: int = _f(20 * 1024 * 1024, "largest encoded image, data: URL or download (413 above)")
    max_image_pixels: int = _f(40_000_000, "most pixels an image may declare, checked before decoding (413 above)")
    # -- where images may come from ---------------------------------------------------------
    allow_image_urls: bool = _f(True, "fetch http(s) image URLs (public addresses only); false: data: URLs only")
    allowed_domains: list[str] | None = _f(None, "exact hosts http(s) image URLs may come from (default: any public host)")
    fetch_timeout_s: float = _f(10.0, "time budget of one image download, all redirects included")
    max_redirects: int = _f(3, "redirects followed per image URL, each hop checked again")
    allow_private_networks: bool = _f(False, "ALSO fetch from private/loopback addresses: tests and trusted networks only")
    s3_buckets: list[str] = _f(None, "buckets s3:// image URLs may name (default: none, s3:// refused)")
    s3_endpoint: str | None = _f(None, "S3-compatible endpoint for s3:// images (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")
    # -- security and logging ---------------------------------------------------------------
    api_key: str | None = _f(None, f"Bearer key required on every route but /health; ${API_KEY_ENV} sets it from the environment", repr=False)
    cors_origins: list[str] = _f(None, "origins allowed by CORS (default: none, CORS off)")
    log_prompts: bool = _f(False, "log prompts and image URLs (off: only sizes and timings are logged)")
    web_page: bool = _f(True, "serve the web chat page: its index.html at /, its other files under /web/ (false: the API only)")
    web_dir: str | None = _f(None, "directory of the web page's files (default: the shipped serve/web/)")
    # -- model replicas: admission, backpressure, autoscaling ---------------------------------
    min_replicas: int = _f(1, "model replicas kept running")
    max_replicas: int = _f(1, "model replicas the autoscaler may add")
    target_ongoing_requests: float | None = _f(None, "requests per replica the autoscaler aims for (default: the engine's)")
    max_ongoing_requests: int | None = _f(None, "requests one model replica runs at once (default: the engine's)")
    max_queued_requests: int | None = _f(None, "requests each ingress replica queues for the model beyond that; more get 503 (default: the engine's)")
    retry_after_s: float = _f(1.0, "Retry-After sent with a 503")
    upscale_delay_s: float = _f(10.0, "load must stay high this long before a replica is added")
    downscale_delay_s: float = _f(300.0, "load must stay low this long before a replica is removed")
    num_cpus: float = _f(1.0, "CPUs per model replica")
    num_gpus: float | None = _f(None, "GPUs per model replica (default: 1 for lmdeploy, 0 otherwise)")
    max_batch_size: int | None = _f(None, "transformers: concurrent requests (streamed or not) batched into one generate; lmdeploy: its max_batch_size")
    batch_wait_timeout_s: float = _f(0.01, "transformers: how long a batch waits to fill")
    stream_interval_ms: float = _f(20.0, "streamed text of one request is sent at most this often (fewer, larger chunks under load)")
    # -- layout -------------------------------------------------------------------------------
    layout: str = _f("split", "split: ingress replicas (HTTP, validation, images) in front of the model replicas; single: "
                     "one deployment does both in one replica, one Ray hop less each way (lower time to first token; "
                     "image decoding then shares the model replica's CPU)")
    # -- ingress replicas (HTTP, validation, image download and decoding) ----------------------
    ingress_min_replicas: int = _f(1, "ingress replicas kept running")
    ingress_max_replicas: int = _f(2, "ingress replicas the autoscaler may add")
    ingress_max_ongoing_requests: int = _f(512, "requests one ingress replica holds at once (decoded images included)")
    ingress_num_cpus: float = _f(0.5, "CPUs per ingress replica")
    decode_threads: int = _f(4, "threads per ingress replica that download and decode images")

    def __post_init__(self) -> None:
        for name in ("engine_args",):
            if getattr(self, name) is None:
                setattr(self, name, {})
        for name in ("s3_buckets", "cors_origins"):
            if getattr(self, name) is None:
                setattr(self, name, [])
        if isinstance(self.allowed_domains, str) or isinstance(self.s3_buckets, str) or isinstance(self.cors_origins, str):
            raise ValueError("allowed_domains, s3_buckets and cors_origins are lists of strings")
        positive_ints = ("default_max_tokens", "max_tokens_limit", "max_body_bytes", "max_messages", "max_text_chars",
                         "max_images", "max_image_bytes", "max_image_pixels", "min_replicas", "max_replicas",
                         "ingress_min_replicas", "ingress_max_replicas", "ingress_max_ongoing_requests", "decode_threads")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_ongoing_requests", "max_queued_requests", "max_batch_size", "max_tiles"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        checks = [
            (self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {self.layout!r}"),
            (self.engine in ENGINES or ":" in self.engine, f"engine must be one of {ENGINES} or package.module:Class, got {self.engine!r}"),
            (isinstance(self.engine_args, dict), f"engine_args must be a mapping, got {self.engine_args!r}"),
            (self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens must be <= max_tokens_limit"),
            (self.min_replicas <= self.max_replicas, "min_replicas must be <= max_replicas"),
            (self.ingress_min_replicas <= self.ingress_max_replicas, "ingress_min_replicas must be <= ingress_max_replicas"),
            (self.target_ongoing_requests is None or self.target_ongoing_requests > 0, "target_ongoing_requests must be > 0"),
            (self.fetch_timeout_s > 0, "fetch_timeout_s must be > 0"),
            (isinstance(self.max_redirects, int) and self.max_redirects >= 0, "max_redirects must be an integer >= 0"),
            (self.retry_after_s >= 0, "retry_after_s must be >= 0"),
            (self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0, "upscale/downscale delays must be >= 0"),
            (self.num_cpus >= 0 and (self.num_gpus is None or self.num_gpus >= 0) and self.ingress_num_cpus >= 0,
             "num_cpus, num_gpus and ingress_num_cpus must be >= 0"),
            (self.batch_wait_timeout_s >= 0 and self.stream_interval_ms >= 0, "batch_wait_timeout_s and stream_interval_ms must be >= 0"),
            (self.api_key is None or (isinstance(self.api_key, str) and self.api_key.strip() != ""), "api_key must be a non-empty string"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.allowed_domains is not None:
            from raylens.fetch import UrlFetcher

            UrlFetcher(allowed_domains=frozenset(self.allowed_domains))  # validates the host names

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> "ServeConfig":
        """The config of a Serve YAML's `args` (unknown keys refused by name), with environment overrides."""
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown serve config field(s) {unknown}; known: {sorted(known)}")
        key = (env or {}).get(API_KEY_ENV)
        if key:
            args["api_key"] = key
        return cls(**args)

    def with_engine_resolved(self, cluster_gpus: float) -> "ServeConfig":
        """`auto` -> the engine the cluster can run (lmdeploy needs GPUs and the package), and every unset
        size -> that engine's default, so the deployments get concrete numbers."""
        engine = self.engine
        if engine == "auto":
            engine = "lmdeploy" if cluster_gpus > 0 and importlib.util.find_spec("lmdeploy") else "transformers"
        sizing = ENGINE_SIZING.get(engine, ENGINE_SIZING["transformers"])
        resolved = {name: getattr(self, name) if getattr(self, name) is not None else value for name, value in sizing.items()}
        num_gpus = self.num_gpus if self.num_gpus is not None else (1.0 if engine == "lmdeploy" else 0.0)
        return dataclasses.replace(self, engine=engine, num_gpus=num_gpus, **resolved)

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model or DEMO_MODEL_NAME

    def engine_options(self) -> dict:
        """Constructor options of the engine: `engine_args` plus the batch size the replica was sized for
        (and, for the transformers engine, how long its batches wait to fill)."""
        options = dict(self.engine_args)
        if self.max_batch_size is not None and self.engine in ("transformers", "lmdeploy"):
            options.setdefault("max_batch_size", self.max_batch_size)
        if self.engine == "transformers":
            options.setdefault("batch_wait_timeout_s", self.batch_wait_timeout_s)
        return options

    def model_deployment_options(self) -> dict:
        """`serve.deployment(...).options(...)` of the model deployment (after `with_engine_resolved`)."""
        from ray.serve.config import BackpressureConfig

        return dict(
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            backpressure_config=BackpressureConfig(status_code=503, retry_after_s=self.retry_after_s),
            autoscaling_config=dict(
                min_replicas=self.min_replicas,
                initial_replicas=self.min_replicas,
                max_replicas=self.max_replicas,
                target_ongoing_requests=self.target_ongoing_requests,
                upscale_delay_s=self.upscale_delay_s,
                downscale_delay_s=self.downscale_delay_s,
            ),
            ray_actor_options=dict(num_cpus=self.num_cpus, num_gpus=self.num_gpus or 0),
            # An engine takes time to start (lmdeploy: a minute); Serve's health checks must allow for it.
            health_check_period_s=10,
            health_check_timeout_s=60,
            graceful_shutdown_timeout_s=30,
        )

    def single_deployment_options(self) -> dict:
        """The one deployment of `layout: single`: the model's replicas, resources and autoscaling, with room for
        the ingress's own work. Its admission of model work is `serve.model_client.InProcessModel`'s; Serve's
        limits only bound the HTTP requests one replica holds (past them, Serve's own 503)."""
        options = self.model_deployment_options()
        options.update(max_ongoing_requests=self.ingress_max_ongoing_requests,
                       max_queued_requests=self.ingress_max_ongoing_requests)
        options["ray_actor_options"] = dict(num_cpus=self.num_cpus + self.ingress_num_cpus, num_gpus=self.num_gpus or 0)
        return options

    def ingress_deployment_options(self) -> dict:
        return dict(
            max_ongoing_requests=self.ingress_max_ongoing_requests,
            autoscaling_config=dict(
                min_replicas=self.ingress_min_replicas,
                initial_replicas=self.ingress_min_replicas,
                max_replicas=self.ingress_max_replicas,
                target_ongoing_requests=max(1, self.ingress_max_ongoing_requests // 4),
                upscale_delay_s=self.upscale_delay_s,
                downscale_delay_s=self.downscale_delay_s,
            ),
            ray_actor_options=dict(num_cpus=self.ingress_num_cpus),
        )

    def public_dict(self) -> dict:
        """The config as data, the key replaced by whether one is set."""
        data = dataclasses.asdict(self)
        data["api_key"] = "<set>" if self.api_key else None
        return data
