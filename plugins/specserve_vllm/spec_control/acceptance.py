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

Each class also keeps a long-run rate (decay :data:`LONG_DECAY` per row: thousands of rows).
While a class is not observed (speculation off, and a drafter without hindsight), its recent
rate reverts toward the long-run one (:meth:`AcceptanceModel.revert`), as the estimate of a
mean-reverting quantity does between measurements: a dip that turned speculation off would
otherwise stay the estimate until a probe, since nothing is measured while off.

    >>> m = AcceptanceModel(prior=[0.5], weight=1.0, global_weight=10.0, global_decay=0.9)
    >>> for _ in range(100): m.observe("a", 1, 1)
    >>> for _ in range(10): m.observe("a", 1, 0)      # a bad stretch: the recent rate falls
    >>> m.assign(["b"], [0]); round(float(m.conditional(["b"])[0, 0]), 2), m.long_rates()[0].round(2).tolist()
    (0.35, [0.87])
    >>> m.revert(0.5); round(float(m.conditional(["b"])[0, 0]), 2)   # observed since the last call: kept
    0.35
    >>> m.revert(0.5); round(float(m.conditional(["b"])[0, 0]), 2)   # not observed: halfway back
    0.61
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from specserve_vllm.tree.step import GREEDY_EPS


SAMPLING_CLASSES: tuple[str, ...] = ("greedy", "le_0.5", "le_1", "gt_1")
"""Sampling classes by temperature: greedy, ``0 < t <= 0.5``, ``0.5 < t <= 1``, ``t > 1``."""

REQUEST_PRIOR_WEIGHT = 12.0
"""The engine-wide rate's weight in a request's estimate, in trials (``w`` above). A request's
first verifications say little about its later ones: on the demo model, greedy Token Recycling
requests whose first 4 drafts all failed went on to accept 67% of first drafts, more than the
rest. Acceptance rises as a request goes on (its first 4 verifications: 36% at the first
position, the 4 after: 49%, later: 62-70%). At weight 4, four early misses put a request at
half the engine-wide rate and turned it off for most of a short request
(docs/speculation-control.md, "One engine per arm, a request's first drafts")."""

LONG_DECAY = 0.9995
"""Per row, the decay of a class's long-run counts (a memory of about 2,000 rows), toward which
its recent rate (decay 0.995 a row) reverts while the class is not observed."""

REVERT = 0.98
"""Per step a class is not observed, the share of its distance to the long-run rate its recent
rate keeps (:meth:`AcceptanceModel.revert`): half the way back in about 35 steps, a few times
the recent rate's own memory under load (0.995 a row: about 12 steps of 16 rows)."""


def sampling_class(temperature: float) -> int:
    """The index in :data:`SAMPLING_CLASSES` of a request sampled at ``temperature``.

    >>> [SAMPLING_CLASSES[sampling_class(t)] for t in (0.0, 0.3, 0.7, 1.0, 1.5)]
    ['greedy', 'le_0.5', 'le_1', 'le_1', 'gt_1']
    """
    t = float(temperature)
    if t < GREEDY_EPS:
        return 0
    return 1 if t <= 0.5 else 2 if t <= 1.0 else 3


