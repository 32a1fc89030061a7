"""The engine's own cost model, read from its ``/metrics``: the gateway prices a request with it.

An engine under the per-step ``goodput`` policy exports its live model
(``specserve_vllm.spec_control.export.model_families``): the step-cost coefficients (calibrated,
then fitted online to its measured steps), the drafting corrections, and its engine-wide
acceptance per draft position. With it, the gateway's budget for a new request is
what the engine's controller would plan for a batch of the replica's running requests plus this
one: one cost model at both levels. Engines that export none (another policy, a plain vLLM) are
priced by the gateway's own fit (:mod:`specserve.gateway.goodput`).

Example:
    >>> page = '''specserve_engine_step_cost_ms{term="base"} 8.0
    ... specserve_engine_step_cost_ms{term="per_token"} 0.1
    ... specserve_engine_step_cost_ms{term="spec"} 1.0
    ... specserve_engine_acceptance_estimate_ratio{position="1"} 0.8
    ... specserve_engine_acceptance_estimate_ratio{position="2"} 0.7
    ... '''
    >>> model = parse_engine_model(text_string_to_metric_families(page))
    >>> model.acceptance, engine_budget(model, batch=1, k_max=4)
    ((0.8, 0.7), 2)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from specserve_vllm.spec_control.acceptance import SAMPLING_CLASSES, AcceptanceModel, sampling_class
from specserve_vllm.spec_control.goodput import GoodputPolicy
from specserve_vllm.spec_control.plan import StepRows
from specserve_vllm.spec_control.step_time import DRAFT_TERMS, StepCost, StepTimeModel

_PREFIX = "specserve_engine_"
_COST_TERMS = tuple(f.name for f in fields(StepCost))


@dataclass(frozen=True)
class EngineModel:
    """One replica's exported cost model (see the module docstring)."""

    cost: dict[str, float]
    draft_correction: float | tuple[float, ...]
    """The drafting terms' corrections (``DRAFT_TERMS`` order: fixed, per draft, per position);
    one number: all."""
    acceptance: tuple[float, ...]
    """Conditional acceptance of draft positions 1..k."""
    acceptance_by_class: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """The same per sampling class the engine has seen (``SAMPLING_CLASSES`` names)."""
    _curves: dict[tuple[int, int, str], np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    """Goodput curves already priced (:func:`_goodput_curve`), by ``(rows, k, class)``: the model
    changes only at the next scrape."""

    def rates(self, temperature: float | None = None) -> tuple[str, tuple[float, ...]]:
        """``(class, acceptance)`` for a request at ``temperature``: its sampling class's rates
        where the engine has measured them, else the engine-wide ones (class ``""``).

        >>> m = EngineModel({}, 1.0, (0.6,), {"greedy": (0.8,), "le_1": (0.3,)})
        >>> m.rates(0.0), m.rates(0.7), m.rates(1.5), m.rates(None)
        (('greedy', (0.8,)), ('le_1', (0.3,)), ('', (0.6,)), ('', (0.6,)))
        """
        if temperature is None:
            return "", self.acceptance
        name = SAMPLING_CLASSES[sampling_class(temperature)]
        rates = self.acceptance_by_class.get(name)
        return (name, rates) if rates else ("", self.acceptance)

    def step_model(self) -> StepTimeModel:
        return StepTimeModel.from_state({"cost": {t: self.cost.get(t, 0.0) for t in _COST_TERMS},
                                         "draft_correction": self.draft_correction})


def parse_engine_model(families: Iterable[Any]) -> EngineModel | None:
    """The model in parsed ``/metrics`` families, ``None`` when the page has none."""
    cost: dict[str, float] = {}
    rates: dict[int, float] = {}
    by_class: dict[str, dict[int, float]] = {}
    draft: dict[str, float] = {}
    for family in families:
        if not family.name.startswith(_PREFIX):
            continue
        name = family.name[len(_PREFIX):]
        for s in family.samples:
            try:
                if name == "step_cost_ms":
                    cost[s.labels["term"]] = float(s.value)
                elif name == "draft_correction_ratio":
                    draft[s.labels.get("term", "")] = float(s.value)
                elif name == "acceptance_estimate_ratio":
                    rates[int(s.labels["position"])] = float(s.value)
                elif name == "acceptance_by_sampling_ratio":
                    by_class.setdefault(s.labels["sampling"], {})[int(s.labels["position"])] = float(s.value)
            except (KeyError, ValueError):
                continue
    if "base" not in cost or not rates:
        return None
    return EngineModel(cost={t: cost.get(t, 0.0) for t in _COST_TERMS},
                       draft_correction=_draft_correction(draft),
                       acceptance=tuple(rates[j] for j in sorted(rates)),
                       acceptance_by_class={c: tuple(r[j] for j in sorted(r)) for c, r in by_class.items()})


def _draft_correction(draft: dict[str, float]) -> float | tuple[float, ...]:
    """The drafting corrections by term name, in ``DRAFT_TERMS`` order as far as the page has them
    (an engine from before a term leaves it as calibrated); an unlabelled one: every term.

    >>> _draft_correction({"draft": 1.2, "draft_token": 0.9}), _draft_correction({"": 1.5}), _draft_correction({})
    ((1.2, 0.9), 1.5, 1.0)
    """
    named = tuple(draft[t] for t in DRAFT_TERMS if t in draft)
    return named if named else draft.get("", 1.0)


def engine_budget(model: EngineModel, batch: float, k_max: int, temperature: float | None = None) -> int:
    """The ``spec_k`` the engine's goodput policy would give a request joining ``batch`` rows.

    The batch is taken as ``round(batch)`` identical decode rows at the engine's acceptance for
    the request's sampling class (``temperature``; engine-wide where unknown),
    priced by the engine's own step-time model and choice of slots (no hysteresis: the gateway
    decides once); the request gets its share of the chosen draft slots, rounded up, within
    ``k_max``. Context lengths are not known here and count as 0 (the context term is the same
    with and without drafts).

    Example (a step of 8 ms, 0.5 ms a token, 1 ms more with drafts, 0.5 + 0.05 ms a draft):
        >>> m = EngineModel(cost={"base": 8.0, "per_token": 0.5, "spec": 1.0, "draft": 0.5,
        ...                       "draft_token": 0.05}, draft_correction=1.0,
        ...                 acceptance=(0.8, 0.7, 0.6, 0.5))
        >>> [engine_budget(m, b, k_max=4) for b in (1, 4, 16, 64)]
        [4, 3, 1, 0]
        >>> engine_budget(m, 64, k_max=0)
        0
    """
    k = min(int(k_max), len(model.acceptance))
    rows = max(1, int(round(batch)))
    if k <= 0:
        return 0
    return min(k, math.ceil(int(np.argmax(_goodput_curve(model, rows, k, temperature))) / rows))


def _goodput_curve(model: EngineModel, rows: int, k: int, temperature: float | None = None) -> np.ndarray:
    """The engine policy's goodput (tokens per ms) for ``rows`` identical decode rows taking the
    best 0, 1, ... draft slots (``k >= 1``) at ``temperature``'s acceptance, cached on ``model``."""
    name, rates = model.rates(temperature)
    curve = model._curves.get((rows, k, name))
    if curve is None:
        policy = GoodputPolicy(model.step_model(), AcceptanceModel(list(rates[:k])))
        curve, _, _ = policy.goodput(StepRows(tuple(str(i) for i in range(rows)), np.full(rows, k),
                                              np.zeros(rows)))
        model._curves[(rows, k, name)] = curve
    return curve


def batch_goodput(model: EngineModel, rows: int, k_max: int, temperature: float | None = None) -> float:
    """Tokens per ms a replica's step commits for ``rows`` identical decode rows, with the draft
    slots its goodput policy would choose (none when ``k_max`` is 0; 0.0 for an empty batch),
    at the acceptance of ``temperature``'s sampling class (engine-wide where unknown)."""
    if rows <= 0:
        return 0.0
    k = max(0, min(int(k_max), len(model.acceptance)))
    if k == 0:  # a step without drafts: each row commits one token
        return rows / float(model.step_model().cycle_ms(rows, rows, 0, np.zeros(1))[0])
    return float(np.max(_goodput_curve(model, rows, k, temperature)))


def marginal_goodput(model: EngineModel, batch: float, k_max: int, temperature: float | None = None) -> float:
    """What one more decode row adds to a replica's goodput (tokens per ms) when it runs ``batch``
    rows: the request's own tokens, less what the longer step costs the rows already there
    (drafts priced at ``temperature``'s class, as :func:`engine_budget` prices them).
    Goodput-aware routing sends a request where this is largest.

    Example (the model of :func:`engine_budget`'s example): an idle replica gains most, and a
    replica that can draft gains more than a plain one at the same load.
        >>> m = EngineModel(cost={"base": 8.0, "per_token": 0.5, "spec": 1.0, "draft": 0.5,
        ...                       "draft_token": 0.05}, draft_correction=1.0,
        ...                 acceptance=(0.8, 0.7, 0.6, 0.5))
        >>> [round(marginal_goodput(m, b, 4), 3) for b in (0, 1, 8)]
        [0.235, 0.156, 0.042]
        >>> marginal_goodput(m, 1, 4) > marginal_goodput(m, 1, 0)
        True
    """
    rows = max(0, int(round(batch)))
    return batch_goodput(model, rows + 1, k_max, temperature) - batch_goodput(model, rows, k_max, temperature)


def parse_page(text: str) -> EngineModel | None:
    """:func:`parse_engine_model` of a ``/metrics`` page."""
    return parse_engine_model(text_string_to_metric_families(text))


__all__ = ["EngineModel", "batch_goodput", "engine_budget", "marginal_goodput", "parse_engine_model", "parse_page"]
