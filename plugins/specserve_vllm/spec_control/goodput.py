"""SmartSpec-style goodput control of draft lengths, decided per step for the whole batch.

Before each step, for the ``B`` decode rows (prefill chunks are not decode rows), each draft
slot ``(i, j)`` (row ``i``, position ``j <= cap_i``) is worth its survival probability
``g[i, j]`` (:mod:`~specserve_vllm.spec_control.acceptance`). Taking the ``n`` best slots, the
step commits ``B + sum of their g`` tokens on average and costs

    T(n) = step(rows, tokens = B + n + prefill, spec = n > 0) + draft(n, depth(n))

(``prefill``: the prompt tokens chunked prefills in the batch will schedule next step, the step
that verifies the drafts; a prompt prefilled whole this step is not in it.)

(:mod:`~specserve_vllm.spec_control.step_time`; ``depth(n)``: the deepest position among the
``n`` slots, which a drafter with one call per position pays once whatever the rows), so
``n = 0`` is priced as the real non-speculative step: no spec path, no drafting. The plan is the ``n`` maximising goodput
``(B + sum g) / T(n)``; each row drafts as many of the chosen slots as are its own (a prefix,
since ``g`` falls with ``j``). Hysteresis: the step switches speculation on or off only when the
other side is better by ``margin``. A decision not to speculate is reused while the batch is
unchanged, for up to ``recheck_every`` steps (nothing is verified meanwhile, so little moves).
After ``probe_every`` steps in a row without speculation, one step takes the best speculating
plan anyway, with the row whose first draft is likeliest drafting to its full cap: while nothing
is drafted no acceptance is measured, so an estimate that turned speculation off (a request's
unlucky start, a drafter that improves as it learns) would otherwise never be revisited, and
the full-depth row measures what deep verification costs and how deep drafts fare (the step
fit's memory is a few dozen steps, so without it the price of deep steps falls back to the
calibration's, which another host may have measured); a probe costs at most one spec-path step
in ``probe_every``. A probe after which the controller stays off doubles the wait for the next
(up to ``probe_max``); speculating on its own merits resets it.
Steps without drafts still teach the first position when the drafter keeps hindsight (Token
Recycling's chains: :mod:`specserve_vllm.drafters.hindsight`, :meth:`observe_hindsight`), so
while off, the estimate follows what drafting would do now. A plan that speculates (chains) is reused in the same way for up to ``recheck_on`` steps, so
the cost of a decision is spread over them; when the next decision for the same batch makes the
same plan, the hold doubles, up to ``recheck_max`` steps. A decode row that does not draft has its own
acceptance evidence faded by ``idle_decay`` per
step (:meth:`AcceptanceModel.age`), so a request that stopped after an unlucky stretch drifts
back to the engine-wide rate and is tried again when that rate says drafting pays. Likewise a
sampling class nothing measured since the last decision has its engine-wide rate moved toward
its long-run one (:attr:`revert` per step, :meth:`AcceptanceModel.revert`): while off, a dip that
turned speculation off is not kept as the rate until a probe.
With trees on (engine setting ``tree``), the step also prices trees of ``1 .. N`` nodes per row
(:mod:`~specserve_vllm.spec_control.tree_pricing`) and takes trees when they beat the best
chain plan; otherwise the drafter is told to draft chains for the step (:attr:`chains_only`).
Cost: a sort of at most ``B * k`` slots (~0.1 ms at 64).

    >>> from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel
    >>> cost = StepCost(base=8, per_token=1, per_row=0, context=0, spec=3, spec_row=0.2, draft=0.5,
    ...                 draft_token=0.02)
    >>> p = GoodputPolicy(StepTimeModel(cost), AcceptanceModel([0.8] * 4))
    >>> one = StepRows(("a",), np.array([4]), np.array([100]))
    >>> p.plan(one).tolist()            # idle: speculate deep
    [4]
    >>> busy = StepRows(tuple("abcdefghijklmnop"), np.full(16, 4), np.full(16, 100))
    >>> cost16 = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1,
    ...                   draft_token=0.1)
    >>> GoodputPolicy(StepTimeModel(cost16), AcceptanceModel([0.6] * 4)).plan(busy).tolist() == [0] * 16
    True
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from specserve_vllm.spec_control.acceptance import REVERT, SAMPLING_CLASSES, AcceptanceModel
from specserve_vllm.spec_control.plan import PREFILL_ESTIMATES, PlanKey, StepRows, VerifiedRows, narrowed, plan_key
from specserve_vllm.spec_control.step_time import DEFAULT_CALIBRATION, Calibration, StepTimeModel
from specserve_vllm.spec_control.tree_pricing import TreePricing

logger = logging.getLogger(__name__)

FALLBACK_PRIOR = 0.6
"""Conditional acceptance assumed per position when the calibration has none for the drafter."""
MAX_UNLEARNED = 16
"""Steps of verifications kept before they are folded in even without a decision."""


@dataclass(slots=True)
class HeldPlan:
    """A decision kept for the batch it was made for (:meth:`GoodputPolicy.reuse`)."""

    key: PlanKey
    remaining: int
    """Further steps it may be reused for."""
    plan: np.ndarray
    """The lengths per row (read-only: handed out without a copy)."""
    predicted_ms: float
    speculating: bool
    decode: list[int]
    """The decode rows' lengths, as the planner's counters take them."""


def best_slots(survival: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slots sorted best first: ``(values [s], row index [s], position [s])`` over ``j < caps[i]``
    (positions from 0).

    >>> best_slots(np.array([[0.9, 0.5], [0.7, 0.6]]), np.array([2, 1]))
    (array([0.9, 0.7, 0.5]), array([0, 1, 0]), array([0, 0, 1]))
    """
    b, k = survival.shape
    if int(caps.min()) >= k:  # every row may draft every position (the usual case): no mask
        values, (rows, cols) = survival.ravel(), _slot_index(b, k)
    else:
        mask = np.arange(k)[None, :] < caps[:, None]  # [B, k]
        values = survival[mask]
        rows, cols = np.nonzero(mask)
    order = np.argsort(-values, kind="stable")
    return values[order], rows[order], cols[order]


