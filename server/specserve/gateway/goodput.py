"""Per-request speculation length chosen from goodput (policy ``goodput``).

The model (after SmartSpec): with per-token draft acceptance ``alpha`` and ``k`` drafted tokens, one
verification step yields on average ``E(k) = (1 - alpha**(k+1)) / (1 - alpha)`` tokens per request
(``E(0) = 1``: plain decoding). A step over a batch of ``B`` requests, each verifying ``k + 1``
tokens, takes ``T(k) = a + b * B * (k + 1)`` seconds. The batch's goodput is
``G(k) = B * E(k) / T(k)`` tokens per second; the controller sends each request the ``k`` in
``[0, k_max]`` that maximises it. Idle (small ``B``) and an accurate drafter: ``T`` hardly grows
with ``k``, so ``k_max`` wins. Loaded (large ``B``) or a poor drafter: the extra verified tokens
cost more than the accepted ones bring, so ``k`` shrinks to 0.

``alpha`` is estimated per model from the responses' per-request acceptance
(:class:`AcceptanceEstimate`); ``a`` and ``b`` start from configured values and are refined per
model from the observed time per decoding step (:class:`StepTimeModel`).

Example:
    >>> best_k(alpha=0.8, batch=1, a=0.02, b=0.0005, k_max=4)
    4
    >>> best_k(alpha=0.8, batch=256, a=0.02, b=0.0005, k_max=4)
    0
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

SpecPolicy = Literal["goodput", "fixed"]
SPEC_POLICIES: tuple[SpecPolicy, ...] = ("goodput", "fixed")


# -- the pure model ----------------------------------------------------------------------------
def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification step yields on average with ``k`` drafts: ``(1 - α^(k+1)) / (1 - α)``.

    Example:
        >>> expected_tokens(0.5, 0), expected_tokens(0.5, 1), expected_tokens(0.5, 3)
        (1.0, 1.5, 1.875)
        >>> expected_tokens(1.0, 4)
        5.0
    """
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    alpha = max(alpha, 0.0)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def step_time(a: float, b: float, batch: float, k: int) -> float:
    """Seconds of one verification step over ``batch`` requests verifying ``k + 1`` tokens each.

    Example:
        >>> step_time(0.02, 0.001, batch=4, k=1)
        0.028
    """
    return a + b * batch * (k + 1)


def goodput(alpha: float, k: int, batch: float, a: float, b: float) -> float:
    """Accepted tokens per second of the whole batch when every request drafts ``k``.

    Example:
        >>> round(goodput(0.5, 1, batch=2, a=0.01, b=0.0), 1)
        300.0
    """
    return batch * expected_tokens(alpha, k) / step_time(a, b, batch, k)


def best_k(alpha: float, batch: float, a: float, b: float, k_max: int) -> int:
    """The ``k`` in ``[0, k_max]`` of highest :func:`goodput` (ties go to the smaller ``k``).

    Example:
        >>> [best_k(0.7, batch, a=0.02, b=0.0005, k_max=4) for batch in (1, 8, 32, 64, 128)]
        [4, 3, 1, 1, 0]
        >>> [best_k(alpha, 1, a=0.02, b=0.002, k_max=4) for alpha in (0.0, 0.2, 0.5, 0.9)]
        [0, 1, 2, 4]
    """
    best, best_g = 0, goodput(alpha, 0, batch, a, b)
    for k in range(1, max(0, k_max) + 1):
        g = goodput(alpha, k, batch, a, b)
        if g > best_g * (1.0 + 1e-9):
            best, best_g = k, g
    return best


