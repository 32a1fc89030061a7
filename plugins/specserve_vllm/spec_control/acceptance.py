"""Per-request, per-position draft acceptance: a prior from the drafter, updated by each request.

A row that verified ``d`` drafts and accepted ``a`` of them (always a prefix) gives one trial at
each position ``1 .. min(a + 1, d)``: successes at ``1 .. a``, a failure at ``a + 1`` (positions
after the first rejection were not tested). ``p[i, j]`` is the conditional probability that
request ``i``'s draft at position ``j`` is accepted given the ones before it were:

    p[i, j] = (s[i, j] + w * q[j]) / (t[i, j] + w)

with ``s, t`` the request's decayed successes and trials at ``j``, ``q[j]`` the engine-wide rate
(decayed counts over all requests, itself starting from the drafter's prior) and ``w`` the
prior's weight in trials. The chance that draft ``j`` is committed is the survival
``g[i, j] = prod_{m <= j} p[i, m]``, and a row drafting ``k`` tokens commits ``1 + sum_{j<=k} g[i, j]``
tokens on average.

    >>> m = AcceptanceModel(prior=[0.5, 0.5], weight=2.0)
    >>> m.observe("a", drafted=2, accepted=2); m.observe("a", drafted=2, accepted=2)
    >>> m.survival(["a", "new"]).round(2).tolist()
    [[0.75, 0.57], [0.52, 0.27]]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class AcceptanceModel:
    """Decayed per-position success counts, per request and engine-wide."""

    def __init__(self, prior: Sequence[float], weight: float = 4.0, request_decay: float = 0.9,
                 global_decay: float = 0.995, global_weight: float = 50.0) -> None:
        self.k = len(prior)
        self.prior = np.clip(np.asarray(prior, dtype=np.float64), 0.01, 0.99)  # [k]
        self.weight = weight
        self.request_decay = request_decay
        self.global_decay = global_decay
        self._g_succ = self.prior * global_weight  # [k]
        self._g_trials = np.full(self.k, global_weight)  # [k]
        self._succ: dict[str, np.ndarray] = {}
        self._trials: dict[str, np.ndarray] = {}

    def observe(self, req_id: str, drafted: int, accepted: int) -> None:
        """One verification of ``drafted`` drafts of which the first ``accepted`` held."""
        drafted = min(int(drafted), self.k)
        accepted = min(int(accepted), drafted)
        tested = min(accepted + 1, drafted)
        if tested <= 0:
            return
        succ = self._succ.setdefault(req_id, np.zeros(self.k))
        trials = self._trials.setdefault(req_id, np.zeros(self.k))
        succ *= self.request_decay
        trials *= self.request_decay
        trials[:tested] += 1.0
        succ[:accepted] += 1.0
        self._g_succ *= self.global_decay
        self._g_trials *= self.global_decay
        self._g_trials[:tested] += 1.0
        self._g_succ[:accepted] += 1.0

    def age(self, req_ids: Iterable[str], factor: float) -> None:
        """Fade these requests' own evidence by ``factor`` (steps they decoded without drafting):
        their estimates drift back to the engine-wide rate, so a request that stopped
        speculating after an unlucky stretch is tried again while others still do well.

        >>> m = AcceptanceModel(prior=[0.8], weight=1.0)
        >>> m.observe("a", drafted=1, accepted=0); round(float(m.conditional(["a"])[0, 0]), 2)
        0.39
        >>> m.age(["a"], 0.1); round(float(m.conditional(["a"])[0, 0]), 2)
        0.71
        """
        for r in req_ids:
            if r in self._succ:
                self._succ[r] *= factor
                self._trials[r] *= factor

    def engine_rates(self) -> np.ndarray:
        """``[k]`` engine-wide conditional acceptance per position."""
        return self._g_succ / np.maximum(self._g_trials, 1e-9)

    def conditional(self, req_ids: Sequence[str]) -> np.ndarray:
        """``[n, k]`` conditional acceptance per request and position."""
        q = self.engine_rates()
        zeros = np.zeros(self.k)
        succ = np.stack([self._succ.get(r, zeros) for r in req_ids]) if req_ids else np.zeros((0, self.k))
        trials = np.stack([self._trials.get(r, zeros) for r in req_ids]) if req_ids else np.zeros((0, self.k))
        return (succ + self.weight * q) / (trials + self.weight)

    def survival(self, req_ids: Sequence[str]) -> np.ndarray:
        """``[n, k]`` probability that each draft position is committed."""
        return np.cumprod(self.conditional(req_ids), axis=1)

    def forget(self, req_ids: Iterable[str]) -> None:
        for r in req_ids:
            self._succ.pop(r, None)
            self._trials.pop(r, None)
