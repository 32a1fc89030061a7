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

The engine-wide rate is kept per *sampling class* (:data:`SAMPLING_CLASSES`, from the request's
temperature): a drafter's acceptance at temperature 0.7 is a fraction of its greedy one (Hydra's
first draft: 0.30 against 0.57 on the demo model), so one rate for a mixed workload would
under-price greedy requests and over-price sampled ones. A request is put in its class when
first planned (:meth:`AcceptanceModel.assign`); a new request starts from its class's rate:

    >>> m = AcceptanceModel(prior=[0.6], weight=1.0, global_weight=1.0)
    >>> m.assign(["g", "s"], [0, sampling_class(0.7)])
    >>> for _ in range(20): m.observe("g", 1, 1); m.observe("s", 1, 0)
    >>> m.assign(["g2", "s2"], [0, sampling_class(0.8)])
    >>> m.conditional(["g2", "s2"]).round(2).ravel().tolist()
    [0.98, 0.03]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from specserve_vllm.tree.step import GREEDY_EPS


SAMPLING_CLASSES: tuple[str, ...] = ("greedy", "le_0.5", "le_1", "gt_1")
"""Sampling classes by temperature: greedy, ``0 < t <= 0.5``, ``0.5 < t <= 1``, ``t > 1``."""

def sampling_class(temperature: float) -> int:
    """The index in :data:`SAMPLING_CLASSES` of a request sampled at ``temperature``.

    >>> [SAMPLING_CLASSES[sampling_class(t)] for t in (0.0, 0.3, 0.7, 1.0, 1.5)]
    ['greedy', 'le_0.5', 'le_1', 'le_1', 'gt_1']
    """
    t = float(temperature)
    if t < GREEDY_EPS:
        return 0
    return 1 if t <= 0.5 else 2 if t <= 1.0 else 3


class AcceptanceModel:
    """Decayed per-position success counts, per request and engine-wide per sampling class."""

    def __init__(self, prior: Sequence[float], weight: float = 4.0, request_decay: float = 0.9,
                 global_decay: float = 0.995, global_weight: float = 50.0,
                 class_priors: Mapping[int, Sequence[float]] | None = None) -> None:
        self.k = len(prior)
        self.prior = np.clip(np.asarray(prior, dtype=np.float64), 0.01, 0.99)  # [k]
        priors = np.tile(self.prior, (len(SAMPLING_CLASSES), 1))  # [C, k]
        for c, p in (class_priors or {}).items():
            row = list(p)[: self.k]
            row += [row[-1] if row else float(self.prior[-1])] * (self.k - len(row))
            priors[c] = np.clip(np.asarray(row, dtype=np.float64), 0.01, 0.99)
        self.weight = weight
        self.request_decay = request_decay
        self.global_decay = global_decay
        self._g_succ = priors * global_weight  # [C, k]
        self._g_trials = np.full_like(priors, global_weight)  # [C, k]
        self._g_seen = np.zeros(len(SAMPLING_CLASSES), dtype=bool)
        self._class: dict[str, int] = {}
        self._succ: dict[str, np.ndarray] = {}
        self._trials: dict[str, np.ndarray] = {}

    def assign(self, req_ids: Sequence[str], classes: Sequence[int]) -> None:
        """Put requests not seen before in their sampling class (default: greedy)."""
        known = self._class
        for r, c in zip(req_ids, classes):
            if r not in known:
                known[r] = int(c)

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
        c = self._class.get(req_id, 0)
        g_succ, g_trials = self._g_succ[c], self._g_trials[c]
        g_succ *= self.global_decay
        g_trials *= self.global_decay
        g_trials[:tested] += 1.0
        g_succ[:accepted] += 1.0
        self._g_seen[c] = True

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

    def class_rates(self) -> np.ndarray:
        """``[C, k]`` engine-wide conditional acceptance per sampling class and position."""
        return self._g_succ / np.maximum(self._g_trials, 1e-9)

    def seen_classes(self) -> list[int]:
        """The sampling classes some verification has been observed in."""
        return [int(c) for c in np.flatnonzero(self._g_seen)]

    def engine_rates(self) -> np.ndarray:
        """``[k]`` engine-wide conditional acceptance per position, over the classes this
        engine has verified drafts in (greedy's prior before any).

        >>> m = AcceptanceModel(prior=[0.5], global_weight=1.0)
        >>> m.assign(["s"], [2]); m.observe("s", 1, 1)
        >>> m.engine_rates().round(2).tolist()
        [0.75]
        """
        seen = self._g_seen if self._g_seen.any() else [0]
        return self._g_succ[seen].sum(axis=0) / np.maximum(self._g_trials[seen].sum(axis=0), 1e-9)

    def conditional(self, req_ids: Sequence[str]) -> np.ndarray:
        """``[n, k]`` conditional acceptance per request and position."""
        if not req_ids:
            return np.zeros((0, self.k))
        rates = self.class_rates()
        q = rates[[self._class.get(r, 0) for r in req_ids]]  # [n, k]
        zeros = np.zeros(self.k)
        succ = np.stack([self._succ.get(r, zeros) for r in req_ids])
        trials = np.stack([self._trials.get(r, zeros) for r in req_ids])
        return (succ + self.weight * q) / (trials + self.weight)

    def survival(self, req_ids: Sequence[str]) -> np.ndarray:
        """``[n, k]`` probability that each draft position is committed."""
        return np.cumprod(self.conditional(req_ids), axis=1)

    def forget(self, req_ids: Iterable[str]) -> None:
        for r in req_ids:
            self._succ.pop(r, None)
            self._trials.pop(r, None)
            self._class.pop(r, None)
