"""The per-step draft plan and the non-speculative step: drift, and behaviour on stand-in runners."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from specserve_vllm.compat import no_spec_step, spec_length
from specserve_vllm.drafters.recycling_proposer import RecyclingProposer
from specserve_vllm.spec_control.plan import JitterPolicy
from specserve_vllm.spec_control.planner import InvalidSpecPolicy, StepPlanner, settings_from


def test_prepare_inputs_reads_the_spec_config_once_and_only_to_branch() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    source = inspect.getsource(inspect.unwrap(GPUModelRunner._prepare_inputs))
    assert source.count("speculative_config") == 1
    assert "use_spec_decode = self.speculative_config is not None" in source
    sample = inspect.getsource(inspect.unwrap(GPUModelRunner._sample))
    assert "if spec_decode_metadata is None:\n            return self.sampler(" in sample


def test_propose_arguments_the_plan_reads_exist() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    names = inspect.signature(inspect.unwrap(GPUModelRunner.propose_draft_token_ids)).parameters
    assert set(spec_length.ARGUMENTS) <= set(names)


def test_request_state_holds_what_the_room_reads() -> None:
    from dataclasses import fields

    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    assert {"sampling_params", "output_token_ids"} <= {f.name for f in fields(CachedRequestState)}


def test_apply_is_idempotent() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    no_spec_step.apply()
    first = GPUModelRunner._prepare_inputs
    no_spec_step.apply()
    assert GPUModelRunner._prepare_inputs is first


class _Runner:
    """Enough of a runner for the ``_prepare_inputs`` wrap: records the config it saw."""

    def __init__(self, hybrid: bool = False) -> None:
        self.speculative_config = SimpleNamespace(num_speculative_tokens=4)
        self.model_config = SimpleNamespace(is_hybrid=hybrid)
        self.seen: list[Any] = []

    def _prepare_inputs(self, scheduler_output: Any) -> str:
        self.seen.append(self.speculative_config)
        return "spec" if self.speculative_config is not None else "plain"


def _wrapped(runner: _Runner, drafts: dict[str, list[int]]) -> str:
    return no_spec_step.prepare_inputs(runner, _Runner._prepare_inputs,
                                       SimpleNamespace(scheduled_spec_decode_tokens=drafts))


def test_a_step_without_drafts_takes_the_plain_branch_and_restores_the_config() -> None:
    runner = _Runner()
    config = runner.speculative_config
    assert _wrapped(runner, {}) == "plain"
    assert _wrapped(runner, {"a": [], "b": []}) == "plain"
    assert _wrapped(runner, {"a": [], "b": [5]}) == "spec"
    assert runner.seen == [None, None, config] and runner.speculative_config is config
    assert runner._specserve_no_spec_steps == 2
    assert _wrapped(_Runner(hybrid=True), {}) == "spec"


def _plan_runner(spec_ks: list[int | None], policy: Any = None) -> SimpleNamespace:
    req_ids = [f"r{i}" for i in range(len(spec_ks))]
    requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None if k is None else {"spec_k": k}))
                for r, k in zip(req_ids, spec_ks)}
    drafter = SimpleNamespace(lengths=None)
    drafter.set_draft_lengths = lambda lengths: setattr(drafter, "lengths", lengths.tolist())
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=req_ids, num_tokens_no_spec=np.full(len(spec_ks), 10),
                                    num_prompt_tokens=np.full(len(spec_ks), 8),
                                    num_computed_tokens_cpu=np.full(len(spec_ks), 9)),
        requests=requests, drafter=drafter, speculative_config=SimpleNamespace(num_speculative_tokens=3),
        vllm_config=SimpleNamespace(additional_config={"specserve": {"spec_policy": policy or "fixed"}}))
    return runner


def _output(drafts: dict[str, list[int]] | None = None) -> SimpleNamespace:
    return SimpleNamespace(scheduled_spec_decode_tokens=drafts or {}, finished_req_ids=set(),
                           num_scheduled_tokens={})


def test_all_zero_plan_skips_the_drafter() -> None:
    runner = _plan_runner([0, 0, 2])
    calls: list[int] = []
    # Row 2 sampled nothing (a prefill chunk): it is not a decode row, so the plan is all zeros.
    out = spec_length.plan_drafts(runner, _output(), [[1], [2], []], lambda: calls.append(1))
    assert out == [[], [], []] and calls == []
    stats = runner._specserve_planner.stats
    assert (stats.steps, stats.no_spec_steps, stats.drafter_calls) == (1, 1, 0)
    # Counted as a plan with no decode rows, as a policy's all-zero plan is.
    assert stats.by_batch == {"0": {"plans": 1, "rows": 0, "drafts": 0, "no_spec": 1}}
    assert stats.k_rows == {} and stats.decode_rows == 0


def test_plan_is_passed_into_the_drafter_and_enforced_after() -> None:
    runner = _plan_runner([None, 1, 0, 5])
    drafts = [[7, 7, 7], [8, 8, 8], [9, 9, 9], [6, 6, 6]]
    out = spec_length.plan_drafts(runner, _output(), [[1], [2], [3], [4]], lambda: drafts)
    assert runner.drafter.lengths == [3, 1, 0, 3]
    assert out == [[7, 7, 7], [8], [], [6, 6, 6]]


def test_rows_draft_no_more_than_they_can_still_commit() -> None:
    # max_tokens 10: with 2, 8 and 10 tokens out, the next step can commit 8, 2 and 0 tokens,
    # one of them the target's own, so the rows draft at most 7 (k = 3 here), 1 and 0.
    runner = _plan_runner([None, None, None])
    for state, out in zip(runner.requests.values(), (2, 8, 10)):
        state.sampling_params.max_tokens, state.output_token_ids = 10, [5] * out
    drafts = [[7, 7, 7]] * 3
    assert spec_length.plan_drafts(runner, _output(), [[1], [2], [3]], lambda: drafts) == [[7, 7, 7], [7], []]
    assert runner.drafter.lengths == [3, 1, 0]
    assert spec_length.request_room(runner) == [8, 2, 0]


def test_drafting_is_timed_for_the_work_done() -> None:
    # A drafter told the plan is timed for the plan; one that cannot be told drafts k for every row.
    runner = _plan_runner([None, 1, 0, 2])
    spec_length.plan_drafts(runner, _output(), [[1], [2], [3], [4]], lambda: [[7, 7, 7]] * 4)
    drafts, depth, _ = runner._specserve_planner.take_draft_timing()
    assert (drafts, depth) == (6, 3)
    runner = _plan_runner([None, 1, 0, 2])
    del runner.drafter.set_draft_lengths
    out = spec_length.plan_drafts(runner, _output(), [[1], [2], [3], [4]], lambda: [[7, 7, 7]] * 4)
    assert out == [[7, 7, 7], [7], [], [7, 7]]
    drafts, depth, _ = runner._specserve_planner.take_draft_timing()
    assert (drafts, depth) == (12, 3)


def test_off_policy_never_drafts_and_verified_rows_reach_the_policy() -> None:
    runner = _plan_runner([None, None], policy="off")
    out = spec_length.plan_drafts(runner, _output({"r0": [5, 6, 7]}), [[5, 9], [1]], lambda: 1 / 0)
    assert out == [[], []]
    verified = spec_length.verified_rows(_output({"r0": [5, 6, 7]}), ["r0", "r1"], [[5, 9], [1]])
    assert verified.positions() == [("r0", 3, 1)]


def test_recycling_drafts_only_planned_rows_and_depths() -> None:
    config = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=3),
                             model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 6))
    proposer = RecyclingProposer(config, topk_width=1)
    proposer.matrix[:, 0] = [1, 2, 3, 4, 5, 0]  # t -> t + 1
    tokens = np.array([[0, 1, 0], [0, 3, 0], [0, 2, 0]])
    n = np.array([2, 2, 2])
    assert proposer.propose([[1], [3], [2]], n, tokens) == [[2, 3, 4], [4, 5, 0], [3, 4, 5]]
    proposer.set_draft_lengths(np.array([2, 0, 1]))
    assert proposer.propose([[1], [3], [2]], n, tokens) == [[2, 3], [], [3]]
    # The plan is used once.
    assert proposer.propose([[1], [3], [2]], n, tokens)[1] == [4, 5, 0]


def test_planner_settings_and_caps() -> None:
    with pytest.raises(InvalidSpecPolicy):
        settings_from({"specserve": {"spec_policy": "sometimes"}}, env={})
    planner = StepPlanner(JitterPolicy(3), num_speculative_tokens=4)
    rows = planner.rows(["a", "b", "c"], planner.caps([None, 9, 2], [1, 2, 0]), np.array([5, 5, 5]))
    assert rows.caps.tolist() == [4, 4, 0]
    for _ in range(30):
        plan = planner.plan(rows)
        assert 0 <= plan[0] <= 4 and 0 <= plan[1] <= 4 and plan[2] == 0
    assert planner.stats.no_spec_steps > 0 and planner.stats.steps == 30


def test_a_held_plan_skips_the_batch_description_and_the_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under goodput, a step whose batch is unchanged reuses the held decision: the runner's
    batch is not described (no sampling classes read) and the policy does not decide; the
    step still counts as a plan."""
    runner = _plan_runner([None], policy="goodput")
    described: list[int] = []
    classes = spec_length.request_classes
    monkeypatch.setattr(spec_length, "request_classes", lambda r: (described.append(1), classes(r))[1])
    drafts = [[7, 7, 7]]
    spec_length.plan_drafts(runner, _output(), [[1]], lambda: drafts)  # idle, fresh: a decision
    planner = runner._specserve_planner
    policy = planner.policy
    first, held = planner.stats.steps, policy.recheck_on - 1
    decide = policy.plan
    monkeypatch.setattr(policy, "plan", lambda rows: pytest.fail("decided while a plan was held"))
    for _ in range(held):
        out = spec_length.plan_drafts(runner, _output(), [[1]], lambda: drafts)
        assert out == drafts[:1] or out == [drafts[0][: len(out[0])]]
    assert described == [1] and planner.stats.steps == first + held
    monkeypatch.setattr(policy, "plan", decide)
    spec_length.plan_drafts(runner, _output(), [[1]], lambda: drafts)  # the hold ran out
    assert described == [1, 1]


def test_prefill_left_counts_the_prompt_tokens_chunked_prefills_still_schedule() -> None:
    batch = SimpleNamespace(req_ids=["done", "chunked", "last-chunk"], num_prompt_tokens=np.array([50, 900, 300]),
                            num_computed_tokens_cpu=np.array([60, 256, 44]))
    runner = SimpleNamespace(input_batch=batch, max_num_tokens=512)
    step = SimpleNamespace(num_scheduled_tokens={"done": 1, "chunked": 256, "last-chunk": 256})
    assert spec_length.prefill_left(runner, step) == 900 - 256 - 256
    runner.max_num_tokens = 128
    assert spec_length.prefill_left(runner, step) == 128  # the next step's token budget


def test_input_batch_holds_what_prefill_left_reads() -> None:
    from dataclasses import fields

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import InputBatch

    source = inspect.getsource(InputBatch.__init__)
    assert "self.num_prompt_tokens = " in source and "self.num_computed_tokens_cpu = " in source
    assert "num_scheduled_tokens" in {f.name for f in fields(SchedulerOutput)}
