"""The drafting time's online fit (``StepTimeModel.draft_fit``): its two terms are corrected separately.

Measured on the demo model with Hydra at 8 clients: drafting 4 tokens (one row) took 1.9 ms and
32 (eight rows) 2.6 ms, against a calibration of 0.93 + 0.061 n ms (1.2 and 2.9 ms). One factor
over both terms learned 1.6 from the one-row steps at the end of each wave of requests and priced
32 drafts at 4.6 ms, so the controller turned speculation off at batch 8 where it paid."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from specserve_vllm.spec_control.acceptance import AcceptanceModel
from specserve_vllm.spec_control.goodput import GoodputPolicy
from specserve_vllm.spec_control.plan import StepRows
from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel

HYDRA = StepCost(base=2.7, per_token=0.028, per_row=0.059, context=0.0, spec=0.72, spec_row=0.062,
                 draft=0.927, draft_token=0.0614)


def hydra_draft_ms(n: int) -> float:
    """The measured drafting time (ms) of ``n`` drafts: 1.8 ms + 0.026 ms a draft."""
    return 1.8 + 0.026 * n


def test_mixed_draft_counts_are_priced_at_their_own_cost() -> None:
    model = StepTimeModel(HYDRA)
    for _ in range(20):
        for n in (32, 32, 28, 24, 16, 8, 4, 4):  # a wave of requests draining to one row
            model.observe_draft(n, hydra_draft_ms(n))
    for n in (4, 16, 32):
        assert abs(model.draft_ms(n) / hydra_draft_ms(n) - 1) < 0.05, n


def test_the_controller_keeps_speculating_at_batch_8_after_one_row_waves() -> None:
    """The case above, end to end: after learning from one-row and eight-row drafting, the
    eight-row plan prices drafting at what it costs and speculates."""
    model = StepTimeModel(HYDRA)
    for _ in range(20):
        for n in (32, 4, 4, 4):
            model.observe_draft(n, hydra_draft_ms(n))
    policy = GoodputPolicy(model, AcceptanceModel([0.65, 0.8, 0.75, 0.9]))
    rows = StepRows(tuple("abcdefgh"), np.full(8, 4), np.full(8, 200))
    assert policy.plan(rows).sum() > 0
    g, _, times = policy.goodput(rows)
    assert abs(times[-1] - (model.step_ms(8, 8 + 32, 1600, True) + hydra_draft_ms(32))) < 0.15


def test_one_draft_count_moves_only_the_prediction_it_measures() -> None:
    """All measurements at one count: the prediction there converges, and the change is shared
    by the two terms in proportion to their share, never flipping the slope's sign."""
    model = StepTimeModel(replace(HYDRA, draft=1.0, draft_token=0.1))
    for _ in range(100):
        model.observe_draft(4, 2.1)  # calibrated 1.0 + 0.4
    assert abs(model.draft_ms(4) - 2.1) < 0.01
    fixed, per_draft = model.draft_correction
    assert fixed > 1 and per_draft > 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.floats(0.01, 1000.0)), min_size=1, max_size=50))
def test_factors_stay_finite_and_non_negative(measurements: list[tuple[int, float]]) -> None:
    model = StepTimeModel(HYDRA)
    for n, ms in measurements:
        model.observe_draft(n, ms)
        fixed, per_draft = model.draft_correction
        assert np.isfinite(fixed) and np.isfinite(per_draft) and fixed >= 0 and per_draft >= 0
        assert model.draft_ms(n) > 0


def test_the_state_round_trips_both_terms() -> None:
    model = StepTimeModel(HYDRA)
    for n in (4, 32) * 30:
        model.observe_draft(n, hydra_draft_ms(n))
    again = StepTimeModel.from_state(model.state())
    for n in (4, 16, 32):
        assert abs(again.draft_ms(n) - model.draft_ms(n)) < 1e-3
    old = StepTimeModel.from_state({"cost": model.state()["cost"], "draft_correction": 1.5})  # one factor
    assert abs(old.draft_ms(8) - 1.5 * HYDRA.draft_ms(8)) < 1e-9
