"""The engine's time between steps: measured by the step timer while requests continue, and
counted in the step's price when ``price_gap`` is on (the default)."""

from __future__ import annotations

import doctest
from dataclasses import fields
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest
from specserve_vllm.compat import step_timer
from specserve_vllm.compat.spec_length import PLANNER_ATTR
from specserve_vllm.compat.step_timer import StepRecord
from specserve_vllm.spec_control.planner import FixedPolicy, StepPlanner, settings_from


class TimedRunner:
    """Stands in for ``GPUModelRunner``: one request ``a`` in the batch, steps that do nothing."""

    def __init__(self) -> None:
        self.speculative_config = NS(num_speculative_tokens=4)
        self.input_batch = NS(req_ids=["a"], num_tokens_no_spec=np.array([10]))

    def execute_model(self, scheduler_output: Any) -> Any:
        return None

    def sample_tokens(self, grammar_output: Any = None) -> Any:
        return "sampled"


def _step(tokens: int, continued: list[str]) -> NS:
    return NS(finished_req_ids=set(), num_scheduled_tokens={"a": tokens}, total_num_scheduled_tokens=tokens,
              scheduled_spec_decode_tokens={}, scheduled_cached_reqs=NS(req_ids=continued))


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> TimedRunner:
    import vllm.v1.worker.gpu_model_runner as gmr

    monkeypatch.setattr(gmr, "GPUModelRunner", TimedRunner)
    step_timer.apply()
    return TimedRunner()


def test_the_gap_is_measured_only_while_a_request_continues(runner: TimedRunner,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    planner = StepPlanner(FixedPolicy(), 4)
    setattr(runner, PLANNER_ATTR, planner)
    clock = iter([10.000, 10.004,    # prefill of a: starts, ends
                  10.0055, 10.0085,  # a continues 1.5 ms later
                  10.0500, 10.0530])  # a new request 41.5 ms later (the engine may have idled)
    monkeypatch.setattr(step_timer.time, "perf_counter", lambda: next(clock))
    for so in (_step(10, []), _step(1, ["a"]), _step(10, [])):
        runner.execute_model(so)
        assert runner.sample_tokens() == "sampled"
    gaps = [r.gap_ms for r in planner.records]
    assert gaps[0] == 0.0 and gaps[1] == pytest.approx(1.5) and gaps[2] == 0.0
    assert [round(r.total_ms, 6) for r in planner.records] == [4.0, 3.0, 3.0]


class RecordingPolicy(FixedPolicy):
    def __init__(self) -> None:
        self.step_ms: list[float] = []

    def observe_step(self, *args: Any) -> float:
        self.step_ms.append(args[5])
        return 0.0


@pytest.mark.parametrize("price_gap", [True, False])
def test_the_gap_counts_in_the_step_price_only_when_priced(price_gap: bool) -> None:
    policy = RecordingPolicy()
    planner = StepPlanner(policy, 4, price_gap=price_gap)
    record = StepRecord(rows=2, tokens=2, ctx_tokens=100, spec=False, drafts_verified=0, prefill_tokens=0,
                        total_ms=5.0, drafts=0, draft_ms=1.0, gap_ms=0.75)
    planner.observe_step(record)
    assert policy.step_ms == [4.75 if price_gap else 4.0]


def test_price_gap_is_an_engine_setting_on_by_default() -> None:
    assert settings_from({}, env={}).price_gap is True
    assert settings_from({"specserve": {"price_gap": False}}, env={}).price_gap is False


def test_vllm_still_names_the_requests_that_continue() -> None:
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    assert "scheduled_cached_reqs" in {f.name for f in fields(SchedulerOutput)}
    assert "req_ids" in {f.name for f in fields(CachedRequestData)}


def test_docstring_examples() -> None:
    assert doctest.testmod(step_timer).failed == 0