# -- the online estimates ---------------------------------------------------------------------
@dataclass(frozen=True)
class SpecStats:
    """A response's ``metrics.speculative_decoding`` (vLLM ``--per-request-spec-decode-metrics``)."""

    accepted: int
    """``num_accepted_draft_tokens``: drafts the target model accepted."""
    drafted: int
    """``num_draft_tokens``: drafts proposed for this request."""
    steps: int
    """``num_spec_steps``: verification steps that carried drafts."""
    spec_tokens: int
    """``num_spec_tokens``: the engine's ``num_speculative_tokens`` (largest ``k``)."""
    mean_acceptance_length: float
    """Tokens per verification step, the bonus token included."""
    histogram: tuple[int, ...] = ()
    """Steps that accepted exactly ``j`` drafts, for ``j`` in ``0..spec_tokens``."""
    per_step_drafted: tuple[int, ...] = ()
    """Drafts of each verification step, in order (engines at the ``detailed`` metrics level)."""
    per_step_accepted: tuple[int, ...] = ()
    """Accepted drafts of each verification step, in order (``detailed`` level)."""

    def trials(self) -> tuple[int, int]:
        """``(successes, trials)`` of the per-token acceptance: the geometric model's estimate.

        A step accepts drafts until the first rejection, so the trials are the accepted drafts
        plus the steps that rejected one. With per-step counts those steps are known exactly; when
        every step drafted the same ``d`` tokens, they are the steps that accepted fewer than ``d``
        (``steps - histogram[d]``); otherwise every draft counts as a trial (``accepted /
        drafted``, an underestimate when some steps reject early).

        Example:
            >>> SpecStats(accepted=6, drafted=8, steps=4, spec_tokens=2, mean_acceptance_length=2.5,
            ...           histogram=(1, 0, 3)).trials()
            (6, 7)
            >>> SpecStats(accepted=3, drafted=7, steps=3, spec_tokens=4, mean_acceptance_length=2.0).trials()
            (3, 7)
            >>> SpecStats(accepted=3, drafted=7, steps=3, spec_tokens=4, mean_acceptance_length=2.0,
            ...           per_step_drafted=(4, 2, 1), per_step_accepted=(0, 2, 1)).trials()
            (3, 4)
        """
        if self.per_step_drafted and len(self.per_step_drafted) == len(self.per_step_accepted):
            rejected = sum(a < d for d, a in zip(self.per_step_drafted, self.per_step_accepted))
            return self.accepted, self.accepted + rejected
        if self.steps > 0 and self.drafted % self.steps == 0:
            d = self.drafted // self.steps
            if 0 < d < len(self.histogram):
                return self.accepted, self.accepted + self.steps - self.histogram[d]
        return self.accepted, self.drafted

    def k_used(self, completion_tokens: int | None) -> tuple[float, int] | None:
        """``(mean, max)`` drafts per decode step of this request: the speculation length it got.

        The mean is over every decode step, those with no drafts included: a request of ``n``
        tokens had ``n - 1 - accepted`` decode steps (each commits its accepted drafts plus one
        token; the first token comes from the prefill). The max needs per-step counts; without
        them it is the largest ``j`` seen accepted, a lower bound. ``None`` without a token count.

        Example:
            >>> s = SpecStats(accepted=3, drafted=7, steps=3, spec_tokens=4, mean_acceptance_length=2.0,
            ...               per_step_drafted=(4, 2, 1), per_step_accepted=(0, 2, 1))
            >>> s.k_used(10)  # 10 tokens: 1 from the prefill, 6 decode steps (3 of them drafted)
            (1.167, 4)
            >>> s.k_used(None) is None
            True
        """
        if not completion_tokens:
            return None
        steps = max(decode_steps(completion_tokens, self), self.steps, 1)
        if self.per_step_drafted:
            top = max(self.per_step_drafted)
        else:
            top = max((j for j, c in enumerate(self.histogram) if c), default=0)
        return round(self.drafted / steps, 3), top


@dataclass
class AcceptanceEstimate:
    """Per-token acceptance ``alpha`` as a decaying ratio of accepted drafts to trials.

    Each response's counts are added after the running sums are multiplied by ``decay``; a prior
    of ``prior_weight`` trials at ``prior`` keeps the first responses from swinging it to 0 or 1.

    Example:
        >>> est = AcceptanceEstimate(prior=0.5, prior_weight=4.0, decay=0.9)
        >>> est.alpha
        0.5
        >>> est.observe(successes=9, trials=10); round(est.alpha, 3)
        0.786
    """

    prior: float = 0.5
    prior_weight: float = 8.0
    decay: float = 0.95
    successes: float = 0.0
    trials: float = 0.0

    def observe(self, successes: int, trials: int) -> None:
        if trials <= 0:
            return
        self.successes = self.decay * self.successes + successes
        self.trials = self.decay * self.trials + trials

    @property
    def alpha(self) -> float:
        value = (self.successes + self.prior * self.prior_weight) / (self.trials + self.prior_weight)
        return min(1.0, max(0.0, value))


@dataclass
class StepTimeModel:
    """``T = a + b * x`` (``x``: tokens verified per step by the whole batch), fitted online.

    A ridge regression with forgetting: observations decay by ``decay`` each; the configured
    ``(a0, b0)`` act as ``prior_weight`` observations' worth of pull (at a spread of ``x_scale``
    tokens), so a history where ``x`` hardly varies keeps the configured slope.

    Example:
        >>> m = StepTimeModel(a0=0.02, b0=0.001)
        >>> m.params()
        (0.02, 0.001)
        >>> for x in (1, 8, 32, 64) * 20:
        ...     m.observe(x, 0.01 + 0.002 * x)
        >>> a, b = m.params(); round(a, 2), round(b, 3)
        (0.01, 0.002)
    """

    a0: float
    b0: float
    prior_weight: float = 1.0
    x_scale: float = 16.0
    decay: float = 0.98
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, x, xx, y, xy
    _fit: tuple[float, float] | None = None

    def observe(self, x: float, seconds: float) -> None:
        if not (x > 0 and seconds > 0 and math.isfinite(seconds)):
            return
        s, d = self._sums, self.decay
        for i, v in enumerate((1.0, x, x * x, seconds, x * seconds)):
            s[i] = d * s[i] + v
        self._fit = None

    def params(self) -> tuple[float, float]:
        """``(a, b)``: seconds per step, and per verified token of the batch (``a > 0``, ``b >= 0``)."""
        if self._fit is None:
            n, sx, sxx, sy, sxy = self._sums
            wa = self.prior_weight
            wb = self.prior_weight * self.x_scale * self.x_scale
            m11, m12, m22 = n + wa, sx, sxx + wb
            r1, r2 = sy + wa * self.a0, sxy + wb * self.b0
            det = m11 * m22 - m12 * m12
            a, b = (r1 * m22 - m12 * r2) / det, (m11 * r2 - m12 * r1) / det
            self._fit = (max(a, 1e-3 * self.a0), max(b, 0.0))
        return self._fit


