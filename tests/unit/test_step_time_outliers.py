"""One slow step must not price the speculative path out for good.

A drafter's first call can take a second (kernels compiled on first use) against a 6 ms step; an
unbounded EWMA then priced the spec path at ~100 ms, the controller never took it again, and no
measurement came back to correct it (n-gram drafting stayed off under the goodput policy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from specserve_vllm.spec_control.acceptance import AcceptanceModel
from specserve_vllm.spec_control.goodput import GoodputPolicy
from specserve_vllm.spec_control.plan import StepRows
from specserve_vllm.spec_control.step_time import FOLD_EVERY, LEVEL_RATE, MAX_STEP_RATIO, StepCost, StepTimeModel

COST = StepCost(base=4, per_token=0.05, per_row=0.1, context=0, spec=1.5, spec_row=0.02, draft=0.5, draft_token=0.05)


def test_outliers_move_a_prediction_by_a_bounded_step() -> None:
    """A run of steps 200x slow: between folds the level follows them at most
    ``MAX_STEP_RATIO``-fold; a fold of them moves the fit by less than that."""
    model = StepTimeModel(COST)
    raw = COST.step_ms(1, 5, 0, True)
    model.observe(1, 5, 0, True, measured_ms=raw * 200)
    assert model.step_ms(1, 5, 0, True) / raw == pytest.approx(1 + LEVEL_RATE * (MAX_STEP_RATIO - 1))
    for _ in range(FOLD_EVERY - 2):
        model.observe(1, 5, 0, True, measured_ms=raw * 200)
        assert 1.0 < model.step_ms(1, 5, 0, True) / raw <= MAX_STEP_RATIO
    model.observe(1, 5, 0, True, measured_ms=raw * 200)  # the fold
    assert not model.step_fit.pending and model.level == 1.0
    assert 1.0 < model.step_ms(1, 5, 0, True) / raw < MAX_STEP_RATIO
    for _ in range(FOLD_EVERY):
        model.observe_draft(4, measured_ms=COST.draft_ms(4) * 500)
    assert 1.0 < model.draft_ms(4) / COST.draft_ms(4) < MAX_STEP_RATIO


def test_a_real_slowdown_still_converges() -> None:
    model = StepTimeModel(COST)
    raw = COST.step_ms(1, 1, 0, False)
    for _ in range(80):
        model.observe(1, 1, 0, False, measured_ms=raw * 3)
    assert abs(model.step_ms(1, 1, 0, False) / raw - 3) < 0.05


def test_the_controller_speculates_again_after_a_slow_first_spec_step() -> None:
    policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.6] * 4))
    rows = StepRows(("a",), np.array([4]), np.array([50]))
    assert policy.plan(rows).tolist() == [4]
    policy.observe_step(1, 5, 50, True, 0, step_ms=1500.0, drafts=4, draft_ms=900.0)  # first call: compiling
    plans = []
    for _ in range(3):
        plans.append(policy.plan(rows).tolist())
        policy.observe_step(1, 5, 50, True, 0, step_ms=COST.step_ms(1, 5, 50, True), drafts=4,
                            draft_ms=COST.draft_ms(4))
    assert plans == [[4]] * 3


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(0, 512), st.integers(0, 20000), st.booleans(),
                          st.floats(0.01, 5000.0)), min_size=1, max_size=60))
def test_any_measurements_leave_finite_positive_predictions(
        steps: list[tuple[int, int, int, bool, float]]) -> None:
    """Whatever the host measures, the fit keeps pricing every step above 0: a zero price
    would stop it learning (it skips steps it predicts at 0) and make every plan free."""
    model = StepTimeModel(COST)
    for rows, extra, ctx, spec, ms in steps:
        model.observe(rows, rows + extra, ctx, spec, ms)
        coef = np.array(model.coef)
        assert np.isfinite(coef).all() and (coef >= 0).all() and 0 < model.level <= MAX_STEP_RATIO
        for probe in ((1, 1, 0, False), (8, 40, 1600, True), (rows, rows + extra, ctx, spec)):
            assert np.isfinite(model.step_ms(*probe)) and model.step_ms(*probe) > 0


def test_the_spec_paths_price_outlasts_a_stretch_of_plain_steps() -> None:
    """Speculative steps (between plain ones) measured at half their calibrated extra cost,
    then 400 plain steps: the spec path keeps the price it learnt (it used to fade back to the
    calibration's, so a controller that stopped speculating on a host unlike the calibration's
    stayed off)."""
    model = StepTimeModel(COST)
    spec_extra = COST.step_ms(1, 5, 0, True) - COST.step_ms(1, 5, 0, False)
    measured_spec = COST.step_ms(1, 5, 0, False) + 0.5 * spec_extra
    for _ in range(4 * FOLD_EVERY):
        model.observe(1, 5, 0, True, measured_ms=measured_spec)
        model.observe(1, 1, 0, False, measured_ms=COST.step_ms(1, 1, 0, False))
    learnt = model.step_ms(1, 5, 0, True)
    assert learnt == pytest.approx(measured_spec, rel=0.03)
    for _ in range(25 * FOLD_EVERY):
        model.observe(1, 1, 0, False, measured_ms=COST.step_ms(1, 1, 0, False))
    assert model.step_ms(1, 5, 0, True) == pytest.approx(learnt, rel=0.03)
    assert model.step_ms(1, 1, 0, False) == pytest.approx(COST.step_ms(1, 1, 0, False), rel=0.03)
