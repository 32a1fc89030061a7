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

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

M = TypeVar("M", Counter, Gauge, Histogram)

# Seconds; covers sub-millisecond proxying up to long generations.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Tokens per verification step (1 = nothing accepted) and speculation lengths.
ACCEPTANCE_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
SPEC_K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)


def _maker(kind: Callable[..., M], registry: CollectorRegistry, subsystem: str) -> Callable[..., M]:
    """``kind(name, documentation, labels, **options)`` named ``specserve_<subsystem>_<name>``."""

    def make(name: str, documentation: str, labels: Sequence[str] = (), **options: Any) -> M:
        return kind(name, documentation, list(labels), namespace="specserve", subsystem=subsystem,
                    registry=registry, **options)

    return make


class GatewayMetrics:
    """All gateway metric objects; one instance per app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        counter, gauge = _maker(Counter, registry, "gateway"), _maker(Gauge, registry, "gateway")
        histogram = _maker(Histogram, registry, "gateway")
        self.requests = counter("requests", "Requests answered, by route, HTTP status and model.",
                                ["route", "status", "model"])
        self.latency = histogram("request_duration_seconds", "End-to-end request latency at the gateway.",
                                 ["route", "status"], buckets=LATENCY_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from request arrival to the first streamed chunk.",
                              ["route"], buckets=LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Decode time per output token after the first (when usage is known).",
                              ["route"], buckets=TOKEN_BUCKETS)
        self.tokens = counter("tokens", "Tokens reported by the engines' usage, by direction (prompt/completion).",
                              ["direction"])
        self.in_flight = gauge("replica_in_flight_requests", "Requests the gateway has open at each replica.",
                               ["replica"])
        self.replica_up = gauge("replica_up_ratio", "1 when the replica is healthy, 0 when marked down.",
                                ["replica"])
        self.rejected = counter("rejected_requests", "Requests refused before reaching an engine, by reason.",
                                ["reason"])
        self.retries = counter("retries", "Requests re-sent to another replica after a connection failure.")
        self.prompt_count_failures = counter(
            "prompt_token_count_failures",
            "Requests --max-prompt-tokens could not count (engine error or timeout); they went on uncounted.")
        self.queue_depth = gauge("queue_depth_requests", "Requests waiting for an in-flight slot.")
        self.tool_requests = counter(
            "tool_requests", "Chat requests that offered tools, by tool_choice (none, auto, required, named).",
            ["tool_choice"])
        self.tool_calls = counter("tool_calls", "Tool calls in the answers to tool requests, by tool_choice.",
                                  ["tool_choice"])
        self.tool_call_failures = counter(
            "tool_call_failures",
            "Answers to tool requests without a usable call, by tool_choice and reason (no_call: a forced "
            "call is missing; unknown_tool; arguments: not a JSON object; schema: invalid for the "
            "function's parameters).", ["tool_choice", "reason"])

        # Speculative decoding (``specserve_spec_*``): per-request acceptance and the k policy.
        counter, gauge = _maker(Counter, registry, "spec"), _maker(Gauge, registry, "spec")
        histogram = _maker(Histogram, registry, "spec")
        self.spec_draft_tokens = counter(
            "draft_tokens", "Draft tokens proposed for requests, from the engines' per-request metrics.",
            ["model", "replica"])
        self.spec_accepted_tokens = counter(
            "accepted_tokens", "Draft tokens the target model accepted, from the per-request metrics.",
            ["model", "replica"])
        self.spec_acceptance_length = histogram(
            "acceptance_length", "Per-request mean tokens per verification step (bonus token included).",
            ["model"], buckets=ACCEPTANCE_BUCKETS)
        self.spec_k = histogram(
            "k", "Speculation length (vllm_xargs.spec_k) of each request, by who set it "
            "(goodput: the gateway's controller; client: the request itself).",
            ["model", "source"], buckets=SPEC_K_BUCKETS)
        self.spec_k_used = histogram(
            "k_used", "Drafts per decode step each request got (its mean over all its steps), from the "
            "engines' per-request metrics: what the engine's per-step controller spent of the budget.",
            ["model"], buckets=SPEC_K_BUCKETS)
        self.spec_decisions = counter(
            "decisions", "spec_k choices of the goodput policy, by the cost model used (engine: the "
            "model the replica's engine exports; gateway: the gateway's own fit).", ["model", "cost_model"])
        self.spec_alpha = gauge("alpha_ratio", "The controller's per-token draft acceptance estimate.", ["model"])
        self.spec_batch = gauge("batch_requests", "Batch size the controller assumed for its latest choice.",
                                ["model"])
        self.spec_step_base = gauge("step_base_seconds", "The controller's fixed cost of one decoding step (a).",
                                    ["model"])
        self.spec_step_token = gauge("step_token_seconds",
                                     "The controller's cost per verified token of the batch (b).", ["model"])

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
