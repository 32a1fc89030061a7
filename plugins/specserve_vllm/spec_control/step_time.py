"""Predicted engine step time: a calibrated linear model, corrected online from measured steps.

A step's time (ms) is its forward and sampling, plus the drafting that prepares the next step:

    step  = base + per_token * tokens + per_row * rows + context * ctx_tokens / 1000
            + [spec] * (spec + spec_row * rows)
    draft = [drafts > 0] * (draft + draft_token * drafts)

``tokens``: tokens the step schedules (decode rows * (1 + k) plus prefill tokens); ``rows``:
requests in the step; ``ctx_tokens``: their context lengths summed; ``spec``: the step verifies
drafts (vLLM's speculative path: spec metadata and the rejection sampler), a fixed cost the whole
batch pays once any row speculates; ``drafts``: tokens drafted for the next step. The
coefficients come from a calibration (``specserve calibrate`` fits them to measured steps; the
demo model's ship with the plugin). Online, one EWMA of measured / predicted per (spec on/off,
batch bucket) corrects them, so load on a shared machine and a calibration from another one
still give close predictions; half of each correction (in log terms) carries over to the other
path of the same bucket, so the path not being taken follows the machine too. Drafting is
corrected term by term (:class:`DraftFit`): a drafter's fixed cost and its cost per draft are off
by different factors (Hydra's heads run once per position whatever the rows), and one factor
fitted on small draft counts mispriced large ones.

    >>> c = StepCost(base=5.0, per_token=0.5, per_row=1.0, context=0.0, spec=2.0, spec_row=0.25,
    ...              draft=0.5, draft_token=0.05)
    >>> c.step_ms(rows=4, tokens=4, ctx_tokens=0, spec=False), c.step_ms(4, 12, 0, True)
    (11.0, 18.0)
    >>> m = StepTimeModel(c, alpha=0.5); m.observe(4, 4, 0, False, measured_ms=22.0)
    >>> m.step_ms(4, 4, 0, False)
    16.5
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from specserve_vllm.spec_control.acceptance import SAMPLING_CLASSES

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Upper bounds of the batch-size buckets of the online correction."""


def bucket(rows: int) -> int:
    """Index of the smallest bucket holding ``rows``.

    >>> bucket(1), bucket(3), bucket(8), bucket(1000)
    (0, 2, 3, 8)
    """
    for i, b in enumerate(BUCKETS):
        if rows <= b:
            return i
    return len(BUCKETS) - 1


