"""Predicted engine step time: a calibrated linear model, corrected online from measured steps.

A step's time (ms) is its forward and sampling, plus the drafting that prepares the next step:

    step  = base + per_token * tokens + per_row * rows + context * ctx_tokens / 1000
            + [spec] * (spec + spec_row * rows) + spec_token * verified + sampled * sampled_rows
    draft = [drafts > 0] * (draft + draft_token * drafts + draft_depth * depth)

``tokens``: tokens the step schedules (decode rows * (1 + k) plus prefill tokens); ``rows``:
requests in the step; ``ctx_tokens``: their context lengths summed; ``spec``: the step verifies
drafts (vLLM's speculative path: spec metadata and the rejection sampler), a fixed cost the whole
batch pays once any row speculates; ``verified``: the drafts the step verifies, which cost
``spec_token`` each on top of ``per_token`` (a verified draft costs more than a prefill token:
0.5-0.8 ms against 0.42 at one row on the demo model, so one price for both priced a fourth
draft too cheap and the spec path's fixed cost too dear); ``drafts``: tokens drafted for the
next step; ``depth``: the longest row's draft (a drafter that makes one batched call per draft
position, Hydra's sequential heads, pays ``draft_depth`` per position whatever the rows: on the
demo model 0.32 ms a position plus 0.035 ms a draft, so a price per draft alone was off by 2-3x
between one row and eight); ``sampled_rows``: logits rows whose token is drawn from a sampling
law (a request at temperature > 0: its token and each draft it verifies) rather than taken by
argmax, a softmax and a draw over the vocabulary each (on the demo model 0.01-0.02 ms a row: a
greedy calibration priced a temperature-0.7 draft a third or more too cheap). The coefficients come from a calibration (``specserve calibrate`` fits them to measured steps; the
demo model's ship with the plugin). Online, measured steps refit them (:class:`TermFit`:
exponentially weighted least squares on the relative error, pulled toward the calibration,
folded every few steps) and a level follows the host's speed step by step in between, so load
on a shared machine and a calibration from another one still give close predictions, and a
batch size or path the engine rarely runs is priced from the steps it does run. Drafting is
fitted term by term: a drafter's fixed cost, its cost per draft and per position are off by
different factors, and one factor fitted on small draft counts mispriced large ones.

    >>> c = StepCost(base=5.0, per_token=0.5, per_row=1.0, context=0.0, spec=2.0, spec_row=0.25,
    ...              draft=0.5, draft_token=0.05)
    >>> c.step_ms(rows=4, tokens=4, ctx_tokens=0, spec=False), c.step_ms(4, 12, 0, True)
    (11.0, 18.0)
    >>> m = StepTimeModel(c)
    >>> for _ in range(40): m.observe(4, 4, 0, False, measured_ms=22.0)
    >>> round(m.step_ms(4, 4, 0, False), 1), round(m.step_ms(4, 12, 0, True), 1)
    (22.0, 31.1)
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from specserve_vllm.spec_control.acceptance import SAMPLING_CLASSES

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Upper bounds of the batch-size buckets of the tree cost correction (``tree_pricing``)."""


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
    spec_token: float = 0.0
    """Per verified draft, on top of ``per_token`` (0 in calibrations written before it)."""
    draft_depth: float = 0.0
    """Per draft position of the longest row's draft (0 in calibrations written before it)."""
    sampled: float = 0.0
    """Per logits row drawn from a sampling law instead of an argmax (0 in calibrations written
    before it)."""

    def step_ms(self, rows: int, tokens: int, ctx_tokens: int, spec: bool, verified: int = 0,
                sampled: int = 0) -> float:
        features = step_features(rows, tokens, ctx_tokens, spec, verified, sampled)
        return sum(getattr(self, term) * x for term, x in zip(STEP_TERMS, features))

    def draft_ms(self, drafts: int, depth: int = 0) -> float:
        """Drafting ``drafts`` tokens whose longest row drafts ``depth`` of them."""
        return self.draft + self.draft_token * drafts + self.draft_depth * depth if drafts > 0 else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepCost:
        """From plain data; a term the data lacks takes its default (``spec_token``: 0)."""
        return cls(**{f.name: float(data[f.name]) for f in fields(cls) if f.name in data or f.default is MISSING})


