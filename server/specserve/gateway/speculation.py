"""The gateway side of speculation: set each request's ``spec_k``, record each response's acceptance.

:class:`SpecLength` sits between the routes and the proxy. Before forwarding, under policy
``goodput`` it chooses ``k`` for the batch the request joins (the least-loaded replica's) and writes
it into the body as ``vllm_xargs.spec_k`` (a client's own ``spec_k`` is forwarded as sent). When
that replica's engine exports its cost model (per-step ``goodput`` policy), ``k`` is what the
engine's controller would plan (:mod:`~specserve.gateway.engine_model`); otherwise the
:class:`~specserve.gateway.goodput.GoodputController`'s own fit decides. After the response, it
counts the per-request acceptance in
Prometheus (``specserve_spec_*``) and feeds it back to the controller, under both policies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from specserve.gateway.engine_model import engine_budget
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


@dataclass(frozen=True)
class SpecPlan:
    """The speculation length of one request, and the batch it was chosen for."""

    k: int | None
    """``spec_k`` the engine gets (``None``: the engine's default)."""
    source: str
    """``goodput`` (set by the gateway), ``client`` (sent by the client) or ``engine`` (neither)."""
    batch: float


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
    for replica in pool.replicas.values():
        if replica.healthy and (not replica.models or model in replica.models):
            if best is None or replica.load < best.load:
                best = replica
    return best


class SpecLength:
    """Per-request speculation length and acceptance accounting for one gateway."""

    def __init__(self, policy: SpecPolicy, settings: GoodputSettings, pool: ReplicaPool,
                 metrics: GatewayMetrics) -> None:
        self.policy = policy
        self.controller = GoodputController(settings)
        self.pool = pool
        self.metrics = metrics

    def prepare(self, model: str, body: dict[str, Any], forward: ForwardBody) -> SpecPlan:
        """The plan, with its ``spec_k`` set in ``forward``; ``body`` holds the request's top-level
        fields."""
        m = self.metrics
        present, value = client_spec_k(body)
        n = body.get("n")
        replica = least_loaded(self.pool, model)
        batch = (replica.load if replica is not None else 0.0) + (n if isinstance(n, int) and n > 0 else 1)
        if present:
            if value is not None:
                m.child(m.spec_k, model, "client").observe(value)
            return SpecPlan(value, "client", batch)
        if self.policy != "goodput":
            return SpecPlan(None, "engine", batch)
        engine_model = replica.engine_model if replica is not None else None
        if engine_model is not None:  # the engine's own cost model: one model at both levels
            k = engine_budget(engine_model, batch, self.controller.k_max(model))
        else:
            k = self.controller.choose(model, batch).k
        m.child(m.spec_decisions, model, "engine" if engine_model is not None else "gateway").inc()
        if not forward.set_spec_k(k):
            return SpecPlan(None, "engine", batch)
        m.child(m.spec_k, model, "goodput").observe(k)
        m.child(m.spec_batch, model).set(batch)
        return SpecPlan(k, "goodput", batch)

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


__all__ = ["SPEC_K_HEADER", "SPEC_K_MAX_HEADER", "SPEC_K_MEAN_HEADER", "SpecLength", "SpecPlan", "least_loaded"]
