"""The gateway side of speculation: set each request's ``spec_k``, record each response's acceptance.

:class:`SpecLength` sits between the routes and the proxy. Before forwarding, under policy
``goodput`` it chooses ``k`` for the batch the request joins (the least-loaded replica's) and writes
it into the body as ``vllm_xargs.spec_k`` (a client's own ``spec_k`` is forwarded as sent). When
that replica's engine exports its cost model (per-step ``goodput`` policy), ``k`` is what the
engine's controller would plan (:mod:`~specserve.gateway.engine_model`); otherwise the
:class:`~specserve.gateway.goodput.GoodputController`'s own fit decides. After the response, it
counts the per-request acceptance in
Prometheus (``specserve_spec_*``) and feeds it back to the controller, under both policies.

Routing ``goodput`` (:func:`goodput_route`) also chooses the replica: the one whose exported cost
model says one more row adds the most goodput (an idle replica, or one that will draft for it),
instead of the least loaded; it needs every candidate to export its model, else it falls back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from specserve.gateway.engine_model import engine_budget, marginal_goodput
from specserve.gateway.goodput import GoodputController, GoodputSettings, SpecPolicy, decode_steps
from specserve.gateway.metrics import GatewayMetrics
from specserve.gateway.proxy import Outcome
from specserve.gateway.replicas import Replica, ReplicaPool
from specserve.gateway.request_body import ForwardBody
from specserve.gateway.spec_io import client_spec_k

log = logging.getLogger(__name__)

SPEC_K_HEADER = "x-specserve-spec-k"
SPEC_K_MEAN_HEADER = "x-specserve-spec-k-mean"
"""Drafts per decode step this request got, over all its steps (unary responses)."""
SPEC_K_MAX_HEADER = "x-specserve-spec-k-max"
"""Most drafts in one of this request's steps (unary responses)."""

Routing = Literal["least-loaded", "goodput"]
ROUTINGS: tuple[Routing, ...] = ("least-loaded", "goodput")


@dataclass(frozen=True)
class SpecPlan:
    """The speculation length of one request, and the batch it was chosen for."""

    k: int | None
    """``spec_k`` the engine gets (``None``: the engine's default)."""
    source: str
    """``goodput`` (set by the gateway), ``client`` (sent by the client) or ``engine`` (neither)."""
    batch: float
    replica: str | None = None
    """The replica goodput routing chose (``None``: the proxy picks the least loaded)."""


def least_loaded(pool: ReplicaPool, model: str) -> Replica | None:
    """The healthy replica serving ``model`` with the least load (the first of equals): its load
    is the batch a new request joins.

    Example:
        >>> from unittest.mock import MagicMock
        >>> from specserve.gateway.replicas import Replica
        >>> pool = MagicMock(replicas={"a": Replica("a", healthy=True, in_flight=3, models=("m",)),
        ...                            "b": Replica("b", healthy=True, engine_running=9.0)})
        >>> least_loaded(pool, "m").load
        3.0
    """
    best: Replica | None = None
    for replica in serving(pool, model):
        if best is None or replica.load < best.load:
            best = replica
    return best


def serving(pool: ReplicaPool, model: str) -> list[Replica]:
    """The healthy replicas that serve ``model`` (or have not said which models they serve)."""
    return [r for r in pool.replicas.values() if r.healthy and (not r.models or model in r.models)]


def goodput_route(pool: ReplicaPool, model: str, k_max: int, temperature: float | None = None) -> Replica | None:
    """The healthy replica serving ``model`` where one more request adds the most goodput
    (:func:`~specserve.gateway.engine_model.marginal_goodput` at its load, drafts priced at the
    request's ``temperature``; the less loaded of equals), or ``None`` when some candidate
    exports no cost model (goodputs would not compare).

    Example: two replicas with the same model, the idle one wins; without a model, no choice.
        >>> from unittest.mock import MagicMock
        >>> from specserve.gateway.engine_model import EngineModel
        >>> from specserve.gateway.replicas import Replica
        >>> m = EngineModel(cost={"base": 8.0, "per_token": 0.5, "spec": 1.0, "draft": 0.5,
        ...                       "draft_token": 0.05}, draft_correction=1.0,
        ...                 acceptance=(0.8, 0.7, 0.6, 0.5))
        >>> busy = Replica("a", healthy=True, in_flight=3, engine_model=m)
        >>> idle = Replica("b", healthy=True, engine_model=m)
        >>> goodput_route(MagicMock(replicas={"a": busy, "b": idle}), "m", 4).url
        'b'
        >>> goodput_route(MagicMock(replicas={"a": busy, "c": Replica("c", healthy=True)}), "m", 4) is None
        True
    """
    candidates = serving(pool, model)
    if not candidates or any(r.engine_model is None for r in candidates):
        return None
    return max(candidates, key=lambda r: (marginal_goodput(r.engine_model, r.load, k_max, temperature), -r.load))


