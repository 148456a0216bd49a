"""The endpoint's own metrics, exported through Ray's metrics pipeline (`ray.serve.metrics`).

Why Ray's and not a `/metrics` route: an application has several ingress replicas on several nodes, and a
route would show whichever replica answered. Ray exports every replica's metrics from each node's
metrics port (the one Prometheus scrapes for Ray and Serve; Serve adds the deployment, replica and
application tags), beside Serve's own: `ray_serve_num_http_requests_total`, `ray_serve_http_request_latency_ms`,
`ray_serve_deployment_queued_queries` (the queue in front of the model), `ray_serve_replica_processing_queries`.
What Serve cannot know, we add (Ray prefixes each name with `ray_`):
* `raylens_requests_total{route, status}`: answers by HTTP status (4xx included);
* `raylens_request_latency_s{route}` and `raylens_time_to_first_token_s`: histograms;
* `raylens_tokens_total{kind}`: prompt and completion tokens;
* `raylens_inflight_requests`: requests the ingress replica holds now (queued for the model or running).
"""
from __future__ import annotations

from ray.serve import metrics

_LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class EndpointMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter("raylens_requests_total", description="HTTP answers by route and status",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram("raylens_request_latency_s", description="time to the whole answer",
                                         boundaries=_LATENCY_BOUNDARIES, tag_keys=("route",))
        self.ttft = metrics.Histogram("raylens_time_to_first_token_s", description="time to the first answer text",
                                      boundaries=_LATENCY_BOUNDARIES)
        self.tokens = metrics.Counter("raylens_tokens_total", description="prompt and completion tokens",
                                      tag_keys=("kind",))
        self.inflight = metrics.Gauge("raylens_inflight_requests", description="requests held by this ingress replica")
        self._inflight = 0

    def started(self) -> None:
        self._inflight += 1
        self.inflight.set(self._inflight)

    def finished(self, route: str, status: int, seconds: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self._inflight -= 1
        self.inflight.set(self._inflight)
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})
        if prompt_tokens:
            self.tokens.inc(prompt_tokens, tags={"kind": "prompt"})
        if completion_tokens:
            self.tokens.inc(completion_tokens, tags={"kind": "completion"})

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def counted(self, route: str, status: int) -> None:
        """A request answered without reaching the model's path (health, models, 404)."""
        self.requests.inc(tags={"route": route, "status": str(status)})