@dataclass(frozen=True)
class StepCost:
    """Calibrated coefficients, all in milliseconds (see the module docstring)."""

    base: float
    per_token: float
    per_row: float
    context: float
    """Per 1000 context tokens in the batch."""
    spec: float
    spec_row: float
    draft: float
    draft_token: float

    def step_ms(self, rows: int, tokens: int, ctx_tokens: int, spec: bool) -> float:
        t = self.base + self.per_token * tokens + self.per_row * rows + self.context * ctx_tokens / 1000.0
        return t + (self.spec + self.spec_row * rows if spec else 0.0)

    def draft_ms(self, drafts: int) -> float:
        return self.draft + self.draft_token * drafts if drafts > 0 else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepCost:
        return cls(**{f.name: float(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class Calibration:
    """What ``specserve calibrate`` writes: coefficients, and per-drafter acceptance priors."""

    cost: StepCost
    drafter_cost: dict[str, tuple[float, float]]
    """Drafter class name -> (draft, draft_token) ms, overriding ``cost``'s drafting terms."""
    acceptance: dict[str, list[float]]
    """Drafter class name -> conditional acceptance per draft position (engine-wide prior)."""
    source: str = ""
    acceptance_by_class: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Drafter class name -> sampling class (``SAMPLING_CLASSES``) -> its prior, where measured;
    the other classes start from :attr:`acceptance`."""

    def class_priors(self, drafter: str) -> dict[int, list[float]]:
        """The measured priors of ``drafter`` by sampling class index (unknown names skipped).

        >>> Calibration(StepCost(*[0.0] * 8), {}, {}, acceptance_by_class={"H": {"le_1": [0.3], "x": [1]}}
        ...             ).class_priors("H")
        {2: [0.3]}
        """
        return {SAMPLING_CLASSES.index(name): list(rates)
                for name, rates in self.acceptance_by_class.get(drafter, {}).items() if name in SAMPLING_CLASSES}

    def for_drafter(self, drafter: str) -> tuple[StepCost, list[float] | None]:
        cost = self.cost
        if drafter in self.drafter_cost:
            d, dt = self.drafter_cost[drafter]
            cost = StepCost(**{**asdict(cost), "draft": d, "draft_token": dt})
        return cost, self.acceptance.get(drafter)

    def to_json(self) -> str:
        return json.dumps({"cost": asdict(self.cost), "drafter_cost": self.drafter_cost,
                           "acceptance": self.acceptance, "acceptance_by_class": self.acceptance_by_class,
                           "source": self.source}, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(cost=StepCost.from_dict(data["cost"]),
                   drafter_cost={k: (float(v[0]), float(v[1])) for k, v in data.get("drafter_cost", {}).items()},
                   acceptance={k: [float(x) for x in v] for k, v in data.get("acceptance", {}).items()},
                   source=str(data.get("source", "")),
                   acceptance_by_class={d: {c: [float(x) for x in v] for c, v in by.items()}
                                        for d, by in data.get("acceptance_by_class", {}).items()})


DEFAULT_CALIBRATION = Path(__file__).with_name("calibration_demo.json")
"""Calibration of the demo model on a 2-core CPU (``specserve calibrate``), shipped."""


MAX_STEP_RATIO = 2.0
"""One measured step moves a correction as if it were at most this factor off the current one.
A one-off slow step (a drafter's first call compiling its kernels, a page fault storm) would
otherwise price a path out for good: the controller stops taking it and no measurement comes
back to correct it. A real change of speed still converges, over a few dozen steps."""


def bounded_ratio(measured_ms: float, raw_ms: float, current: float, limit: float = MAX_STEP_RATIO) -> float:
    """``measured / raw`` clipped to ``[current / limit, current * limit]``.

    >>> bounded_ratio(300.0, 6.0, 1.0)   # a 50x outlier counts as 2x
    2.0
    >>> bounded_ratio(9.0, 6.0, 1.0)
    1.5
    """
    return float(min(max(measured_ms / raw_ms, current / limit), current * limit))


@dataclass(slots=True)
class DraftFit:
    """Online fit of drafting time as ``fixed * draft + per_draft * draft_token * n``.

    Exponentially weighted least squares (weight ``alpha`` per measurement) on the relative
    error, so every measurement counts alike whatever its size, with a small ridge toward the
    calibration (factors 1). Measurements at one draft count only identify the prediction at
    that count: the change is shared by the two terms in proportion to their share of it, and
    a second count separates them. Starts from pseudo-measurements of the calibration, so the
    first real ones move it like an EWMA would; each measurement's pull is bounded
    (:data:`MAX_STEP_RATIO`).

    Example: calibrated 1 + 0.1 n ms, measured 2 + 0.05 n (a higher fixed cost, a lower slope):
        >>> f = DraftFit()
        >>> for n in (4, 32) * 60:
        ...     f.observe(1.0, 0.1 * n, 2.0 + 0.05 * n)
        >>> round(f.fixed, 2), round(f.per_draft, 2), round(f.predict(1.0, 0.1 * 16), 2)
        (1.99, 0.51, 2.8)
    """

    alpha: float = 0.1
    ridge: float = 0.001
    fixed: float = 1.0
    per_draft: float = 1.0
    # weighted sums of the design (u0, u1) = terms / calibrated total and target v = measured / total
    s00: float = 0.5
    s01: float = 0.0
    s11: float = 0.5
    t0: float = 0.5
    t1: float = 0.5

    def predict(self, fixed_ms: float, per_draft_ms: float) -> float:
        return self.fixed * fixed_ms + self.per_draft * per_draft_ms

    def observe(self, fixed_ms: float, per_draft_ms: float, measured_ms: float) -> None:
        """One drafting call: the calibrated terms (``draft``, ``draft_token * n``) and its time."""
        raw = fixed_ms + per_draft_ms
        predicted = self.predict(fixed_ms, per_draft_ms)
        if raw <= 0 or measured_ms <= 0 or predicted <= 0:
            return
        measured = min(max(measured_ms, predicted / MAX_STEP_RATIO), predicted * MAX_STEP_RATIO)
        u0, u1, v = fixed_ms / raw, per_draft_ms / raw, measured / raw
        keep, a = 1.0 - self.alpha, self.alpha
        self.s00 = keep * self.s00 + a * u0 * u0
        self.s01 = keep * self.s01 + a * u0 * u1
        self.s11 = keep * self.s11 + a * u1 * u1
        self.t0 = keep * self.t0 + a * u0 * v
        self.t1 = keep * self.t1 + a * u1 * v
        m00, m11, r0, r1 = self.s00 + self.ridge, self.s11 + self.ridge, self.t0 + self.ridge, self.t1 + self.ridge
        det = m00 * m11 - self.s01 * self.s01
        fixed, per_draft = (r0 * m11 - r1 * self.s01) / det, (m00 * r1 - self.s01 * r0) / det
        if per_draft < 0.0:  # more drafts never cost less: refit the fixed term alone
            fixed, per_draft = r0 / m00, 0.0
        if fixed < 0.0:
            fixed, per_draft = 0.0, r1 / m11
        self.fixed, self.per_draft = fixed, per_draft


class StepTimeModel:
    """:class:`StepCost` times an online EWMA correction per (spec on/off, batch bucket), and a
    :class:`DraftFit` of the drafting terms; each measurement's pull is bounded
    (:data:`MAX_STEP_RATIO`)."""

    def __init__(self, cost: StepCost, alpha: float = 0.1) -> None:
        self.cost = cost
        self.alpha = alpha
        self.correction = np.ones((2, len(BUCKETS)))  # [spec, bucket]
        self.draft_fit = DraftFit(alpha=alpha)

    @property
    def draft_correction(self) -> tuple[float, float]:
        """The drafting terms' corrections: ``(fixed, per draft)``."""
        return self.draft_fit.fixed, self.draft_fit.per_draft

    def step_ms(self, rows: int, tokens: int, ctx_tokens: int, spec: bool) -> float:
        return float(self.cost.step_ms(rows, tokens, ctx_tokens, spec) * self.correction[int(spec), bucket(rows)])

    def draft_ms(self, drafts: int) -> float:
        if drafts <= 0:
            return 0.0
        return self.draft_fit.predict(self.cost.draft, self.cost.draft_token * drafts)

    def chain_terms(self, rows: int, tokens: int, ctx_tokens: int) -> tuple[float, float, float]:
        """``(off, on, per_draft)`` ms: a step of ``rows`` rows scheduling ``tokens`` tokens
        (drafts aside) costs ``off`` without drafts and ``on + per_draft * n`` with ``n`` of
        them, drafting included (:meth:`cycle_ms` in three numbers, for the controller).

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1))
        >>> m.chain_terms(1, 1, 0)
        (6.0, 8.5, 1.1)
        """
        b = bucket(rows)
        c = self.cost
        plain = c.base + c.per_token * tokens + c.per_row * rows + c.context * ctx_tokens / 1000.0
        on_factor = float(self.correction[1, b])
        on = (plain + c.spec + c.spec_row * rows) * on_factor + self.draft_fit.fixed * c.draft
        per_draft = c.per_token * on_factor + self.draft_fit.per_draft * c.draft_token
        return plain * float(self.correction[0, b]), on, per_draft

    def cycle_ms(self, rows: int, tokens: int, ctx_tokens: int, drafts: np.ndarray) -> np.ndarray:
        """Step plus drafting time for each total draft count in ``drafts`` (vectorised).

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1))
        >>> m.cycle_ms(1, 1, 0, np.array([0, 1, 4])).round(2).tolist()
        [6.0, 9.6, 12.9]
        """
        n = np.asarray(drafts, dtype=np.float64)
        off, on, per_draft = self.chain_terms(rows, tokens, ctx_tokens)
        return np.where(n > 0, on + per_draft * n, off)

    def observe(self, rows: int, tokens: int, ctx_tokens: int, spec: bool, measured_ms: float) -> None:
        """Move the correction of this step's (spec, bucket) toward measured / calibrated."""
        raw = self.cost.step_ms(rows, tokens, ctx_tokens, spec)
        if raw <= 0 or measured_ms <= 0:
            return
        i, b = int(spec), bucket(rows)
        before = self.correction[i, b]
        self.correction[i, b] += self.alpha * (bounded_ratio(measured_ms, raw, before) - before)
        # Half of a change (in log terms) carries to the other path of the bucket: a machine
        # that slows down slows both, and the path not taken must not keep a stale price.
        self.correction[1 - i, b] *= float(np.sqrt(self.correction[i, b] / before))

    def state(self) -> dict[str, Any]:
        """The model as plain data (exported to ``/metrics``; :meth:`from_state` rebuilds it).

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1)); m.correction[1, 0] = 1.5
        >>> StepTimeModel.from_state(m.state()).step_ms(1, 3, 0, True)
        15.0
        """
        return {"cost": asdict(self.cost), "correction": self.correction.round(4).tolist(),
                "draft_correction": [round(f, 4) for f in self.draft_correction]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StepTimeModel:
        model = cls(StepCost.from_dict(state["cost"]))
        correction = np.asarray(state.get("correction", model.correction), dtype=np.float64)
        if correction.shape == model.correction.shape:
            model.correction = correction
        draft = state.get("draft_correction", 1.0)
        fixed, per_draft = (draft, draft) if isinstance(draft, (int, float)) else draft
        model.draft_fit = DraftFit(alpha=model.alpha, fixed=float(fixed), per_draft=float(per_draft),
                                   t0=0.5 * float(fixed), t1=0.5 * float(per_draft))  # pseudo-data say the same
        return model

    def observe_draft(self, drafts: int, measured_ms: float) -> None:
        if drafts > 0:
            self.draft_fit.observe(self.cost.draft, self.cost.draft_token * drafts, measured_ms)


def fit_cost(records: list[dict[str, float]]) -> StepCost:
    """Least-squares :class:`StepCost` from measured steps (``rows, tokens, ctx_tokens, spec,
    step_ms``, and ``drafts, draft_ms`` for the drafting terms). Coefficients are kept >= 0."""
    x = np.array([[1.0, r["tokens"], r["rows"], r["ctx_tokens"] / 1000.0, float(r["spec"]),
                   float(r["spec"]) * r["rows"]] for r in records])
    y = np.array([r["step_ms"] for r in records])
    coef = _nonneg_lstsq(x, y)
    drafting = [r for r in records if r.get("drafts", 0) > 0]
    dcoef = (_nonneg_lstsq(np.array([[1.0, r["drafts"]] for r in drafting]),
                           np.array([r["draft_ms"] for r in drafting])) if len(drafting) >= 2 else [0.0, 0.0])
    return StepCost(base=coef[0], per_token=coef[1], per_row=coef[2], context=coef[3], spec=coef[4],
                    spec_row=coef[5], draft=dcoef[0], draft_token=dcoef[1])


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with negative coefficients dropped and the rest refitted."""
    keep = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    for _ in range(x.shape[1]):
        sol, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        coef[:] = 0.0
        coef[keep] = sol
        if (sol >= 0).all():
            break
        keep[np.flatnonzero(keep)[np.argmin(sol)]] = False
    return [round(float(c), 5) for c in coef]
