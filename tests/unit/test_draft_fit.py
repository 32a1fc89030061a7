"""The drafting time's online fit (``StepTimeModel.draft_fit``): its terms are corrected separately.

Measured on the demo model with Hydra at 8 clients: drafting 4 tokens (one row) took 1.9 ms and
32 (eight rows) 2.6 ms, against a calibration of 0.93 + 0.061 n ms (1.2 and 2.9 ms). One factor
over both terms learned 1.6 from the one-row steps at the end of each wave of requests and priced
32 drafts at 4.6 ms, so the controller turned speculation off at batch 8 where it paid.

Measured again by rows and depth (fixed lengths per request, 2026-12-07), Hydra's drafting is
``0.2 + depth * (0.32 + 0.035 * rows)`` ms: its heads run once per position for all rows. A fit
per draft alone priced it 2-3x off between one row and eight; the per-position term
(``draft_depth``) prices both."""

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
    fixed, per_draft, per_position = model.draft_correction
    assert fixed > 1 and per_draft > 1 and per_position == 0  # never exercised: stays as calibrated (0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.floats(0.01, 1000.0)), min_size=1, max_size=50))
def test_factors_stay_finite_and_non_negative(measurements: list[tuple[int, float]]) -> None:
    model = StepTimeModel(HYDRA)
    for n, ms in measurements:
        model.observe_draft(n, ms, depth=min(n, 4))
        factors = np.array(model.draft_correction)
        assert np.isfinite(factors).all() and (factors >= 0).all()
        assert model.draft_ms(n, min(n, 4)) > 0


def test_the_state_round_trips_every_term() -> None:
    model = StepTimeModel(HYDRA)
    for rows, depth in ((1, 4), (8, 4), (8, 1)) * 30:
        model.observe_draft(rows * depth, hydra_by_position_ms(rows, depth), depth)
    assert model.draft_correction[2] > 0
    again = StepTimeModel.from_state(model.state())
    for n, depth in ((4, 4), (16, 2), (32, 4)):
        assert abs(again.draft_ms(n, depth) - model.draft_ms(n, depth)) < 1e-3
    old = StepTimeModel.from_state({"cost": model.state()["cost"], "draft_correction": 1.5})  # one factor
    assert abs(old.draft_ms(8, 4) - 1.5 * HYDRA.draft_ms(8)) < 1e-9  # the uncalibrated term stays at 0
    two = StepTimeModel.from_state({"cost": model.state()["cost"], "draft_correction": [1.5, 1.5]})  # before the term
    assert abs(two.draft_ms(8, 4) - 1.5 * HYDRA.draft_ms(8)) < 1e-9


def hydra_by_position_ms(rows: int, depth: int) -> float:
    """Hydra's drafting as measured by rows and depth on the demo model (ms)."""
    return 0.2 + depth * (0.32 + 0.035 * rows)


def test_drafting_by_position_is_priced_at_every_batch_size() -> None:
    """Steps at one row and at eight, mixed as a closed loop's waves mix them: the fit with the
    per-position term prices both within 5%, where one per draft was 2-3x off at one of them."""
    model = StepTimeModel(HYDRA)
    for _ in range(20):
        for rows, depth in ((8, 4), (8, 3), (6, 4), (4, 2), (2, 4), (1, 4), (1, 1), (8, 1)):
            model.observe_draft(rows * depth, hydra_by_position_ms(rows, depth), depth)
    for rows in (1, 2, 4, 8):
        for depth in (1, 2, 4):
            assert abs(model.draft_ms(rows * depth, depth) / hydra_by_position_ms(rows, depth) - 1) < 0.05, (rows, depth)


def test_the_controller_prices_the_deepest_position_once() -> None:
    """With a per-position cost, a plan's drafting is priced by its deepest slot, paid once: eight
    rows at depth 2 cost 2 positions, not 16, and the goodput curve says so."""
    cost = replace(HYDRA, draft=0.2, draft_token=0.035, draft_depth=0.32)
    policy = GoodputPolicy(StepTimeModel(cost), AcceptanceModel([0.9, 0.8, 0.7, 0.6]))
    rows = StepRows(tuple("abcdefgh"), np.full(8, 4), np.full(8, 200))
    g, slot_rows, times = policy.goodput(rows)
    step = policy.model.step_ms(8, 8 + 16, 1600, True, verified=16)
    assert abs(times[16] - (step + hydra_by_position_ms(8, 2))) < 1e-9  # the 16 best slots: every row's first two
    assert np.bincount(slot_rows[:16], minlength=8).tolist() == [2] * 8
