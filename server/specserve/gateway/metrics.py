"""Prometheus metrics of the gateway (``specserve_gateway_*``), registered on a given registry.

Labels are bounded: routes are the few proxied paths, models come from the engines' model list
(unknown names are rejected before they are counted), replicas are the configured engines.

Example:
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> m = GatewayMetrics(CollectorRegistry())
    >>> m.requests.labels(route="/v1/models", status="200", model="").inc()
    >>> b"specserve_gateway_requests_total" in generate_latest(m.registry)
    True
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

M = TypeVar("M", Counter, Gauge, Histogram)

# Seconds; covers sub-millisecond proxying up to long generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Tokens per verification step (1 = nothing accepted) and speculation lengths.
ACCEPTANCE_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
SPEC_K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)


class GatewayMetrics:
    """All gateway metric objects; one instance per app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        ns, sub = "specserve", "gateway"
        self.requests = Counter(
            "requests", "Requests answered, by route, HTTP status and model.",
            ["route", "status", "model"], namespace=ns, subsystem=sub, registry=registry,
        )
        self.latency = Histogram(
            "request_duration_seconds", "End-to-end request latency at the gateway.",
            ["route", "status"], namespace=ns, subsystem=sub, buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time from request arrival to the first streamed chunk.",
            ["route"], namespace=ns, subsystem=sub, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds",
            "Decode time per output token after the first (when usage is known).",
            ["route"], namespace=ns, subsystem=sub, buckets=TOKEN_BUCKETS, registry=registry,
        )
        self.tokens = Counter(
            "tokens", "Tokens reported by the engines' usage, by direction (prompt/completion).",
            ["direction"], namespace=ns, subsystem=sub, registry=registry,
        )
        self.in_flight = Gauge(
            "replica_in_flight_requests", "Requests the gateway has open at each replica.",
            ["replica"], namespace=ns, subsystem=sub, registry=registry,
        )
        self.replica_up = Gauge(
            "replica_up_ratio", "1 when the replica is healthy, 0 when marked down.",
            ["replica"], namespace=ns, subsystem=sub, registry=registry,
        )
        self.rejected = Counter(
            "rejected_requests", "Requests refused before reaching an engine, by reason.",
            ["reason"], namespace=ns, subsystem=sub, registry=registry,
        )
        self.retries = Counter(
            "retries", "Requests re-sent to another replica after a connection failure.",
            namespace=ns, subsystem=sub, registry=registry,
        )
        self.queue_depth = Gauge(
            "queue_depth_requests", "Requests waiting for an in-flight slot.",
            namespace=ns, subsystem=sub, registry=registry,
        )

        # Speculative decoding (``specserve_spec_*``): per-request acceptance and the k policy.
        spec = "spec"
        self.spec_draft_tokens = Counter(
            "draft_tokens", "Draft tokens proposed for requests, from the engines' per-request metrics.",
            ["model", "replica"], namespace=ns, subsystem=spec, registry=registry,
        )
        self.spec_accepted_tokens = Counter(
            "accepted_tokens", "Draft tokens the target model accepted, from the per-request metrics.",
            ["model", "replica"], namespace=ns, subsystem=spec, registry=registry,
        )
        self.spec_acceptance_length = Histogram(
            "acceptance_length", "Per-request mean tokens per verification step (bonus token included).",
            ["model"], namespace=ns, subsystem=spec, buckets=ACCEPTANCE_BUCKETS, registry=registry,
        )
        self.spec_k = Histogram(
            "k", "Speculation length (vllm_xargs.spec_k) of each request, by who set it "
            "(goodput: the gateway's controller; client: the request itself).",
            ["model", "source"], namespace=ns, subsystem=spec, buckets=SPEC_K_BUCKETS, registry=registry,
        )
        self.spec_alpha = Gauge(
            "alpha_ratio", "The controller's per-token draft acceptance estimate.",
            ["model"], namespace=ns, subsystem=spec, registry=registry,
        )
        self.spec_batch = Gauge(
            "batch_requests", "Batch size the controller assumed for its latest choice.",
            ["model"], namespace=ns, subsystem=spec, registry=registry,
        )
        self.spec_step_base = Gauge(
            "step_base_seconds", "The controller's fixed cost of one decoding step (a).",
            ["model"], namespace=ns, subsystem=spec, registry=registry,
        )
        self.spec_step_token = Gauge(
            "step_token_seconds", "The controller's cost per verified token of the batch (b).",
            ["model"], namespace=ns, subsystem=spec, registry=registry,
        )

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, looked up once per label set (for label sets never removed).

        Example:
            >>> from prometheus_client import CollectorRegistry
            >>> m = GatewayMetrics(CollectorRegistry())
            >>> m.child(m.tokens, "prompt") is m.child(m.tokens, "prompt")
            True
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[no-any-return]