@functools.lru_cache(maxsize=256)
def _slot_index(b: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``([b * k], [b * k])``: the row and position of each slot of a ``[b, k]`` survival array,
    flattened (read-only)."""
    rows, cols = np.repeat(np.arange(b), k), np.tile(np.arange(k), b)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def next_hold(last: int, again: bool, start: int, most: int) -> int:
    """Steps to hold a decision: twice the ``last`` hold (at most ``most``) when it repeats the
    decision before it (``again``), else ``start``.

    >>> h = 4
    >>> [h := next_hold(h, again, 4, 16) for again in (True, True, True, False)]
    [8, 16, 16, 4]
    """
    return min(last * 2, most) if again else start


def sampled_rows(rows: StepRows, dec: np.ndarray) -> np.ndarray:
    """Whether each decode row ``dec`` draws its tokens from a sampling law (temperature > 0),
    whose every verified draft then costs a draw over the vocabulary instead of an argmax.

    >>> sampled_rows(StepRows(("a", "b", "c"), np.array([4, 0, 4]), np.zeros(3), classes=np.array([0, 2, 3])),
    ...              np.array([0, 2])).tolist()
    [False, True]
    """
    if rows.classes is None:
        return np.zeros(len(dec), dtype=bool)
    return rows.classes[dec] > 0


class GoodputPolicy:
    """Per-step draft lengths maximising predicted committed tokens per millisecond."""

    name = "goodput"

    def __init__(self, model: StepTimeModel, acceptance: AcceptanceModel, margin: float = 0.03,
                 recheck_every: int = 8, trees: TreePricing | None = None, chain_depth: int | None = None,
                 probe_every: int = 128, idle_decay: float = 0.95, sampling_classes: bool = True,
                 recheck_on: int = 1, recheck_max: int = 16, recheck_off_max: int = 32,
                 probe_max: int = 1024, prefill_estimate: str = "next", revert: float = REVERT) -> None:
        if prefill_estimate not in PREFILL_ESTIMATES:
            raise ValueError(f"prefill_estimate must be one of {', '.join(PREFILL_ESTIMATES)}, got {prefill_estimate!r}")
        self.model = model
        self._acceptance = acceptance
        self.trees = trees
        """Tree pricing when the drafter drafts trees (engine setting ``tree``): each step then
        chooses between no speculation, chains and trees (:mod:`.tree_pricing`)."""
        self.chain_depth = acceptance.k if chain_depth is None else min(chain_depth, acceptance.k)
        """The longest chain the drafter drafts (Medusa/Hydra: its number of heads)."""
        self.chains_only = False
        """The last plan asks for chains although the drafter drafts trees."""
        self._tree_rows: dict[str, tuple[int, float]] = {}
        """Per row of the last tree plan: (nodes, the chain's expected accepted drafts)."""
        self.margin = margin
        self.recheck_every = recheck_every
        """A decision not to speculate holds for up to this many steps while the batch is
        unchanged: with nothing verified, only the step-time corrections and context lengths
        move, slowly. A new batch, or any verified draft, ends the hold."""
        self.recheck_on = recheck_on
        """A chain plan that speculates is reused while the batch is unchanged, for up to this
        many steps in all (1: decide every step). A decision costs 50-180 µs, several percent of
        a CPU step; acceptance estimates move slowly (decay 0.9 per verification), so a plan a
        few steps old is nearly the one a new decision would make."""
        self.recheck_max = max(recheck_on, recheck_max)
        """A speculating plan that a decision repeats for the same batch is held twice as long
        as the last time, up to this many steps; a different plan or batch starts again at
        :attr:`recheck_on`. A steady batch (one client decoding) decides a few times a
        request instead of every few steps."""
        self._on_hold = recheck_on
        self.recheck_off_max = max(recheck_every, recheck_off_max)
        """A decision not to speculate that follows another is held twice as long as the last
        one, up to this many steps (while the drafter gives no hindsight: then nothing is learnt
        while off, and each decision costs 100-200 µs for nothing). A new batch still decides
        at once; the first off decision after speculating holds :attr:`recheck_every`."""
        self.learns_while_off = False
        """The drafter scores skipped drafts (hindsight): off decisions keep :attr:`recheck_every`,
        since each reads evidence gathered while off."""
        self._off_hold = recheck_every
        self._last_on: tuple[PlanKey, bytes] | None = None
        """The batch and lengths of the last speculating decision."""
        self._held: HeldPlan | None = None
        """The last decision, while it may still be reused (:meth:`reuse`)."""
        self.probe_every = probe_every
        """After this many steps in a row without speculation, one step speculates (0: never)."""
        self.probe_max = max(probe_every, probe_max)
        """A probe after which the controller stays off doubles the wait for the next one, up to
        this many steps; a decision that speculates on its own merits resets it to
        :attr:`probe_every`. A drafter that keeps losing (Hydra at temperature 0.7 on the demo
        model: each probe drafts and verifies four tokens at about 1.8 ms against a 2.3 ms step)
        is then probed ever more rarely, while one whose probe finds it worth it is back at once."""
        self._probe_wait = probe_every
        """Steps off in a row before the next probe (:attr:`probe_every` .. :attr:`probe_max`)."""
        self._probed = False
        """The last decision was a probe."""
        self._off_streak = 0
        self.idle_decay = idle_decay
        """Per step a decode row does not draft, its own acceptance evidence fades by this."""
        self.revert = revert
        """Per step a sampling class is not measured, its recent acceptance keeps this share of
        its distance to its long-run rate (:meth:`AcceptanceModel.revert`; 1: never reverts)."""
        self._steps = 1
        """Steps since the last decision (held steps reuse one)."""
        self._idle_rows: list[str] = []
        """Decode rows the last decision gave no draft."""
        self.probes = 0
        """Steps that speculated only because of :attr:`probe_every`."""
        self.speculating = True
        self.prefill_tokens = 0
        """Prefill tokens of the last timed step."""
        self.prefill_estimate = prefill_estimate
        """How the next step's prefill tokens are estimated (:data:`PREFILL_ESTIMATES`)."""
        self.last_predicted_ms = 0.0
        self.decide_us = 0.0
        """EWMA of the time one decision takes (µs)."""
        self.sampling_classes = sampling_classes
        """Price each request at its sampling class's engine-wide rate (``StepRows.classes``);
        ``False``: every request in the greedy class, one rate for all."""
        self._unlearned: list[tuple[tuple[str, ...], np.ndarray, np.ndarray]] = []
        """Chain verifications not yet in :attr:`acceptance` (see :meth:`learn`)."""

    @property
    def acceptance(self) -> AcceptanceModel:
        """The acceptance estimates, with every verification seen so far folded in
        (:meth:`learn`; the engine thread's view; :meth:`model_state` reads them as they are)."""
        self.learn()
        return self._acceptance

    @acceptance.setter
    def acceptance(self, model: AcceptanceModel) -> None:
        self._unlearned.clear()
        self._acceptance = model

    @classmethod
    def from_settings(cls, settings: Any, num_speculative_tokens: int, drafter: str,
                      tree: str = "chain", chain_depth: int | None = None) -> GoodputPolicy:
        path = settings.calibration or DEFAULT_CALIBRATION
        calibration = Calibration.load(path)
        cost, prior = calibration.for_drafter(drafter)
        prior = (prior or [])[:num_speculative_tokens]
        prior += [prior[-1] if prior else FALLBACK_PRIOR] * (num_speculative_tokens - len(prior))
        by_class = calibration.class_priors(drafter)
        logger.info("goodput policy", extra={"fields": {"calibration": str(path), "drafter": drafter,
                                                        "prior": prior, "class_priors": by_class}})
        trees = TreePricing(num_speculative_tokens) if tree != "chain" else None
        return cls(StepTimeModel(cost, alpha=settings.fit_alpha), AcceptanceModel(prior, class_priors=by_class), trees=trees,
                   chain_depth=chain_depth, sampling_classes=settings.sampling_classes,
                   recheck_on=settings.recheck_on, prefill_estimate=settings.prefill_estimate,
                   revert=settings.revert)

    def goodput(self, rows: StepRows, survival: np.ndarray | None = None,
                dec: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(goodput [s+1], slot rows [s], time_ms [s+1])`` for taking the best 0..s slots
        (``survival``: the decode rows' survival, ``dec``: their indices, when the caller has them)."""
        dec = np.flatnonzero(rows.caps) if dec is None else dec
        b = len(dec)
        caps = np.minimum(rows.caps[dec], self.chain_depth)
        if survival is None:
            self.learn()
            survival = self._acceptance.survival([rows.req_ids[i] for i in dec])  # [B, k]
        values, slot_rows, positions = best_slots(survival, caps)
        s = len(values)
        committed = np.empty(s + 1)
        committed[0] = 0.0
        np.cumsum(values, out=committed[1:])
        committed += b
        sampled = sampled_rows(rows, dec)
        off, on, per_draft, per_position, per_sampled = self.model.chain_terms(
            len(rows.caps), b + self.next_prefill(rows), int(rows.context.sum()), int(sampled.sum()))
        times = np.empty(s + 1, dtype=np.float64)
        times[0] = 0.0
        if per_sampled > 0 and sampled.any():  # a sampled row's draft is drawn, not argmaxed
            np.cumsum(per_draft + per_sampled * sampled[slot_rows], out=times[1:])
        else:
            times[1:] = per_draft * np.arange(1, s + 1)
        times += on
        if per_position > 0 and s:  # the deepest position taken so far, paid once
            times[1:] += per_position * (np.maximum.accumulate(positions) + 1)
        times[0] = off
        return committed / times, dec[slot_rows], times

    def tree_goodput(self, rows: StepRows, survival: np.ndarray | None = None,
                     dec: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(goodput [N], nodes per row [N, n_rows], time_ms [N])`` for trees of ``1 .. N`` nodes
        in every decode row (fewer where a row's cap is lower), priced by :attr:`trees`
        (``survival``, ``dec`` as in :meth:`goodput`)."""
        assert self.trees is not None
        dec = np.flatnonzero(rows.caps) if dec is None else dec
        b = len(dec)
        if survival is None:
            self.learn()
            survival = self._acceptance.survival([rows.req_ids[i] for i in dec])  # [B, k]
        value = self.trees.value(survival, self.chain_depth)  # [B, N]
        n = np.arange(1, self.trees.max_nodes + 1)
        nodes = np.minimum(n[:, None], rows.caps[dec][None, :])  # [N, B]
        committed = b + value[np.arange(b)[None, :], nodes - 1].sum(axis=1)  # [N]
        ctx = int(rows.context.sum())
        n_rows = len(rows.caps)
        depth = np.minimum(nodes.max(axis=1, initial=0), self.chain_depth)  # a tree is at most this deep
        sampled = sampled_rows(rows, dec)
        times = self.model.cycle_ms(n_rows, b + self.next_prefill(rows), ctx, nodes.sum(axis=1), depth,
                                    sampled=int(sampled.sum()), sampled_drafts=nodes[:, sampled].sum(axis=1))
        times = times * self.trees.cost_factor(n_rows)
        per_row = np.zeros((len(n), n_rows), dtype=np.int64)
        per_row[:, dec] = nodes
        return committed / times, per_row, times

    def reuse(self, key: PlanKey) -> HeldPlan | None:
        """The plan held for the batch ``key`` (:func:`plan_key`), or ``None`` when a decision
        is due: the batch changed, the hold ran out, or a probe is due. A held step costs a
        tuple comparison, so the engine asks this before it builds :class:`StepRows`.

        >>> from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel
        >>> cost = StepCost(8, 1, 0, 0, 3, 0.2, 0.5, 0.02)
        >>> p = GoodputPolicy(StepTimeModel(cost), AcceptanceModel([0.8] * 4), recheck_on=2)
        >>> p.plan(StepRows(("a",), np.array([4]), np.array([100]))).tolist()
        [4]
        >>> p.reuse(plan_key(["a"], [4])).plan.tolist(), p.reuse(plan_key(["a"], [4]))
        ([4], None)

        The same requests with lower caps (:func:`narrowed`) reuse it too, cut to them:

        >>> p.plan(StepRows(("a",), np.array([4]), np.array([100]))).tolist()
        [4]
        >>> p.reuse(plan_key(["a"], [2])).plan.tolist(), p.reuse(plan_key(["a"], [3]))
        ([2], None)
        """
        held = self._held
        if held is None or held.remaining <= 0:
            return None
        if not held.speculating and 0 < self._probe_wait <= self._off_streak + 1:
            return None
        if held.key != key:  # the same requests with lower caps keep the decision, cut to them
            plan = narrowed(held.key, held.plan, key)
            if plan is None:
                return None
            plan.flags.writeable = False
            held.key, held.plan = key, plan
            held.decode = [int(x) for x, c in zip(plan.tolist(), key[1]) if c > 0]
        held.remaining -= 1
        self._steps += 1
        self.last_predicted_ms = held.predicted_ms
        if not held.speculating:
            self._off_streak += 1
        return held

    def release(self) -> None:
        """Drop the held plan: the next step decides (as it would for a new batch)."""
        self._held = None

    def plan(self, rows: StepRows) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.zeros(len(rows.caps), dtype=np.int64)
        self.chains_only = self.trees is not None
        if not rows.caps.any():
            return out
        key = plan_key(rows.req_ids, rows.caps.tolist())
        reused = self.reuse(key)
        if reused is not None:
            return reused.plan.copy()
        self._held = None
        self.learn()
        if self.revert < 1.0:
            self._acceptance.revert(self.revert ** self._steps)
        probe = 0 < self._probe_wait <= self._off_streak + 1
        if self._idle_rows:
            self._acceptance.age(self._idle_rows, self.idle_decay ** self._steps)
        if rows.classes is not None and self.sampling_classes:
            self._acceptance.assign(rows.req_ids, rows.classes.tolist())
        dec = np.flatnonzero(rows.caps)  # the decode rows
        survival = self._acceptance.survival([rows.req_ids[i] for i in dec.tolist()])  # [B, k]
        g, slot_rows, times = self.goodput(rows, survival, dec)
        best_on = 1 + int(np.argmax(g[1:])) if len(g) > 1 else 0
        best_g = g[best_on] if best_on else 0.0
        tree_plan = None
        if self.trees is not None:
            tg, tree_rows, tree_times = self.tree_goodput(rows, survival, dec)
            best_tree = int(np.argmax(tg))
            if self.trees.explore(bool(tg[best_tree] > best_g)) or tg[best_tree] > best_g:
                tree_plan, best_g = (tree_rows[best_tree], float(tree_times[best_tree])), float(tg[best_tree])
        if best_on or tree_plan is not None:
            if self.speculating:
                on = best_g * (1 + self.margin) >= g[0]
            else:
                on = best_g >= g[0] * (1 + self.margin)
        else:
            on = False
        probing = bool(probe and not on and best_on)
        if self._probed or (on and not probing):  # a probe's verdict, or speculation on its merits
            self._probe_wait = (min(self._probe_wait * 2, self.probe_max) if self._probed and not on
                                else self.probe_every)
        self._probed = probing
        if probing:
            on, tree_plan = True, None
            self.probes += 1
        self._off_streak = 0 if on else self._off_streak + 1
        after_off, self.speculating = not self.speculating, on
        if on and tree_plan is not None:
            out, self.last_predicted_ms = tree_plan[0].copy(), tree_plan[1]
            self.chains_only = False
            self.remember_tree_rows(rows, out, survival)  # tree rows are the decode rows
        else:
            n = best_on if on else 0
            out = np.bincount(slot_rows[:n], minlength=len(out)).astype(np.int64)
            if probing:  # one row at its full depth: deep drafts' price and acceptance measured too
                deep = int(dec[int(np.argmax(survival[:, 0]))])
                out[deep] = max(int(out[deep]), min(int(rows.caps[deep]), self.chain_depth))
                n = min(int(out.sum()), len(times) - 1)
            self.last_predicted_ms = float(times[n])
            if not on or (not probing and self.recheck_on > 1):
                held_plan = out.copy()
                held_plan.flags.writeable = False
                self._held = HeldPlan(key, (self._hold_for(key, held_plan) if on else self._hold_off(after_off)) - 1,
                                      held_plan, self.last_predicted_ms, on, held_plan[dec].tolist())
            if not on:
                self._last_on = None
        self._idle_rows = [rows.req_ids[i] for i in dec[out[dec] == 0].tolist()]
        self._steps = 1
        self.decide_us += 0.1 * ((time.perf_counter() - t0) * 1e6 - self.decide_us)
        return out

    def _hold_for(self, key: PlanKey, plan: np.ndarray) -> int:
        """Steps to hold a speculating ``plan`` for the batch ``key``: doubled (up to
        :attr:`recheck_max`) when the last speculating decision made the same plan for it,
        else :attr:`recheck_on`.

        >>> from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel
        >>> p = GoodputPolicy(StepTimeModel(StepCost(8, 1, 0, 0, 3, 0.2, 0.5, 0.02)), AcceptanceModel([0.8] * 4),
        ...                   recheck_on=4, recheck_max=16)
        >>> k = plan_key(["a"], [4])
        >>> [p._hold_for(k, np.array([4])) for _ in range(4)], p._hold_for(k, np.array([3]))
        ([4, 8, 16, 16], 4)
        """
        same = self._last_on is not None and self._last_on[0] == key and self._last_on[1] == plan.tobytes()
        self._on_hold = next_hold(self._on_hold, same, self.recheck_on, self.recheck_max)
        self._last_on = (key, plan.tobytes())
        return self._on_hold

    def _hold_off(self, after_off: bool) -> int:
        """Steps to hold a decision not to speculate: doubled (up to :attr:`recheck_off_max`)
        when the last decision was off too (``after_off``), whatever its batch (a new batch
        still decides at once: the hold only spaces re-decisions of one batch), else
        :attr:`recheck_every`; always :attr:`recheck_every` when :attr:`learns_while_off`.

        >>> from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel
        >>> p = GoodputPolicy(StepTimeModel(StepCost(8, 1, 0, 0, 3, 0.2, 0.5, 0.02)), AcceptanceModel([0.8] * 4))
        >>> [p._hold_off(after_off) for after_off in (False, True, True, True, False)]
        [8, 16, 32, 32, 8]
        """
        again = after_off and not self.learns_while_off
        self._off_hold = next_hold(self._off_hold, again, self.recheck_every, self.recheck_off_max)
        return self._off_hold

    def remember_tree_rows(self, rows: StepRows, nodes: np.ndarray, survival: np.ndarray | None = None) -> None:
        """Each tree row's node count and its chain's expected accepted drafts at that count
        (``survival``: the tree rows' survival, when the caller has it)."""
        dec = np.flatnonzero(nodes > 0)
        ids = [rows.req_ids[i] for i in dec]
        depth = min(self.chain_depth, self._acceptance.k)
        if survival is None:
            self.learn()
            survival = self._acceptance.survival(ids)
        chain = np.cumsum(survival[:, :depth], axis=1)  # [B, depth]
        cols = np.minimum(nodes[dec], depth) - 1
        expected = chain[np.arange(len(dec)), cols]
        self._tree_rows = {r: (int(n), float(e)) for r, n, e in zip(ids, nodes[dec], expected)}

    def model_state(self) -> dict[str, Any]:
        """The step-time model and the engine-wide acceptance per position, as plain data: what
        the engine exports for the gateway, which prices requests with the same model."""
        trees = self.trees.state() if self.trees is not None else {}
        # read from the publishing thread: no learn() here, the estimates as of the last decision
        rates = self._acceptance.class_rates().round(4)
        by_class = {SAMPLING_CLASSES[c]: rates[c].tolist() for c in self._acceptance.seen_classes()}
        return {**self.model.state(), "acceptance": self._acceptance.engine_rates().round(4).tolist(),
                "acceptance_by_class": by_class, "probes": self.probes, **trees}

    def observe(self, verified: VerifiedRows) -> None:
        if len(verified.req_ids) and self._held is not None and not self._held.speculating:
            self._held = None  # something was verified: a decision not to speculate is stale
        trees = verified.trees
        if trees is None or not trees.any():
            self._unlearned.append((verified.req_ids, verified.drafted, verified.accepted))
            if len(self._unlearned) >= MAX_UNLEARNED:
                self.learn()
            return
        for i in np.flatnonzero(trees).tolist():  # a tree's path tells the tree pricing, not the chain rates
            planned = self._tree_rows.get(verified.req_ids[i])
            if planned is not None and self.trees is not None:
                self.trees.observe_value(int(verified.drafted[i]), int(verified.accepted[i]), planned[1])
        chain = np.flatnonzero(~trees)
        if len(chain):
            self.learn()
            self._acceptance.observe_rows([verified.req_ids[i] for i in chain.tolist()], verified.drafted[chain],
                                         verified.accepted[chain])

    def observe_hindsight(self, req_ids: list[str], classes: list[int], probability: np.ndarray) -> None:
        """Hindsight rows (steps without drafts, scored by the drafter): evidence at the first
        position, so an estimate that turned speculation off keeps learning while it is off."""
        self.learn()  # earlier verifications first: the counts decay in order
        self._acceptance.observe_first(req_ids, probability, classes if self.sampling_classes else None)

    def learn(self) -> None:
        """Fold the chain verifications seen since the last decision into :attr:`acceptance`.

        They are kept as they come (an append per step) and folded, in order and in one call,
        when the next decision reads the estimates: the same counts as folding each at once,
        for a fraction of the cost, since a fold costs about the same for one step's rows as
        for several, and a step's first array operations after the forward pass run with cold
        caches and cost several times what they cost in a burst.
        """
        pending = self._unlearned
        if len(pending) == 1:
            self._acceptance.observe_rows(*pending[0])
        elif pending:  # the steps in order, as one call
            self._acceptance.observe_rows([r for ids, _, _ in pending for r in ids],
                                          np.concatenate([d for _, d, _ in pending]),
                                          np.concatenate([a for _, _, a in pending]))
        pending.clear()

    def observe_step(self, rows: int, tokens: int, ctx_tokens: int, spec: bool, prefill_tokens: int,
                     step_ms: float, drafts: int, draft_ms: float, trees: int = 0, verified: int = 0,
                     draft_depth: int = 0, sampled: int = 0) -> float:
        """A measured step: correct the model; returns the prediction made before correcting.
        A step that verified trees (``trees`` requests) corrects the tree cost, not the chain's;
        ``verified``: the drafts it verified; ``draft_depth``: the longest row's draft made after
        it; ``sampled``: its logits rows drawn from a sampling law."""
        chain = self.model.step_ms(rows, tokens, ctx_tokens, spec, verified, sampled)
        drafting = self.model.draft_ms(drafts, draft_depth)
        predicted = chain + drafting
        if trees and self.trees is not None:
            predicted = chain * self.trees.cost_factor(rows) + drafting
            self.trees.observe_time(rows, step_ms / chain if chain > 0 else 0.0)
        else:
            self.model.observe(rows, tokens, ctx_tokens, spec, step_ms, verified, sampled)
        if drafts:
            self.model.observe_draft(drafts, draft_ms, draft_depth)
        self.prefill_tokens = prefill_tokens
        return predicted

    def next_prefill(self, rows: StepRows) -> int:
        """The prefill tokens the next step is priced with (:attr:`prefill_estimate`)."""
        return rows.prefill if self.prefill_estimate == "next" else self.prefill_tokens

    def observe_drafting(self, drafts: int, draft_ms: float, depth: int = 0) -> None:
        """Drafting measured at the end of a step that was not timed (``StepPlanner.skip_step``)."""
        self.model.observe_draft(drafts, draft_ms, depth)

    def finished(self, req_ids: frozenset[str]) -> None:
        self.learn()  # their last verifications count for the engine-wide rates
        self._acceptance.forget(req_ids)