# -- the controller -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GoodputSettings:
    """Start values of the controller (see ``docs/gateway.md`` for their calibration)."""

    k_max: int = 0
    """Largest ``k`` sent; 0: the engine's ``num_speculative_tokens`` as its responses report it."""
    k_default: int = 4
    """Largest ``k`` while ``k_max`` is 0 and no response has reported the engine's yet."""
    step_base_s: float = 0.02
    """``a``: seconds of a decoding step that do not grow with the batch's tokens."""
    step_token_s: float = 0.0005
    """``b``: seconds per token verified by the batch in one step."""
    alpha_prior: float = 0.5
    """Acceptance assumed before a model's first responses."""
    probe_every: int = 64
    """After this many ``k = 0`` choices without fresh acceptance data, one request drafts 1."""


@dataclass(frozen=True)
class Decision:
    """What the controller chose for one request, and from what."""

    k: int
    alpha: float
    batch: float


@dataclass
class _ModelState:
    alpha: AcceptanceEstimate
    steps: StepTimeModel
    k_engine: int = 0
    zero_streak: int = 0


class GoodputController:
    """Chooses ``spec_k`` per request and learns from the responses, per model.

    Example:
        >>> c = GoodputController(GoodputSettings(alpha_prior=0.8))
        >>> c.choose("m", batch=8).k, c.choose("m", batch=500).k
        (4, 0)
        >>> c.observe("m", SpecStats(accepted=0, drafted=400, steps=100, spec_tokens=4,
        ...                          mean_acceptance_length=1.0, histogram=(100, 0, 0, 0, 0)))
        >>> round(c.alpha("m"), 2), c.choose("m", batch=8).k
        (0.06, 0)
    """

    def __init__(self, settings: GoodputSettings | None = None) -> None:
        self.settings = settings or GoodputSettings()
        self._models: dict[str, _ModelState] = {}

    def _state(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            s = self.settings
            state = self._models[model] = _ModelState(
                AcceptanceEstimate(prior=s.alpha_prior), StepTimeModel(s.step_base_s, s.step_token_s))
        return state

    def k_max(self, model: str) -> int:
        """The largest ``k`` for ``model``: configured, else the engine's, else ``k_default``."""
        if self.settings.k_max:
            return self.settings.k_max
        return self._state(model).k_engine or self.settings.k_default

    def alpha(self, model: str) -> float:
        return self._state(model).alpha.alpha

    def step_params(self, model: str) -> tuple[float, float]:
        return self._state(model).steps.params()

    def choose(self, model: str, batch: float) -> Decision:
        """The ``k`` of highest goodput for a request joining a batch of ``batch`` requests."""
        state = self._state(model)
        alpha = state.alpha.alpha
        a, b = state.steps.params()
        k = best_k(alpha, max(1.0, batch), a, b, self.k_max(model))
        if k == 0 and self.settings.probe_every:
            state.zero_streak += 1
            if state.zero_streak >= self.settings.probe_every:
                state.zero_streak = 0
                k = 1  # keeps alpha fresh when it alone holds k at 0
        return Decision(k, alpha, batch)

    def observe(self, model: str, stats: SpecStats, *, batch: float = 0.0,
                decode_s: float | None = None, decode_steps: int = 0) -> None:
        """Learn from one response: acceptance, the engine's ``k``, and (if timed) the step time.

        ``decode_s`` over ``decode_steps`` is the time per decoding step the request saw while
        sharing the engine with about ``batch`` requests.
        """
        state = self._state(model)
        if stats.spec_tokens > 0:
            state.k_engine = stats.spec_tokens
        successes, trials = stats.trials()
        if trials > 0:
            state.alpha.observe(successes, trials)
            state.zero_streak = 0
        if decode_s is not None and decode_steps > 0 and batch > 0:
            k_mean = stats.drafted / stats.steps if stats.steps else 0.0
            state.steps.observe(batch * (k_mean + 1.0), decode_s / decode_steps)


def decode_steps(completion_tokens: int | None, stats: SpecStats) -> int:
    """Decoding steps after the first token: each yields one token plus its accepted drafts.

    Example:
        >>> decode_steps(33, SpecStats(accepted=16, drafted=32, steps=8, spec_tokens=4,
        ...                            mean_acceptance_length=3.0))
        16
        >>> decode_steps(None, SpecStats(0, 0, 0, 4, 1.0))
        0
    """
    if not completion_tokens:
        return 0
    return max(0, completion_tokens - 1 - stats.accepted)


__all__ = [
    "SPEC_POLICIES", "AcceptanceEstimate", "Decision", "GoodputController", "GoodputSettings",
    "SpecPolicy", "SpecStats", "StepTimeModel", "best_k", "decode_steps", "expected_tokens",
    "goodput", "step_time",
]
