"""Small statistics for benchmark reports: confidence intervals, ratios paired by repetition, the
'within tolerance of the best' verdict, and the looping-output test (the demo model repeats itself on many prompts, which
flatters greedy drafting; reports give the share of such outputs beside the speedups)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half width of its 95% confidence interval)``; the width is 0 for one value.

    Example:
        >>> mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: 4.303 / sqrt(3)
        (2.0, 2.484338)
        >>> mean_ci([5.0])
        (5.0, 0.0)
    """
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return mean, round(t * statistics.stdev(values) / math.sqrt(len(values)), 6)


def paired(values: Sequence[float], bases: Sequence[float]) -> dict[str, float] | None:
    """Median, min and max over repetitions of ``values[r] / bases[r]`` (repetitions without a
    base left out); None when none is left.

    >>> paired([95.0, 80.0, 90.0], [100.0, 80.0, 100.0])
    {'median': 0.95, 'min': 0.9, 'max': 1.0}
    """
    ratios = [v / b for v, b in zip(values, bases) if b]
    if not ratios:
        return None
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3)}


def best_and_verdict(points: Mapping[str, tuple[float, float]], arm: str, *, tolerance: float = 0.03,
                     lower_is_better: bool = True) -> dict[str, object]:
    """Whether ``arm`` is within ``tolerance`` (or the CI, whichever is larger) of the best arm.

    ``points`` maps each arm to ``(mean, ci half width)``. The allowed gap is the larger of
    ``tolerance`` x best and the two arms' CI half widths combined (root of the sum of squares).

    Example:
        >>> best_and_verdict({"none": (1.0, 0.0), "k4": (1.5, 0.0), "goodput": (1.02, 0.0)}, "goodput")
        {'best': 'none', 'ratio': 1.02, 'within': True, 'better_than_fixed': False}
        >>> best_and_verdict({"none": (1.0, 0.01), "goodput": (1.2, 0.01)}, "goodput")["within"]
        False
        >>> best_and_verdict({"none": (10.0, 0), "k2": (12.0, 0), "goodput": (13.0, 0)}, "goodput",
        ...                  lower_is_better=False)["better_than_fixed"]
        True
    """
    pick = min if lower_is_better else max
    best = pick(points, key=lambda a: points[a][0])
    mean, ci = points[arm]
    best_mean, best_ci = points[best]
    gap = (mean - best_mean) if lower_is_better else (best_mean - mean)
    allowed = max(tolerance * abs(best_mean), math.hypot(ci, best_ci))
    fixed = [points[a][0] for a in points if a != arm]
    better = bool(fixed) and all((mean < f) if lower_is_better else (mean > f) for f in fixed)
    return {"best": best, "ratio": round(mean / best_mean, 4) if best_mean else None,
            "within": gap <= allowed, "better_than_fixed": better}


def paired_verdict(runs: Mapping[str, Sequence[float]], arm: str, *, tolerance: float = 0.03,
                   lower_is_better: bool = True) -> dict[str, object] | None:
    """How much ``arm`` trails the best other arm, from ratios paired by repetition.

    ``runs[a][r]`` is arm ``a``'s value in repetition ``r`` (the arms of one repetition ran back
    to back, so a slow spell of the machine hits them alike and cancels in the ratio). The best
    arm is the one with the best mean; ``slowdown`` is the geometric mean over repetitions of
    ``arm / best`` (latency) or ``best / arm`` (throughput), so above 1 is worse, with its 95%
    interval from the log ratios. ``verdict``: ``within`` when the whole interval is at or under
    ``1 + tolerance`` (shown to be within it), ``beyond`` when the whole interval is above it
    (shown to trail by more), ``undecided`` otherwise (or with one repetition). None when
    ``arm`` is the only arm or missing.

    Example:
        >>> paired_verdict({"none": [10, 20, 30], "goodput": [10.1, 20.1, 30.3]}, "goodput")
        {'best': 'none', 'slowdown': 1.0083, 'low': 1.0012, 'high': 1.0155, 'verdict': 'within'}
        >>> paired_verdict({"k4": [10, 20], "goodput": [12, 24]}, "goodput")["verdict"]
        'beyond'
        >>> paired_verdict({"k4": [100, 90], "goodput": [101, 91]}, "goodput", lower_is_better=False)["best"]
        'goodput'
    """
    if arm not in runs or len(runs) < 2:
        return None
    n = min(len(v) for v in runs.values())
    if n == 0:
        return None
    means = {a: statistics.fmean(v[:n]) for a, v in runs.items()}
    best = (min if lower_is_better else max)(means, key=lambda a: means[a])
    if best == arm:  # the best arm trails nobody
        return {"best": arm, "slowdown": 1.0, "low": 1.0, "high": 1.0, "verdict": "within"}
    pairs = zip(runs[arm][:n], runs[best][:n])
    logs = [math.log(max((x / b) if lower_is_better else (b / x), 1e-12)) for x, b in pairs]
    mean, ci = mean_ci(logs)
    low, high = math.exp(mean - ci), math.exp(mean + ci)
    limit = 1.0 + tolerance
    verdict = "undecided" if n < 2 else "within" if high <= limit else "beyond" if low > limit else "undecided"
    return {"best": best, "slowdown": round(math.exp(mean), 4), "low": round(low, 4), "high": round(high, 4),
            "verdict": verdict}


def is_looping(tokens: Sequence[int], *, max_period: int = 16, min_tokens: int = 16) -> bool:
    """Whether an output ends in a loop: its second half repeats with a period of at most
    ``max_period`` tokens ("the the the ...", or a repeated line). Outputs shorter than
    ``min_tokens`` are not judged.

    Example:
        >>> is_looping([5, 6, 7, 8] + [1, 2, 3] * 8)
        True
        >>> is_looping(list(range(40)))
        False
        >>> is_looping([1, 1, 1])  # too short to say
        False
    """
    n = len(tokens)
    if n < min_tokens:
        return False
    start = n // 2
    for period in range(1, min(max_period, n - start) + 1):
        if all(tokens[i] == tokens[i - period] for i in range(start, n)):
            return True
    return False


__all__ = ["best_and_verdict", "is_looping", "mean_ci", "paired_verdict"]