def decay_exponents(slots: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """For rows taken in order, row ``i`` belonging to ``slots[i]``: ``(after, own, rows)``, how
    many later rows share row ``i``'s slot (the decay its evidence takes after it), the distinct
    slots, and each one's number of rows (the decay its earlier counts take). Folding rows at
    once with these exponents gives the counts of folding them one by one.

    >>> decay_exponents([3, 5, 3, 3])
    ([2, 0, 1, 0], [3, 5], [3, 1])
    """
    later: dict[int, int] = {}
    after = [0] * len(slots)
    for i in range(len(slots) - 1, -1, -1):
        after[i] = later.get(slots[i], 0)
        later[slots[i]] = after[i] + 1
    own = list(later)
    return after, own, [later[s] for s in own]


class AcceptanceModel:
    """Decayed per-position success counts, per request and engine-wide per sampling class.

    Requests' counts live in dense ``[slots, k]`` arrays (a slot per request, reused when it
    leaves), so a step's verifications and a decision's survival are a few array operations
    whatever the batch size. Slot 0 is never given out: it holds no evidence, in the greedy
    class, and stands for requests the model has not seen.
    """

    def __init__(self, prior: Sequence[float], weight: float = REQUEST_PRIOR_WEIGHT, request_decay: float = 0.9,
                 global_decay: float = 0.995, global_weight: float = 50.0,
                 class_priors: Mapping[int, Sequence[float]] | None = None, long_decay: float = LONG_DECAY) -> None:
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
        self.long_decay = long_decay
        self._g = np.stack([priors * global_weight, np.full_like(priors, global_weight)], axis=1)
        """``[C, 2, k]`` engine-wide decayed (successes, trials) per class and position."""
        self._long = self._g.copy()
        """``[C, 2, k]`` the same with :attr:`long_decay`: each class's long-run rate."""
        self._fresh = np.zeros(len(SAMPLING_CLASSES), dtype=bool)
        """Classes observed since the last :meth:`revert`."""
        self._g_seen = np.zeros(len(SAMPLING_CLASSES), dtype=bool)
        self._rates = priors.copy()  # [C, k]: _g's successes / trials, see _current_rates
        self._rates_stale = False
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        self._counts = np.zeros((16, 2, self.k))
        """``[slots, 2, k]`` each request's decayed (successes, trials) per position."""
        self._cls: list[int] = [0] * 16
        """Each slot's sampling class."""
        self._used = 1  # slots 1 .. _used - 1 were given out at some point
        self._weights: dict[int, np.ndarray] = {}
        first = np.tri(self.k + 1, self.k, -1)  # [k + 1, k]: row t is 1 at positions < t
        self._adds = np.stack(np.broadcast_arrays(first[:, None], first[None, :]), axis=2)
        """``[a, t] -> [2, k]``: what a verification that accepted ``a`` and tested ``t``
        positions adds to (successes, trials)."""

    def _slots(self, req_ids: Sequence[str], classes: Sequence[int] | None = None) -> list[int]:
        """Each request's slot, allocating one (in its class, default greedy) when new."""
        out = []
        slot = self._slot
        for i, r in enumerate(req_ids):
            s = slot.get(r)
            if s is None:
                s = slot[r] = self._new_slot(0 if classes is None else int(classes[i]))
            out.append(s)
        return out

    def _new_slot(self, cls: int) -> int:
        if self._free:
            s = self._free.pop()
        else:
            if self._used == len(self._cls):
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
                self._cls += [0] * len(self._cls)
            s, self._used = self._used, self._used + 1
        self._counts[s] = 0.0
        self._cls[s] = cls
        return s

    def assign(self, req_ids: Sequence[str], classes: Sequence[int]) -> None:
        """Put requests not seen before in their sampling class (default: greedy)."""
        self._slots(req_ids, classes)

    def observe(self, req_id: str, drafted: int, accepted: int) -> None:
        """One verification of ``drafted`` drafts of which the first ``accepted`` held."""
        self.observe_rows([req_id], np.array([drafted]), np.array([accepted]))

    def observe_rows(self, req_ids: Sequence[str], drafted: Sequence[int], accepted: Sequence[int]) -> None:
        """Verifications in order: row ``i`` verified ``drafted[i]`` drafts of which the first
        ``accepted[i]`` held. The same as observing the rows one by one: a request's counts
        decay once per row of its own (rows of several steps may repeat a request), the
        engine-wide counts of a class once per row of the class. A dozen array operations
        whatever the number of rows, so several steps folded at once cost about one."""
        d = np.minimum(np.asarray(drafted, dtype=np.int64), self.k)
        a = np.minimum(np.asarray(accepted, dtype=np.int64), d)
        tested = d > 0  # a row that tested nothing teaches nothing
        if not tested.all():
            keep = np.flatnonzero(tested)
            req_ids = [req_ids[i] for i in keep.tolist()]
            d, a = d[keep], a[keep]
        if not len(d):
            return
        slots = self._slots(req_ids)
        add = self._adds[a, np.minimum(a + 1, d)]  # [m, 2, k]
        if len(set(slots)) == len(slots):  # one step: each request once
            counts = self._counts[slots]
            counts *= self.request_decay
            counts += add
            self._counts[slots] = counts
        else:  # row i decays once for each later row of its request, the counts once per row
            after, own, rows = decay_exponents(slots)
            self._counts[own] *= (self.request_decay ** np.array(rows, dtype=np.float64))[:, None, None]
            np.add.at(self._counts, slots, add * (self.request_decay ** np.array(after, dtype=np.float64))[:, None, None])
        classes = [self._cls[s] for s in slots]
        if classes.count(classes[0]) == len(classes):  # the usual case: one class
            groups: list[tuple[int, np.ndarray]] = [(classes[0], add)]
        else:
            groups = [(c, add[[i for i, x in enumerate(classes) if x == c]]) for c in set(classes)]
        for c, rows in groups:  # row i decays once for each row of its class after it
            m = len(rows)
            g_add = rows[0] if m == 1 else (self._decay_weights(m) @ rows.reshape(m, -1)).reshape(rows.shape[1:])
            g = self._g[c]
            g *= self.global_decay ** m
            g += g_add
            long = self._long[c]  # a memory of thousands of rows: the order within a fold is moot
            long *= self.long_decay ** m
            long += rows.sum(axis=0)
            self._g_seen[c] = self._fresh[c] = True
        self._rates_stale = True

    def observe_first(self, req_ids: Sequence[str], probability: Sequence[float],
                      classes: Sequence[int] | None = None) -> None:
        """Hindsight rows in order (:mod:`specserve_vllm.drafters.hindsight`): row ``i``'s first
        draft would have been accepted with ``probability[i]``. Each is one trial at the first
        position only, counted and decayed there as a verification's would be (a request's
        count once per row of its own, its class's once per row of the class); deeper positions
        are untouched. ``classes``: the rows' sampling classes (default: their requests').
        Only requests the model already holds get their own counts: rows of a request that
        finished (or was not planned yet) still count for their class, and never give it a
        slot that nothing would free.

        >>> m = AcceptanceModel(prior=[0.5, 0.5], weight=1.0, global_weight=1.0)
        >>> m.assign(["a"], [2])
        >>> m.observe_first(["a", "a", "gone"], [0.2, 0.2, 0.2], classes=[2, 2, 2])
        >>> m.conditional(["a"]).round(2).tolist()   # the first position learnt, the second not
        [[0.23, 0.5]]
        >>> "gone" in m._slot
        False
        """
        p = np.asarray(probability, dtype=np.float64)
        if not len(p):
            return
        known = [(i, s) for i, s in enumerate(map(self._slot.get, req_ids)) if s is not None]
        if known:
            slots = [s for _, s in known]
            after, own, rows = decay_exponents(slots)
            self._counts[own, :, 0] *= (self.request_decay ** np.array(rows, dtype=np.float64))[:, None]
            weights = self.request_decay ** np.array(after, dtype=np.float64)
            first = self._counts[:, :, 0]  # [slots, 2], a view
            np.add.at(first, (slots, 0), weights * p[[i for i, _ in known]])
            np.add.at(first, (slots, 1), weights)
        if classes is None:
            classes = [self._cls[self._slot.get(r, 0)] for r in req_ids]
        row_classes = np.asarray(classes, dtype=np.int64)
        for c in np.unique(row_classes).tolist():
            rows = np.flatnonzero(row_classes == c)
            w = self._decay_weights(len(rows))
            g = self._g[c, :, 0]  # [2], a view
            g *= self.global_decay ** len(rows)
            g[0] += float(w @ p[rows])
            g[1] += float(w.sum())
            long = self._long[c, :, 0]
            long *= self.long_decay ** len(rows)
            long[0] += float(p[rows].sum())
            long[1] += len(rows)
            self._g_seen[c] = self._fresh[c] = True
        self._rates_stale = True

    def _decay_weights(self, m: int) -> np.ndarray:
        """``[m]``: ``global_decay ** (m - 1 - i)``, what row ``i`` of ``m`` keeps (cached up to 256)."""
        w = self._weights.get(m)
        if w is None:
            w = self.global_decay ** np.arange(m - 1, -1, -1, dtype=np.float64)
            if m <= 256:
                self._weights[m] = w
        return w

    def _current_rates(self) -> np.ndarray:
        """``[C, k]`` the engine-wide rates, recomputed when a verification changed them."""
        if self._rates_stale:
            self._rates = self._g[:, 0] / np.maximum(self._g[:, 1], 1e-9)
            self._rates_stale = False
        return self._rates

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
        slots = [s for s in map(self._slot.get, req_ids) if s is not None]
        if slots:
            self._counts[slots] *= factor

    def revert(self, factor: float) -> None:
        """Move each class not observed since the last call toward its long-run rate, keeping
        ``factor`` of the distance (``factor = r ** steps``: the steps since the last call, ``r``
        the reversion a step). The recent counts keep their weight: only their rate moves.

        >>> m = AcceptanceModel(prior=[0.5], global_weight=4.0, global_decay=0.5)
        >>> m.assign(["a"], [0]); m.observe("a", 1, 1); m.revert(0.0)   # observed: kept
        >>> round(float(m.class_rates()[0, 0]), 3), round(float(m.long_rates()[0, 0]), 3)
        (0.667, 0.6)
        >>> m.revert(0.0); round(float(m.class_rates()[0, 0]), 3)     # not since: the long-run rate
        0.6
        """
        stale = ~self._fresh
        self._fresh[:] = False
        if factor >= 1.0 or not stale.any():
            return
        g = self._g[stale]  # [c, 2, k]
        target = self.long_rates()[stale] * g[:, 1]
        g[:, 0] = factor * g[:, 0] + (1.0 - factor) * target
        self._g[stale] = g
        self._rates_stale = True

    def long_rates(self) -> np.ndarray:
        """``[C, k]`` each class's long-run conditional acceptance per position."""
        return self._long[:, 0] / np.maximum(self._long[:, 1], 1e-9)

    def class_rates(self) -> np.ndarray:
        """``[C, k]`` engine-wide conditional acceptance per sampling class and position."""
        return self._current_rates().copy()

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
        succ, trials = self._g[seen].sum(axis=0)
        return succ / np.maximum(trials, 1e-9)

    def conditional(self, req_ids: Sequence[str]) -> np.ndarray:
        """``[n, k]`` conditional acceptance per request and position."""
        slots = [self._slot.get(r, 0) for r in req_ids]  # slot 0: no evidence, greedy
        counts = self._counts[slots]  # [n, 2, k]
        rates = self._current_rates()[[self._cls[s] for s in slots]]
        return (counts[:, 0] + self.weight * rates) / (counts[:, 1] + self.weight)

    def survival(self, req_ids: Sequence[str]) -> np.ndarray:
        """``[n, k]`` probability that each draft position is committed."""
        return np.cumprod(self.conditional(req_ids), axis=1)

    def forget(self, req_ids: Iterable[str]) -> None:
        for r in req_ids:
            s = self._slot.pop(r, None)
            if s is not None:
                self._free.append(s)
