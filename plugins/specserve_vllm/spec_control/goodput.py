"""SmartSpec-style goodput control of draft lengths, decided per step for the whole batch.

Before each step, for the ``B`` decode rows (prefill chunks are not decode rows), each draft
slot ``(i, j)`` (row ``i``, position ``j <= cap_i``) is worth its survival probability
``g[i, j]`` (:mod:`~specserve_vllm.spec_control.acceptance`). Taking the ``n`` best slots, the
step commits ``B + sum of their g`` tokens on average and costs

    T(n) = step(rows, tokens = B + n + prefill, spec = n > 0) + draft(n)

(:mod:`~specserve_vllm.spec_control.step_time`), so ``n = 0`` is priced as the real
non-speculative step: no spec path, no drafting. The plan is the ``n`` maximising goodput
``(B + sum g) / T(n)``; each row drafts as many of the chosen slots as are its own (a prefix,
since ``g`` falls with ``j``). Hysteresis: the step switches speculation on or off only when the
other side is better by ``margin``. A decision not to speculate is reused while the batch is
unchanged, for up to ``recheck_every`` steps (nothing is verified meanwhile, so little moves).
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

import logging
import time
from typing import Any

import numpy as np

from specserve_vllm.spec_control.acceptance import AcceptanceModel
from specserve_vllm.spec_control.plan import StepRows, VerifiedRows
from specserve_vllm.spec_control.step_time import DEFAULT_CALIBRATION, Calibration, StepTimeModel

logger = logging.getLogger(__name__)

FALLBACK_PRIOR = 0.6
"""Conditional acceptance assumed per position when the calibration has none for the drafter."""


def best_slots(survival: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slots sorted best first: ``(values [s], row index [s])`` over ``j < caps[i]``.

    >>> best_slots(np.array([[0.9, 0.5], [0.7, 0.6]]), np.array([2, 1]))
    (array([0.9, 0.7, 0.5]), array([0, 1, 0]))
    """
    k = survival.shape[1]
    mask = np.arange(k)[None, :] < caps[:, None]  # [B, k]
    values = survival[mask]
    rows = np.nonzero(mask)[0]
    order = np.argsort(-values, kind="stable")
    return values[order], rows[order]


class GoodputPolicy:
    """Per-step draft lengths maximising predicted committed tokens per millisecond."""

    name = "goodput"

    def __init__(self, model: StepTimeModel, acceptance: AcceptanceModel, margin: float = 0.03,
                 recheck_every: int = 8) -> None:
        self.model = model
        self.acceptance = acceptance
        self.margin = margin
        self.recheck_every = recheck_every
        """A decision not to speculate holds for up to this many steps while the batch is
        unchanged: with nothing verified, only the step-time corrections and context lengths
        move, slowly. A new batch, or any verified draft, ends the hold."""
        self._hold: tuple[Any, int] | None = None
        """``(batch key, further steps it holds)`` of the last decision not to speculate."""
        self.speculating = True
        self.prefill_tokens = 0
        """Prefill tokens of the last step, the estimate for the next one."""
        self.last_predicted_ms = 0.0
        self.decide_us = 0.0
        """EWMA of the time one decision takes (µs)."""

    @classmethod
    def from_settings(cls, settings: Any, num_speculative_tokens: int, drafter: str) -> GoodputPolicy:
        path = settings.calibration or DEFAULT_CALIBRATION
        calibration = Calibration.load(path)
        cost, prior = calibration.for_drafter(drafter)
        prior = (prior or [])[:num_speculative_tokens]
        prior += [prior[-1] if prior else FALLBACK_PRIOR] * (num_speculative_tokens - len(prior))
        logger.info("goodput policy", extra={"fields": {"calibration": str(path), "drafter": drafter,
                                                        "prior": prior}})
        return cls(StepTimeModel(cost), AcceptanceModel(prior))

    def goodput(self, rows: StepRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(goodput [s+1], slot rows [s], time_ms [s+1])`` for taking the best 0..s slots."""
        dec = np.flatnonzero(rows.caps > 0)
        b = len(dec)
        caps = np.minimum(rows.caps[dec], self.acceptance.k)
        survival = self.acceptance.survival([rows.req_ids[i] for i in dec])  # [B, k]
        values, slot_rows = best_slots(survival, caps)
        n = np.arange(len(values) + 1)
        committed = b + np.concatenate(([0.0], np.cumsum(values)))
        ctx = int(rows.context.sum())
        n_rows = len(rows.caps)
        times = self.model.cycle_ms(n_rows, b + self.prefill_tokens, ctx, n)
        return committed / times, dec[slot_rows], times

    def plan(self, rows: StepRows) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.zeros(len(rows.caps), dtype=np.int64)
        if not rows.caps.any():
            return out
        key = (rows.req_ids, rows.caps.tobytes())
        if self._hold is not None and self._hold[1] > 0 and self._hold[0] == key:
            self._hold = (key, self._hold[1] - 1)
            return out
        g, slot_rows, times = self.goodput(rows)
        best_on = 1 + int(np.argmax(g[1:])) if len(g) > 1 else 0
        if best_on:
            if self.speculating:
                on = g[best_on] * (1 + self.margin) >= g[0]
            else:
                on = g[best_on] >= g[0] * (1 + self.margin)
        else:
            on = False
        n = best_on if on else 0
        self.speculating = on
        self._hold = None if on else (key, self.recheck_every - 1)
        np.add.at(out, slot_rows[:n], 1)
        self.last_predicted_ms = float(times[n])
        self.decide_us += 0.1 * ((time.perf_counter() - t0) * 1e6 - self.decide_us)
        return out

    def model_state(self) -> dict[str, Any]:
        """The step-time model and the engine-wide acceptance per position, as plain data: what
        the engine exports for the gateway, which prices requests with the same model."""
        return {**self.model.state(), "acceptance": self.acceptance.engine_rates().round(4).tolist()}

    def observe(self, verified: VerifiedRows) -> None:
        if len(verified.req_ids):
            self._hold = None
        for req_id, drafted, accepted in verified.positions():
            self.acceptance.observe(req_id, drafted, accepted)

    def observe_step(self, rows: int, tokens: int, ctx_tokens: int, spec: bool, prefill_tokens: int,
                     step_ms: float, drafts: int, draft_ms: float) -> float:
        """A measured step: correct the model; returns the prediction made before correcting."""
        predicted = self.model.step_ms(rows, tokens, ctx_tokens, spec) + self.model.draft_ms(drafts)
        self.model.observe(rows, tokens, ctx_tokens, spec, step_ms)
        if drafts:
            self.model.observe_draft(drafts, draft_ms)
        self.prefill_tokens = prefill_tokens
        return predicted

    def finished(self, req_ids: frozenset[str]) -> None:
        self.acceptance.forget(req_ids)