@dataclass(frozen=True)
class Calibration:
    """What ``specserve calibrate`` writes: coefficients, and per-drafter acceptance priors."""

    cost: StepCost
    drafter_cost: dict[str, tuple[float, ...]]
    """Drafter class name -> (draft, draft_token[, draft_depth]) ms, overriding ``cost``'s drafting
    terms (a calibration without the third has it at 0)."""
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
            # a file from before the per-position term has two values: the appended 0.0 prices
            # its missing ``draft_depth`` at nothing (zip stops at the shorter of the two)
            terms = dict(zip(DRAFT_TERMS, (*self.drafter_cost[drafter], 0.0)))
            cost = StepCost(**{**asdict(cost), **terms})
        return cost, self.acceptance.get(drafter)

    def to_json(self) -> str:
        return json.dumps({"cost": asdict(self.cost), "drafter_cost": self.drafter_cost,
                           "acceptance": self.acceptance, "acceptance_by_class": self.acceptance_by_class,
                           "source": self.source}, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(cost=StepCost.from_dict(data["cost"]),
                   drafter_cost={k: tuple(float(x) for x in v[:len(DRAFT_TERMS)])
                                 for k, v in data.get("drafter_cost", {}).items()},
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

FOLD_EVERY = 16
"""Measurements a fit keeps before it folds them into its sums and solves (a few array
operations and one solve for all of them). Inside an engine, right after a forward pass, a
fold costs 240-330 us whether it takes one step or sixteen: taking every step as it came cost
80-110 us a step, about 2% of a 4-5 ms step. Between folds, :data:`LEVEL_RATE` follows the
host."""

LEVEL_RATE = 0.4
"""Weight of each measured step in the step model's level (:attr:`StepTimeModel.level`): the
ratio of measured to fitted step time over the steps since the last fold, which scales every
step price until the next fold takes those steps in (and resets it to 1). Replayed over 7,692
measured engine steps, the prediction error was 0.086 with folds every 16 steps and no level,
0.065 with it, against 0.068 for a fit solved at every step: a shared host's speed moves
faster than a fit with ten steps' memory follows."""


def nonneg_solve(solve: Callable[[np.ndarray], np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Solve a least-squares problem with its solution kept >= 0: ``solve(index)`` solves it on
    the coefficients ``index``; the most negative one is dropped and the rest solved again.
    Returns ``(index kept, their solution)``; an empty index when every coefficient dropped.

    >>> a, b = np.array([[1.0, 0.9], [0.9, 1.0]]), np.array([1.0, 0.2])
    >>> nonneg_solve(lambda i: np.linalg.solve(a[np.ix_(i, i)], b[i]), 2)
    (array([0]), array([1.]))
    """
    index = np.arange(n)
    while len(index):
        sol = solve(index)
        if (sol >= 0).all():
            return index, sol
        index = np.delete(index, int(np.argmin(sol)))
    return index, np.zeros(0)


class TermFit:
    """Online fit of coefficients ``c`` such that a time is ``sum_j c_j * feature_j``, starting
    at (and pulled toward) calibrated ones.

    Exponentially weighted least squares (weight ``alpha`` per measurement) on the error
    relative to the calibrated time, so every measurement counts alike whatever its size, with
    a small ridge toward the calibration. It is solved in factors of ``unit`` (the calibrated
    coefficient, or :data:`ZERO_TERM_SCALE`-like sizes for terms calibrated at 0, which a factor
    alone could never move). Measurements that vary one term only identify the prediction along
    it; where terms move together (rows and tokens of decode steps), the change is shared in
    proportion to their shares and the ridge holds the split. The sums start from
    pseudo-measurements of the calibration, so the first real ones move it like an EWMA would;
    each measurement's pull is bounded (:data:`MAX_STEP_RATIO`); coefficients stay >= 0.

    Measurements are kept as they come (a tuple append) and folded, in order, every
    ``fold_every`` of them (:meth:`fold`): the same sums as taking each at once, for a few array
    operations and one solve.

    The ridge pulls a term toward its value at the last fold whose measurements exercised it
    (a nonzero feature), not toward the calibration: a term no recent measurement exercises
    (the spec path's, through a stretch of plain steps) keeps what it learnt as its evidence
    fades, instead of drifting back to a calibration another host may have measured.

    Example: calibrated ``1 + 1 n``, measured ``2 + 0.5 n``:
        >>> f = TermFit((1.0, 1.0), fold_every=1)
        >>> for n in (1.0, 6.0) * 60:
        ...     f.observe((1.0, n), 2.0 + 0.5 * n)
        >>> [round(c, 2) for c in f.coef], round(f.predict((1.0, 3.0)), 2)
        ([2.0, 0.5], 3.5)
    """

    __slots__ = ("calibrated", "unit", "alpha", "ridge", "fold_every", "factors", "coef", "gram", "moment",
                 "pending", "_prior", "_ridge_eye", "_ridge_prior", "_root_weight", "_basis", "anchor")

    def __init__(self, calibrated: Sequence[float], unit: Sequence[float] | None = None, alpha: float = 0.1,
                 ridge: float = 0.001, fold_every: int = FOLD_EVERY) -> None:
        self.calibrated = np.asarray(calibrated, dtype=np.float64)
        self.unit = np.where(self.calibrated > 0, self.calibrated, 1.0 if unit is None else np.asarray(unit))
        self.alpha, self.ridge, self.fold_every = alpha, ridge, fold_every
        self._prior = self.calibrated / self.unit  # 1 where calibrated > 0, else 0
        n = len(self._prior)
        self.gram = 0.5 * np.eye(n)  # weighted sums of x x^T, x = terms / calibrated time
        self.moment = 0.5 * self._prior  # weighted sums of x * measured / calibrated time
        self._ridge_eye, self._ridge_prior = ridge * np.eye(n), ridge * self._prior
        self.anchor = self._prior.copy()
        """The factors the ridge pulls toward: each term's as of the last fold that exercised it."""
        self._root_weight = np.sqrt(alpha * (1.0 - alpha) ** np.arange(fold_every - 1, -1, -1.0))  # newest: alpha
        self.pending: list[tuple[Sequence[float], float]] = []
        self.coef: tuple[float, ...] = ()
        """The coefficients now (as of the last fold), plain floats for cheap predictions."""
        self._set(self._prior.copy())

    def set_factors(self, factors: Sequence[float]) -> None:
        """Start from ``factors`` (coefficients in units of :attr:`unit`) instead of the calibration."""
        self._set(np.asarray(factors, dtype=np.float64).copy())
        self.moment = 0.5 * self.factors
        self.anchor = self.factors.copy()
        self._ridge_prior = self.ridge * self.anchor

    def predict(self, features: Sequence[float]) -> float:
        return sum(c * x for c, x in zip(self.coef, features))

    def observe(self, features: Sequence[float], measured_ms: float) -> None:
        """One measurement: its features and its time. Kept, and folded with the ones before
        it once there are ``fold_every`` (:attr:`pending` is empty after a fold)."""
        self.pending.append((features, measured_ms))
        if len(self.pending) >= self.fold_every:
            self.fold()

    def fold(self) -> None:
        """Take the kept measurements into the sums, in order, and solve the fit.

        One product gives both sums: the rows ``(terms, measured)``, each scaled by
        ``sqrt(weight) / calibrated time``, times themselves. Inside an engine each array
        operation costs 10-15 us right after a forward pass, so the fold keeps them few."""
        if not self.pending:
            return
        data = np.array([(*f, m) for f, m in self.pending], dtype=np.float64)  # [k, n + 1]
        self.pending.clear()
        data[:, :-1] *= self.unit
        times = data[:, :-1] @ self._basis  # [k, 2]: calibrated, predicted now
        if not (times.min() > 0 and data[:, -1].min() > 0):
            ok = (times.min(axis=1) > 0) & (data[:, -1] > 0)
            data, times = data[ok], times[ok]
            if not len(data):
                return
        k = len(data)
        np.clip(data[:, -1], times[:, 1] * (1.0 / MAX_STEP_RATIO), times[:, 1] * MAX_STEP_RATIO, out=data[:, -1])
        data *= (self._root_weight[-k:] / times[:, 0])[:, None]  # k <= fold_every: observe folds at it
        sums = data.T @ data  # [n + 1, n + 1]: the gram's terms, and the moment in the last column
        decay = (1.0 - self.alpha) ** k
        self.gram *= decay
        self.gram += sums[:-1, :-1]
        self.moment *= decay
        self.moment += sums[:-1, -1]
        self.solve()
        exercised = np.diagonal(sums)[:-1] > 0  # the others keep their anchor
        self.anchor[exercised] = self.factors[exercised]
        self._ridge_prior = self.ridge * self.anchor

    def solve(self) -> None:
        """The ridge least squares of the sums, each coefficient >= 0 (a fit with every one
        dropped keeps the factors it had)."""
        a, b = self.gram + self._ridge_eye, self.moment + self._ridge_prior
        sol = np.linalg.solve(a, b)
        if not (sol >= 0).all():
            index, sol = nonneg_solve(lambda i: np.linalg.solve(a[np.ix_(i, i)], b[i]), len(b))
            if not len(index):
                return
            full = np.zeros(len(b))
            full[index] = sol
            sol = full
        self._set(sol)

    def _set(self, factors: np.ndarray) -> None:
        self.factors = factors
        self._basis = np.stack([self._prior, factors], axis=1)
        self.coef = tuple((factors * self.unit).tolist())


STEP_TERMS: tuple[str, ...] = ("base", "per_token", "per_row", "context", "spec", "spec_row", "spec_token", "sampled")
"""The step's terms, in the order of :func:`step_features`."""
ZERO_TERM_SCALE: tuple[float, ...] = (1.0, 0.02, 0.05, 0.3, 0.5, 0.05, 0.5, 0.02)
"""A term's size (ms per unit) when the calibration has it at 0: the unit of its factor, so the
fit can still learn it (a factor times 0 stays 0). Typical of the demo model on a CPU engine."""
DRAFT_TERMS: tuple[str, ...] = ("draft", "draft_token", "draft_depth")
"""The drafting terms, in the order of :func:`draft_features`."""
ZERO_DRAFT_SCALE: tuple[float, ...] = (0.5, 0.05, 0.3)
"""The same for the drafting terms (:data:`DRAFT_TERMS`)."""


def step_features(rows: int, tokens: int, ctx_tokens: int, spec: bool, verified: int = 0,
                  sampled: int = 0) -> tuple[float, ...]:
    """The features the step terms multiply (:data:`STEP_TERMS` order).

    >>> step_features(4, 12, 2000, True, verified=8, sampled=6)
    (1.0, 12.0, 4.0, 2.0, 1.0, 4.0, 8.0, 6.0)
    """
    s = 1.0 if spec else 0.0
    return 1.0, float(tokens), float(rows), ctx_tokens / 1000.0, s, s * rows, float(verified), float(sampled)


def draft_features(drafts: int, depth: int) -> tuple[float, float, float]:
    """The features the drafting terms multiply (:data:`DRAFT_TERMS` order): ``drafts`` tokens
    whose longest row drafts ``depth``.

    >>> draft_features(12, 4)
    (1.0, 12.0, 4.0)
    """
    return 1.0, float(drafts), float(depth)


class StepTimeModel:
    """:class:`StepCost` fitted online: the step terms by one :class:`TermFit` over every
    measured step, scaled by a short-term :attr:`level`; the drafting terms by a second one.

    One fit over all steps, not a correction per batch size: a batch size the engine rarely
    runs (the tail of a wave of requests) is priced from the others, and the path not taken
    (speculative or plain) follows the machine through the terms both paths share. Drafting has
    its own fit: a drafter's fixed cost and its cost per draft are off by different factors
    (Hydra's heads run once per position whatever the rows), and one factor fitted on small
    draft counts mispriced large ones.
    """

    def __init__(self, cost: StepCost, alpha: float = 0.1) -> None:
        self.calibration = cost
        self.alpha = alpha
        self.step_fit = TermFit([getattr(cost, t) for t in STEP_TERMS], ZERO_TERM_SCALE, alpha)
        self.draft_fit = TermFit([getattr(cost, t) for t in DRAFT_TERMS], ZERO_DRAFT_SCALE, alpha)
        self.level = 1.0
        """Measured over fitted step time, followed step by step (:data:`LEVEL_RATE`) since the
        step fit's last fold; every step price is scaled by it."""

    @property
    def coef(self) -> tuple[float, ...]:
        """The step terms' coefficients now (ms, :data:`STEP_TERMS` order), level included."""
        return tuple(c * self.level for c in self.step_fit.coef)

    @property
    def cost(self) -> StepCost:
        """The model as it prices steps now: fitted step terms (level included), calibrated
        drafting terms (their corrections are :attr:`draft_correction`)."""
        return StepCost(**{**asdict(self.calibration), **dict(zip(STEP_TERMS, self.coef))})

    @property
    def draft_correction(self) -> tuple[float, float, float]:
        """The drafting terms' factors: ``(fixed, per draft, per position)``, in units of the
        calibration (of :data:`ZERO_DRAFT_SCALE` for a term calibrated at 0)."""
        fixed, per_draft, per_position = self.draft_fit.factors.tolist()
        return fixed, per_draft, per_position

    def step_ms(self, rows: int, tokens: int, ctx_tokens: int, spec: bool, verified: int = 0,
                sampled: int = 0) -> float:
        return self.step_fit.predict(step_features(rows, tokens, ctx_tokens, spec, verified, sampled)) * self.level

    def draft_ms(self, drafts: int, depth: int = 0) -> float:
        """Drafting ``drafts`` tokens whose longest row drafts ``depth``, as fitted now."""
        if drafts <= 0:
            return 0.0
        fixed, per_draft, per_position = self.draft_fit.coef
        return fixed + per_draft * drafts + per_position * depth

    def chain_terms(self, rows: int, tokens: int, ctx_tokens: int,
                    sampled: int = 0) -> tuple[float, float, float, float, float]:
        """``(off, on, per_draft, per_position, per_sampled)`` ms: a step of ``rows`` rows
        scheduling ``tokens`` tokens (drafts aside), ``sampled`` of its rows drawn from a
        sampling law, costs ``off`` without drafts and
        ``on + per_draft * n + per_sampled * n_s + per_position * depth`` with ``n`` of them,
        ``n_s`` in sampled rows, the longest row's ``depth`` long, drafting included
        (:meth:`cycle_ms` in five numbers, for the controller).

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1, draft_depth=0.3, sampled=0.2))
        >>> m.chain_terms(1, 1, 0), m.chain_terms(1, 1, 0, sampled=1)[0]
        ((6.0, 8.5, 1.1, 0.3, 0.2), 6.2)
        """
        base, per_token, per_row, context, spec, spec_row, spec_token, per_sampled = self.step_fit.coef
        level = self.level
        plain = (base + per_token * tokens + per_row * rows + context * ctx_tokens / 1000.0
                 + per_sampled * sampled) * level
        fixed, per_draft, per_position = self.draft_fit.coef
        return (plain, plain + (spec + spec_row * rows) * level + fixed,
                (per_token + spec_token) * level + per_draft, per_position, per_sampled * level)

    def cycle_ms(self, rows: int, tokens: int, ctx_tokens: int, drafts: np.ndarray,
                 depth: np.ndarray | None = None, sampled: int = 0,
                 sampled_drafts: np.ndarray | None = None) -> np.ndarray:
        """Step plus drafting time for each total draft count in ``drafts`` whose longest row
        drafts ``depth`` (vectorised; ``None``: every draft in one row, ``depth = drafts``);
        ``sampled`` rows and ``sampled_drafts`` of the drafts are drawn from a sampling law.

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1, draft_depth=0.3))
        >>> m.cycle_ms(1, 1, 0, np.array([0, 1, 4])).round(2).tolist()
        [6.0, 9.9, 14.1]
        >>> m.cycle_ms(4, 4, 0, np.array([4]), depth=np.array([1])).round(2).tolist()  # a draft a row
        [16.2]
        """
        n = np.asarray(drafts, dtype=np.float64)
        d = n if depth is None else np.asarray(depth, dtype=np.float64)
        off, on, per_draft, per_position, per_sampled = self.chain_terms(rows, tokens, ctx_tokens, sampled)
        on_ms = on + per_draft * n + per_position * d
        if sampled_drafts is not None:
            on_ms = on_ms + per_sampled * np.asarray(sampled_drafts, dtype=np.float64)
        return np.where(n > 0, on_ms, off)

    def observe(self, rows: int, tokens: int, ctx_tokens: int, spec: bool, measured_ms: float,
                verified: int = 0, sampled: int = 0) -> None:
        """One measured step (forward and sampling, drafting aside): it moves :attr:`level`
        now and the fit at its next fold (which resets the level: the fit has the step then).

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1))
        >>> m.observe(1, 1, 0, False, measured_ms=9.0)  # fitted 6: level 1 + 0.4 * (1.5 - 1)
        >>> round(m.level, 2), round(m.step_ms(1, 1, 0, False), 2)
        (1.2, 7.2)
        """
        features = step_features(rows, tokens, ctx_tokens, spec, verified, sampled)
        fitted = self.step_fit.predict(features)
        if fitted > 0 and measured_ms > 0:
            ratio = min(max(measured_ms / fitted, 1.0 / MAX_STEP_RATIO), MAX_STEP_RATIO)
            self.level += LEVEL_RATE * (ratio - self.level)
        self.step_fit.observe(features, measured_ms)
        if not self.step_fit.pending:  # folded: the fit has the steps the level followed
            self.level = 1.0

    def observe_draft(self, drafts: int, measured_ms: float, depth: int = 0) -> None:
        """One drafting call: ``drafts`` tokens, the longest row ``depth`` of them, in ``measured_ms``."""
        if drafts > 0:
            self.draft_fit.observe(draft_features(drafts, depth), measured_ms)

    def state(self) -> dict[str, Any]:
        """The model as plain data (exported to ``/metrics``; :meth:`from_state` rebuilds one
        that prices steps alike). Read from another thread: it touches no pending measurement.

        >>> m = StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1))
        >>> for _ in range(30): m.observe(1, 3, 0, True, 15.0)
        >>> round(m.step_ms(1, 3, 0, True), 2), round(StepTimeModel.from_state(m.state()).step_ms(1, 3, 0, True), 2)
        (15.0, 15.0)
        """
        return {"cost": {k: round(v, 5) for k, v in asdict(self.cost).items()},
                "draft_correction": [round(f, 4) for f in self.draft_correction]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StepTimeModel:
        model = cls(StepCost.from_dict(state["cost"]))
        draft = state.get("draft_correction", 1.0)
        if isinstance(draft, (int, float)):  # one factor for the calibrated terms
            factors = [float(draft) if getattr(model.calibration, t) > 0 else 0.0 for t in DRAFT_TERMS]
        else:
            factors = [float(f) for f in draft]
            factors += model.draft_fit.factors.tolist()[len(factors):]  # an older state: the rest as calibrated
        model.draft_fit.set_factors(factors[:len(DRAFT_TERMS)])
        return model


def fit_cost(records: list[dict[str, float]]) -> StepCost:
    """Least-squares :class:`StepCost` from measured steps (``rows, tokens, ctx_tokens, spec,
    drafts_verified, sampled, step_ms``, and ``drafts, draft_depth, draft_ms`` for the drafting terms).
    Coefficients are kept >= 0."""
    x = np.array([step_features(int(r["rows"]), int(r["tokens"]), int(r["ctx_tokens"]), bool(r["spec"]),
                                int(r.get("drafts_verified", 0)), int(r.get("sampled", 0))) for r in records])
    y = np.array([r["step_ms"] for r in records])
    coef = _nonneg_lstsq(x, y)
    drafting = [r for r in records if r.get("drafts", 0) > 0]
    dcoef = (_nonneg_lstsq(np.array([draft_features(int(r["drafts"]), int(r.get("draft_depth", 0)))
                                     for r in drafting]),
                           np.array([r["draft_ms"] for r in drafting])) if len(drafting) >= 3 else [0.0] * 3)
    return StepCost(base=coef[0], per_token=coef[1], per_row=coef[2], context=coef[3], spec=coef[4],
                    spec_row=coef[5], draft=dcoef[0], draft_token=dcoef[1], spec_token=coef[6],
                    draft_depth=dcoef[2], sampled=coef[7])


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with negative coefficients dropped and the rest refitted (:func:`nonneg_solve`)."""
    index, sol = nonneg_solve(lambda i: np.linalg.lstsq(x[:, i], y, rcond=None)[0], x.shape[1])
    coef = np.zeros(x.shape[1])
    coef[index] = sol
    return [round(float(c), 5) for c in coef]
