"""Counters of the per-step speculation plan, kept by the engine and read by tests and logs.

One :class:`PlanStats` per runner: how many steps were planned, how many ran with no
speculation at all, how often the drafter ran, the histogram of per-row draft lengths, and (for
the goodput policy) predicted against measured step time.

    >>> s = PlanStats()
    >>> s.record_plan([0, 0, 0]); s.record_plan([2, 0, 4])
    >>> s.steps, s.no_spec_steps, s.k_rows
    (2, 1, {0: 4, 2: 1, 4: 1})
    >>> s.by_batch["2-3"]
    {'plans': 2, 'rows': 6, 'drafts': 6, 'no_spec': 1}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

BATCH_BUCKETS: tuple[tuple[int, str], ...] = ((1, "1"), (3, "2-3"), (7, "4-7"), (15, "8-15"), (31, "16-31"))
"""Upper bound and label of each batch-size bucket the per-batch counters use (beyond: ``32+``)."""
_BUCKET_KEYS = ("plans", "rows", "drafts", "no_spec")


def batch_bucket(rows: int) -> str:
    """The label of the bucket of a plan with ``rows`` decode rows.

    >>> [batch_bucket(n) for n in (0, 1, 2, 5, 8, 31, 64)]
    ['0', '1', '2-3', '4-7', '8-15', '16-31', '32+']
    """
    if rows <= 0:
        return "0"
    return next((label for bound, label in BATCH_BUCKETS if rows <= bound), "32+")


@dataclass
class PlanStats:
    """Running totals since the engine started (plain ints: cheap, picklable)."""

    steps: int = 0
    """Plans made (one per step that drafted or could have)."""
    no_spec_steps: int = 0
    """Plans of all zeros: the next step runs without speculation."""
    drafter_calls: int = 0
    """Times the drafter's ``propose`` ran."""
    decode_rows: int = 0
    """Decode rows over all plans (mean batch = decode_rows / steps)."""
    k_rows: dict[int, int] = field(default_factory=dict)
    """Decode rows planned at each draft length."""
    by_batch: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per batch-size bucket (:func:`batch_bucket`): plans, decode rows, planned drafts, plans of
    all zeros. Mean k per row in a bucket = drafts / rows."""
    timed_steps: int = 0
    """Steps with both a prediction and a measurement."""
    abs_pct_error_sum: float = 0.0
    """Sum of |predicted - measured| / measured over timed steps (MAPE = sum / timed_steps)."""
    last_predicted_ms: float = 0.0
    last_measured_ms: float = 0.0
    position_trials: list[int] = field(default_factory=list)
    """Per draft position: verifications that tested it (every earlier draft was accepted)."""
    position_accepted: list[int] = field(default_factory=list)
    """Per draft position: of those, how many accepted it."""
    hindsight_rows: int = 0
    """Rows of steps without drafts whose would-be first draft was scored (``hindsight``)."""
    hindsight_accepted: float = 0.0
    """Their summed acceptance probability (mean = this / ``hindsight_rows``)."""

    def record_verified_rows(self, drafted: Sequence[int], accepted: Sequence[int]) -> None:
        """A step's verifications. A row that accepted ``a`` of ``d`` drafts tested positions
        ``1..min(a + 1, d)`` and had ``1..a`` accepted; counted as a histogram of the rows'
        tested and accepted counts, then suffix sums, in plain Python (a handful of numpy calls
        cost more than this at the batch sizes a step has).

        >>> s = PlanStats(); s.record_verified_rows([3, 3], [1, 3]); s.position_trials, s.position_accepted
        ([2, 2, 1], [2, 1, 1])
        """
        drafted = drafted.tolist() if hasattr(drafted, "tolist") else list(drafted)
        accepted = accepted.tolist() if hasattr(accepted, "tolist") else list(accepted)
        width = max(drafted, default=0)
        tested_n = [0] * (width + 1)  # rows that tested exactly t positions
        accepted_n = [0] * (width + 1)
        for d, a in zip(drafted, accepted):
            a = min(a, d)
            tested_n[min(a + 1, d)] += 1
            accepted_n[a] += 1
        while width and not tested_n[width]:
            width -= 1
        while len(self.position_trials) < width:
            self.position_trials.append(0)
            self.position_accepted.append(0)
        trials = hits = 0
        for j in range(width, 0, -1):  # position j - 1 was tested (accepted) by rows with more than j - 1
            trials += tested_n[j]
            hits += accepted_n[j]
            self.position_trials[j - 1] += trials
            self.position_accepted[j - 1] += hits

    def conditional_acceptance(self) -> list[float]:
        """Per position: accepted / tested (the rate given every earlier draft held).

        >>> s = PlanStats(); s.record_verified_rows([3, 3], [1, 3])
        >>> s.conditional_acceptance()
        [1.0, 0.5, 1.0]
        """
        return [round(a / t, 4) if t else 0.0 for a, t in zip(self.position_accepted, self.position_trials)]

    def record_plan(self, decode_plan: Iterable[int]) -> None:
        """Count one plan, given the lengths of its decode rows (rows that could draft)."""
        lengths = [int(k) for k in decode_plan]
        self.steps += 1
        self.decode_rows += len(lengths)
        if not any(lengths):
            self.no_spec_steps += 1
        for k in lengths:
            self.k_rows[k] = self.k_rows.get(k, 0) + 1
        bucket = self.by_batch.setdefault(batch_bucket(len(lengths)), dict.fromkeys(_BUCKET_KEYS, 0))
        bucket["plans"] += 1
        bucket["rows"] += len(lengths)
        bucket["drafts"] += sum(lengths)
        bucket["no_spec"] += int(not any(lengths))

    def record_time(self, predicted_ms: float, measured_ms: float) -> None:
        self.last_predicted_ms, self.last_measured_ms = predicted_ms, measured_ms
        if measured_ms > 0 and predicted_ms > 0:
            self.timed_steps += 1
            self.abs_pct_error_sum += abs(predicted_ms - measured_ms) / measured_ms

    @property
    def mape(self) -> float | None:
        """Mean absolute percentage error of the step-time prediction (None before any)."""
        return self.abs_pct_error_sum / self.timed_steps if self.timed_steps else None

    def snapshot(self) -> dict[str, Any]:
        out = asdict(self)
        out["mape"] = self.mape
        out["conditional_acceptance"] = self.conditional_acceptance()
        return out
