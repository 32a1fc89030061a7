"""Hindsight drafts: what a chain draft would have scored on steps that drafted nothing.

While the goodput controller keeps speculation off, nothing is verified, so it learns nothing
about the drafter: its acceptance estimate stays where it was when it switched off (or at the
calibration's prior, for a workload that started off). A Token Recycling chain's first draft is
a lookup, ``M[x]`` for the last token ``x``, and the step that ran anyway computed the target's
logits after ``x``. So the chance that draft would have been accepted is known exactly, for
free apart from a softmax:

* greedy: 1 when the draft is the target's argmax, else 0 (what verification does);
* temperature ``T``: ``softmax(logits / T)[draft]``, the probability that verification accepts a
  deterministic draft (sampling the target's token and comparing, or vLLM's rejection test
  against a one-hot draft distribution: both accept with that probability).

These are expectations, not Bernoulli outcomes, so a few dozen steps pin the first position's
rate down better than as many verified drafts. Requests with ``top_p``, ``top_k`` or penalties
are skipped (the sampler reshapes their distribution; no rows is better than biased rows).

    >>> tokens = np.array([5, 7, 5])
    >>> best = np.array([1, 2, 3])             # the target's argmax after each row's token
    >>> column = np.array([0, 0, 0, 0, 0, 1, 0, -1])   # the matrix's candidate per token
    >>> drafts_before(tokens, best, column).tolist()   # row 2 sees row 0's update of token 5
    [1, -1, 1]
    >>> logits = np.log(np.array([[0.1, 0.6, 0.3, 0.0], [0.5, 0.2, 0.3, 0.0], [0.2, 0.5, 0.0, 0.3]]) + 1e-12)
    >>> acceptance_probability(logits, np.array([1, -1, 1]), np.array([0.0, 1.0, 1.0])).round(2).tolist()
    [1.0, nan, 0.5]

Pure (numpy only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (vLLM stores greedy requests' temperature as 0)."""


@dataclass(frozen=True)
class HindsightRows:
    """The requests behind a no-draft step's logits rows, in row order."""

    req_ids: tuple[str, ...]
    temperatures: np.ndarray
    """``[n]`` each row's temperature; NaN for rows that give no evidence (see the module)."""


