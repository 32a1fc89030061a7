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
demo model's ship with the plugin). Online, every measured step refits them (:class:`TermFit`:
exponentially weighted least squares on the relative error, pulled toward the calibration), so
load on a shared machine and a calibration from another one still give close predictions, and a
batch size or path the engine rarely runs is priced from the steps it does run. Drafting is
fitted term by term (:class:`DraftFit`): a drafter's fixed cost and its cost per draft are off
by different factors (Hydra's heads run once per position whatever the rows), and one factor
fitted on small draft counts mispriced large ones.

    >>> c = StepCost(base=5.0, per_token=0.5, per_row=1.0, context=0.0, spec=2.0, spec_row=0.25,
    ...              draft=0.5, draft_token=0.05)
    >>> c.step_ms(rows=4, tokens=4, ctx_tokens=0, spec=False), c.step_ms(4, 12, 0, True)
    (11.0, 18.0)
    >>> m = StepTimeModel(c)
    >>> for _ in range(40): m.observe(4, 4, 0, False, measured_ms=22.0)
    >>> round(m.step_ms(4, 4, 0, False), 1), round(m.step_ms(4, 12, 0, True), 1)
    (21.8, 30.7)
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
"""One measured step pulls a fit as if it were at most this factor off the current prediction.
A one-off slow step (a drafter's first call compiling its kernels, a page fault storm) would
otherwise price a path out for good: the controller stops taking it and no measurement comes
back to correct it. A real change of speed still converges, over a few dozen steps."""


class TermFit:
    """Online fit of a time as ``sum_j factor_j * term_j``, the terms being the calibrated
    model's (each coefficient times its feature), the factors starting at ``prior``.

    Exponentially weighted least squares (weight ``alpha`` per measurement) on the error
    relative to the calibrated time, so every measurement counts alike whatever its size, with
    a small ridge toward ``prior``. Measurements that vary one term only identify the
    prediction along it; where the terms move together (rows and tokens of decode steps), the
    change is shared in proportion to their shares and the ridge holds the split. Starts from
    pseudo-measurements of the prior, so the first real ones move it like an EWMA would; each
    measurement's pull is bounded (:data:`MAX_STEP_RATIO`); factors stay >= 0 (a negative one
    is dropped and the rest refitted).

    Example: terms ``(1, n)`` calibrated at ``1 + n``, measured ``2 + 0.5 n``:
        >>> f = TermFit(np.ones(2))
        >>> for n in (1.0, 6.0) * 60:
        ...     f.observe(np.array([1.0, n]), 2.0 + 0.5 * n)
        >>> f.factors.round(2).tolist(), round(f.predict(np.array([1.0, 3.0])), 2)
        ([1.98, 0.51], 3.5)
    """

    __slots__ = ("prior", "alpha", "ridge", "factors", "gram", "moment", "refit_every", "_pending", "_ridge_eye",
                 "_ridge_prior")

    def __init__(self, prior: np.ndarray, alpha: float = 0.1, ridge: float = 0.001,
                 factors: np.ndarray | None = None, refit_every: int = 1) -> None:
        self.prior = np.asarray(prior, dtype=np.float64)
        self.alpha, self.ridge, self.refit_every = alpha, ridge, refit_every
        self.factors = (self.prior if factors is None else np.asarray(factors, dtype=np.float64)).copy()
        self.gram = 0.5 * np.eye(len(self.prior))  # weighted sums of x x^T, x = terms / calibrated time
        self.moment = 0.5 * self.factors  # weighted sums of x * measured / calibrated time
        self._pending = 0
        self._ridge_eye = ridge * np.eye(len(self.prior))
        self._ridge_prior = ridge * self.prior

    def predict(self, terms: np.ndarray) -> float:
        return float(terms @ self.factors)

    def observe(self, terms: np.ndarray, measured_ms: float) -> None:
        """One measurement: the terms at factor 1 (``coefficient * feature`` each) and the time.
        The sums take it at once; the factors are re-solved every ``refit_every`` measurements."""
        raw, predicted = float(terms @ self.prior), float(terms @ self.factors)
        if raw <= 0 or measured_ms <= 0 or predicted <= 0:
            return
        measured = min(max(measured_ms, predicted / MAX_STEP_RATIO), predicted * MAX_STEP_RATIO)
        x, keep = terms / raw, 1.0 - self.alpha
        self.gram *= keep
        self.gram += np.multiply.outer(self.alpha * x, x)
        self.moment *= keep
        self.moment += (self.alpha * measured / raw) * x
        self._pending += 1
        if self._pending >= self.refit_every:
            self._pending = 0
            self.refit()

    def refit(self) -> None:
        """Solve the ridge least squares; a negative factor is dropped and the rest refitted."""
        sol = np.linalg.solve(self.gram + self._ridge_eye, self.moment + self._ridge_prior)
        if (sol >= 0).all():
            self.factors[:] = sol
            return
        active = np.ones(len(sol), dtype=bool)
        while True:
            active[np.flatnonzero(active)[int(np.argmin(sol))]] = False
            index = np.flatnonzero(active)
            if not len(index):  # nothing left to fit: keep the factors it had
                return
            sol = np.linalg.solve(self.gram[np.ix_(index, index)] + self._ridge_eye[: len(index), : len(index)],
                                  self.moment[index] + self._ridge_prior[index])
            if (sol >= 0).all():
                break
        self.factors[:] = 0.0
        self.factors[index] = sol


class DraftFit(TermFit):
    """Drafting time as ``fixed * draft + per_draft * draft_token * n`` (:class:`TermFit` over
    the two drafting terms): a drafter's fixed cost and its cost per draft are off by different
    factors, and one factor fitted on small draft counts misprices large ones.

    Example: calibrated 1 + 0.1 n ms, measured 2 + 0.05 n (a higher fixed cost, a lower slope):
        >>> f = DraftFit()
        >>> for n in (4, 32) * 60:
        ...     f.observe(1.0, 0.1 * n, 2.0 + 0.05 * n)
        >>> round(f.fixed, 2), round(f.per_draft, 2), round(f.predict(1.0, 0.1 * 16), 2)
        (1.99, 0.51, 2.8)
    """

    __slots__ = ()

    def __init__(self, alpha: float = 0.1, fixed: float = 1.0, per_draft: float = 1.0) -> None:
        super().__init__(np.ones(2), alpha, factors=np.array([fixed, per_draft]))

    @property
    def fixed(self) -> float:
        return float(self.factors[0])

    @property
    def per_draft(self) -> float:
        return float(self.factors[1])

    def predict(self, fixed_ms: float, per_draft_ms: float) -> float:  # type: ignore[override]
        return self.fixed * fixed_ms + self.per_draft * per_draft_ms

    def observe(self, fixed_ms: float, per_draft_ms: float, measured_ms: float) -> None:  # type: ignore[override]
        """One drafting call: the calibrated terms (``draft``, ``draft_token * n``) and its time."""
        super().observe(np.array([fixed_ms, per_draft_ms]), measured_ms)


STEP_TERMS: tuple[str, ...] = ("base", "per_token", "per_row", "context", "spec", "spec_row")
"""The step's terms, in the order of :func:`step_features`."""
ZERO_TERM_SCALE: tuple[float, ...] = (1.0, 0.02, 0.05, 0.3, 0.5, 0.05)
"""A term's size (ms per unit) when the calibration has it at 0: the unit of its factor, so the
fit can still learn it (a factor times 0 stays 0). Typical of the demo model on a CPU engine."""


STEP_REFIT_EVERY = 2
"""Steps between re-solves of the step fit (its sums take every step). The solve is most of the
fit's cost: about 25 us a step re-solving every step, 17 us every second, against steps of 4 ms
and more; replayed over measured steps, the prediction error is the same to 0.001."""


def step_features(rows: int, tokens: int, ctx_tokens: int, spec: bool) -> np.ndarray:
    """The features the step terms multiply (:data:`STEP_TERMS` order).

    >>> step_features(4, 12, 2000, True).tolist()
    [1.0, 12.0, 4.0, 2.0, 1.0, 4.0]
    """
    s = 1.0 if spec else 0.0
    return np.array([1.0, float(tokens), float(rows), ctx_tokens / 1000.0, s, s * rows])


class StepTimeModel:
    """:class:`StepCost` fitted online: the step terms by one :class:`TermFit` over every
    measured step, the drafting terms by a :class:`DraftFit`.

    One fit over all steps, not a correction per batch size: a batch size the engine rarely
    runs (the tail of a wave of requests) is priced from the others, and the path not taken
    (speculative or plain) follows the machine through the terms both paths share.
    """

    def __init__(self, cost: StepCost, alpha: float = 0.1) -> None:
        self.calibration = cost
        self.alpha = alpha
        coef = np.array([getattr(cost, t) for t in STEP_TERMS], dtype=np.float64)
        self._scale = np.where(coef > 0, coef, np.array(ZERO_TERM_SCALE))
        self.step_fit = TermFit(coef / self._scale, alpha=alpha, refit_every=STEP_REFIT_EVERY)
        self.draft_fit = DraftFit(alpha=alpha)
        self.coef = coef
        """The step terms' current coefficients (ms, :data:`STEP_TERMS` order)."""

    @property
    def cost(self) -> StepCost:
        """The model as it prices steps now: fitted step terms, calibrated drafting terms
        (their corrections are :attr:`draft_correction`)."""
        return StepCost(**{**asdict(self.calibration), **dict(zip(STEP_TERMS, self.coef.tolist()))})

    @property
    def draft_correction(self) -> tuple[float, float]:
        """The drafting terms' corrections: ``(fixed, per draft)``."""
        return self.draft_fit.fixed, self.draft_fit.per_draft

    def step_ms(self, rows: int, tokens: int, ctx_tokens: int, spec: bool) -> float:
        return float(step_features(rows, tokens, ctx_tokens, spec) @ self.coef)

    def draft_ms(self, drafts: int) -> float:
        if drafts <= 0:
            return 0.0
        return self.draft_fit.predict(self.calibration.draft, self.calibration.draft_token * drafts)

    def chain_terms(self, rows: int, tokens: int, ctx_tokens: int) -> tuple[float, float, float]:
        """``(off, on, per_draft)`` ms: a step of ``rows`` rows scheduling ``tokens`` tokens
        (drafts aside) costs ``off`` without drafts and ``on + per_draft * n`` with ``n`` of
        them, drafting included (:meth:`cycle_ms` in three numbers, for the controller).

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1))
        >>> m.chain_terms(1, 1, 0)
        (6.0, 8.5, 1.1)
        """
        base, per_token, per_row, context, spec, spec_row = self.coef.tolist()
        plain = base + per_token * tokens + per_row * rows + context * ctx_tokens / 1000.0
        c = self.calibration
        on = plain + spec + spec_row * rows + self.draft_fit.fixed * c.draft
        return plain, on, per_token + self.draft_fit.per_draft * c.draft_token

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
        """Refit the step terms with one measured step (forward and sampling, drafting aside)."""
        self.step_fit.observe(step_features(rows, tokens, ctx_tokens, spec) * self._scale, measured_ms)
        self.coef = self.step_fit.factors * self._scale

    def state(self) -> dict[str, Any]:
        """The model as plain data (exported to ``/metrics``; :meth:`from_state` rebuilds one
        that prices steps alike).

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1))
        >>> for _ in range(30): m.observe(1, 3, 0, True, 15.0)
        >>> round(m.step_ms(1, 3, 0, True), 2), round(StepTimeModel.from_state(m.state()).step_ms(1, 3, 0, True), 2)
        (14.71, 14.71)
        """
        return {"cost": {k: round(v, 5) for k, v in asdict(self.cost).items()},
                "draft_correction": [round(f, 4) for f in self.draft_correction]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StepTimeModel:
        model = cls(StepCost.from_dict(state["cost"]))
        draft = state.get("draft_correction", 1.0)
        fixed, per_draft = (draft, draft) if isinstance(draft, (int, float)) else draft
        model.draft_fit = DraftFit(alpha=model.alpha, fixed=float(fixed), per_draft=float(per_draft))
        return model

    def observe_draft(self, drafts: int, measured_ms: float) -> None:
        if drafts > 0:
            self.draft_fit.observe(self.calibration.draft, self.calibration.draft_token * drafts, measured_ms)


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