DEFAULT_TEMPERATURE = 1.0
"""The temperature of a request that sends none (OpenAI's and vLLM's default)."""


def request_temperature(body: dict[str, Any]) -> float:
    """The request's sampling temperature, for pricing its drafts at its class's acceptance.

    >>> request_temperature({"temperature": 0}), request_temperature({}), request_temperature({"temperature": "x"})
    (0.0, 1.0, 1.0)
    """
    t = body.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0:
        return float(t)
    return DEFAULT_TEMPERATURE


class SpecLength:
    """Per-request speculation length and acceptance accounting for one gateway."""

    def __init__(self, policy: SpecPolicy, settings: GoodputSettings, pool: ReplicaPool,
                 metrics: GatewayMetrics, routing: Routing = "least-loaded") -> None:
        self.policy = policy
        self.routing = routing
        self.controller = GoodputController(settings)
        self.pool = pool
        self.metrics = metrics

    def prepare(self, model: str, body: dict[str, Any], forward: ForwardBody) -> SpecPlan:
        """The plan, with its ``spec_k`` set in ``forward``; ``body`` holds the request's top-level
        fields."""
        m = self.metrics
        present, value = client_spec_k(body)
        n = body.get("n")
        routed = None
        if self.routing == "goodput":
            k_route = value if present and value is not None else self.controller.k_max(model)
            routed = goodput_route(self.pool, model, k_route, request_temperature(body))
        replica = routed or least_loaded(self.pool, model)
        to = routed.url if routed is not None else None
        batch = (replica.load if replica is not None else 0.0) + (n if isinstance(n, int) and n > 0 else 1)
        if present:
            if value is not None:
                m.child(m.spec_k, model, "client").observe(value)
            return SpecPlan(value, "client", batch, to)
        if self.policy != "goodput":
            return SpecPlan(None, "engine", batch, to)
        engine_model = replica.engine_model if replica is not None else None
        if engine_model is not None:  # the engine's own cost model: one model at both levels
            k = engine_budget(engine_model, batch, self.controller.k_max(model), request_temperature(body))
        else:
            k = self.controller.choose(model, batch).k
        m.child(m.spec_decisions, model, "engine" if engine_model is not None else "gateway").inc()
        if not forward.set_spec_k(k):
            return SpecPlan(None, "engine", batch, to)
        m.child(m.spec_k, model, "goodput").observe(k)
        m.child(m.spec_batch, model).set(batch)
        return SpecPlan(k, "goodput", batch, to)

    def record(self, model: str, outcome: Outcome, plan: SpecPlan, *, elapsed_s: float | None,
               unary: bool) -> tuple[float, int] | None:
        """Count a finished response's acceptance and learn from it; returns the ``(mean, max)``
        drafts per step the request got (:meth:`SpecStats.k_used`), when known.

        ``elapsed_s`` is the decode time of a stream (first to last chunk) or the whole time of a
        unary response (its prefill then counts as one more step).
        """
        stats = outcome.spec
        if stats is None:
            return None
        m = self.metrics
        replica = outcome.replica_label
        if stats.drafted:
            m.child(m.spec_draft_tokens, model, replica).inc(stats.drafted)
        if stats.accepted:
            m.child(m.spec_accepted_tokens, model, replica).inc(stats.accepted)
        if stats.steps:
            m.child(m.spec_acceptance_length, model).observe(stats.mean_acceptance_length)
        used = stats.k_used(outcome.completion_tokens)
        if used is not None:
            m.child(m.spec_k_used, model).observe(used[0])
        steps = decode_steps(outcome.completion_tokens, stats)
        if unary and steps:
            steps += 1
        self.controller.observe(model, stats, batch=plan.batch, decode_s=elapsed_s, decode_steps=steps)
        a, b = self.controller.step_params(model)
        m.child(m.spec_alpha, model).set(self.controller.alpha(model))
        m.child(m.spec_step_base, model).set(a)
        m.child(m.spec_step_token, model).set(b)
        return used


__all__ = ["ROUTINGS", "SPEC_K_HEADER", "SPEC_K_MAX_HEADER", "SPEC_K_MEAN_HEADER", "Routing", "SpecLength",
           "SpecPlan", "goodput_route", "least_loaded"]