def drafts_before(tokens: np.ndarray, best: np.ndarray, column: np.ndarray,
                  steps: np.ndarray | None = None) -> np.ndarray:
    """``[m]``: the chain draft each row's input token had when its step was drafted for.

    Rows are in the order they were learnt, ``steps[i]`` the step of row ``i`` (non-decreasing;
    default: a step per row). A token's draft is the target's best candidate (``best``) at its
    last row in an earlier step (the last of that step's rows with the token: the one learnt),
    or, with none, the matrix ``column`` as it was before any of the rows (``-1``: no draft).
    Rows of one step do not see each other: the drafts were made before the step ran. Tokens
    outside the column: ``-1``.

    >>> drafts_before(np.array([4, 4, 4]), np.array([1, 2, 3]), np.array([0, 0, 0, 0, 9]),
    ...               steps=np.array([0, 0, 1])).tolist()
    [9, 9, 2]
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    best = np.asarray(best, dtype=np.int64)
    m = len(tokens)
    out = np.full(m, -1, dtype=np.int64)
    if not m:
        return out
    steps = np.arange(m) if steps is None else np.asarray(steps, dtype=np.int64)
    inside = (tokens >= 0) & (tokens < len(column))
    out[inside] = column[tokens[inside]]
    order = np.lexsort((np.arange(m), tokens))  # by token, then by row (so by step)
    t, st = tokens[order], steps[order]
    new_group = np.ones(m, dtype=bool)  # where a (token, step) group starts, in sorted order
    new_group[1:] = (t[1:] != t[:-1]) | (st[1:] != st[:-1])
    starts = np.flatnonzero(new_group)
    group = np.cumsum(new_group) - 1  # each sorted position's group
    first = starts[group]  # the group's first sorted position
    seen = (first > 0) & (t[np.maximum(first - 1, 0)] == t)  # an earlier step had the token
    rows = np.flatnonzero(seen & inside[order])
    out[order[rows]] = best[order[first[rows] - 1]]  # the last row of the previous group
    return out


def acceptance_probability(logits: np.ndarray, drafts: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """``[m]``: the probability that verification accepts ``drafts[i]`` after row ``i``'s
    ``logits`` (``[m, vocab]``) at ``temperatures[i]``; NaN where there was no draft (``< 0``,
    or outside the logits) or no evidence (a NaN temperature)."""
    logits = np.asarray(logits)
    drafts = np.asarray(drafts, dtype=np.int64)
    temps = np.asarray(temperatures, dtype=np.float64)
    out = np.full(len(drafts), np.nan)
    valid = (drafts >= 0) & (drafts < logits.shape[-1]) & np.isfinite(temps)
    greedy = valid & (temps < GREEDY_BELOW)
    if greedy.any():
        rows = np.flatnonzero(greedy)
        out[rows] = (logits[rows].argmax(axis=-1) == drafts[rows]).astype(np.float64)
    sampled = np.flatnonzero(valid & ~greedy)
    if len(sampled):
        scaled = logits[sampled].astype(np.float64) / temps[sampled, None]
        scaled -= scaled.max(axis=-1, keepdims=True)
        np.exp(scaled, out=scaled)
        out[sampled] = scaled[np.arange(len(sampled)), drafts[sampled]] / scaled.sum(axis=-1)
    return out


def scored_rows(temperatures: np.ndarray, sampled_limit: int) -> np.ndarray:
    """The rows worth scoring: every row with evidence (a finite temperature) when greedy, and
    at most ``sampled_limit`` sampled ones, spread evenly and ending at the newest (each costs a
    softmax over the vocabulary; a few per decision pin the rate down well enough).

    >>> scored_rows(np.array([0.0, 0.7, 0.7, np.nan, 0.7, 0.0, 0.7]), 2).tolist()
    [0, 1, 5, 6]
    """
    temps = np.asarray(temperatures, dtype=np.float64)
    finite = np.isfinite(temps)
    greedy = np.flatnonzero(finite & (temps < GREEDY_BELOW))
    sampled = np.flatnonzero(finite & (temps >= GREEDY_BELOW))
    if len(sampled) > sampled_limit:
        sampled = sampled[np.unique(np.linspace(0, len(sampled) - 1, max(sampled_limit, 0)).round().astype(np.int64))]
    return np.union1d(greedy, sampled)


class HindsightTally:
    """Hindsight evidence not yet handed to the controller, oldest first (at most ``limit``
    rows: the oldest go first)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._parts: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, req_ids: list[str], temperatures: np.ndarray, probability: np.ndarray) -> None:
        """Rows with a finite ``probability`` are kept."""
        keep = np.flatnonzero(np.isfinite(probability))
        if not len(keep):
            return
        self._parts.append(([req_ids[i] for i in keep.tolist()], temperatures[keep], probability[keep]))
        self._rows += len(keep)
        while self._rows > self.limit and len(self._parts) > 1:
            self._rows -= len(self._parts.pop(0)[0])

    def take(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(req_ids, temperatures, probability)`` of every kept row, in order; empty after.

        >>> t = HindsightTally(); t.add(["a", "b"], np.array([0.7, 0.7]), np.array([0.4, np.nan]))
        >>> ids, temps, p = t.take(); ids, p.tolist(), len(t)
        (['a'], [0.4], 0)
        """
        parts, self._parts, self._rows = self._parts, [], 0
        if not parts:
            return [], np.zeros(0), np.zeros(0)
        return ([r for ids, _, _ in parts for r in ids], np.concatenate([t for _, t, _ in parts]),
                np.concatenate([p for _, _, p in parts]))
