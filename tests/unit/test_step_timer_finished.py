"""Finished requests leave the planner at every step, also at steps that schedule nothing.

vLLM's runner returns from ``execute_model`` early when a step schedules no tokens and is then
not asked to ``sample_tokens``, where drafting (and the planner's bookkeeping) runs. A request
aborted while nothing was scheduled reaches the runner only through that step's
``finished_req_ids``: the step timer's ``execute_model`` wrap hands those to the planner."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from specserve_vllm.compat import step_timer
from specserve_vllm.compat.spec_length import PLANNER_ATTR
from specserve_vllm.spec_control.acceptance import AcceptanceModel
from specserve_vllm.spec_control.goodput import GoodputPolicy
from specserve_vllm.spec_control.plan import VerifiedRows
from specserve_vllm.spec_control.planner import StepPlanner
from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel

COST = StepCost(base=4, per_token=0.05, per_row=0.1, context=0, spec=1.5, spec_row=0.02, draft=0.5, draft_token=0.05)


class StubRunner:
    """Stands in for ``GPUModelRunner``: an empty step returns before any model work."""

    def __init__(self) -> None:
        self.speculative_config = SimpleNamespace(num_speculative_tokens=4)
        self.executed: list[Any] = []

    def execute_model(self, scheduler_output: Any) -> Any:
        self.executed.append(scheduler_output)
        return None

    def sample_tokens(self, grammar_output: Any = None) -> Any:
        raise AssertionError("not called after a step that scheduled nothing")


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> StubRunner:
    import vllm.v1.worker.gpu_model_runner as gmr

    monkeypatch.setattr(gmr, "GPUModelRunner", StubRunner)
    step_timer.apply()
    return StubRunner()


def _empty_step(finished: set[str]) -> SimpleNamespace:
    return SimpleNamespace(finished_req_ids=finished, num_scheduled_tokens={}, total_num_scheduled_tokens=0,
                           scheduled_spec_decode_tokens={})


def test_a_request_finished_in_an_empty_step_leaves_the_planner(runner: StubRunner) -> None:
    policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.6] * 4))
    planner = StepPlanner(policy, 4)
    setattr(runner, PLANNER_ATTR, planner)
    planner.spec_ks.update({"gone": 2, "stays": None})
    policy.observe(VerifiedRows(("gone", "stays"), np.array([4, 4]), np.array([4, 1])))
    policy.learn()
    acceptance = policy.acceptance
    assert {"gone", "stays"} <= set(acceptance._slot)

    runner.execute_model(_empty_step({"gone"}))

    assert len(runner.executed) == 1  # the upstream call still ran
    assert "gone" not in planner.spec_ks and "stays" in planner.spec_ks
    assert "gone" not in acceptance._slot and "stays" in acceptance._slot


def test_a_step_without_finishes_leaves_the_planner_alone(runner: StubRunner) -> None:
    planner = StepPlanner(GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.6] * 4)), 4)
    setattr(runner, PLANNER_ATTR, planner)
    planner.spec_ks["a"] = 3
    runner.execute_model(_empty_step(set()))
    assert planner.spec_ks == {"a": 3}
