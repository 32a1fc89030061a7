"""The draft hand-off with step outputs (``compat.draft_handoff``): what is attached and taken."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput

from specserve_vllm.compat import draft_handoff


def _runner(drafts: Any, spec: bool = True, async_scheduling: bool = False) -> SimpleNamespace:
    runner = SimpleNamespace(speculative_config=object() if spec else None, use_async_scheduling=async_scheduling,
                             _draft_token_ids=drafts)
    runner.take_draft_token_ids = lambda: DraftTokenIds(["a", "b"], drafts)
    return runner


def test_cpu_list_drafts_travel_with_the_pickled_output_and_are_taken_once() -> None:
    out = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1})
    draft_handoff.attach_drafts(_runner([[5, 6], []]), out)
    received = pickle.loads(pickle.dumps(out))  # what the engine core gets from the worker
    scheduler = SimpleNamespace()
    draft_handoff.keep_drafts(scheduler, received)
    assert not hasattr(received, draft_handoff.OUTPUT_ATTR), "taken off the output"
    kept = draft_handoff.kept_drafts(scheduler)
    assert kept.req_ids == ["a", "b"] and kept.draft_token_ids == [[5, 6], []]
    assert draft_handoff.kept_drafts(scheduler) is draft_handoff._MISSING, "used once"


def test_all_empty_drafts_of_an_unconstrained_step_skip_the_scheduler_update() -> None:
    from vllm.v1.engine.core import EngineCore

    draft_handoff.apply()
    for constrained, drafts, expected in ((False, [[], []], None), (True, [[], []], [[], []]),
                                          (False, [[], [3]], [[], [3]])):
        out = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1})
        draft_handoff.attach_drafts(_runner(drafts), out, constrained=constrained)
        updates: list[Any] = []
        scheduler = SimpleNamespace(update_draft_token_ids=updates.append)
        draft_handoff.keep_drafts(scheduler, pickle.loads(pickle.dumps(out)))
        core = SimpleNamespace(scheduler=scheduler, model_executor=SimpleNamespace(), check_for_draft_tokens=True,
                               async_scheduling=False)
        EngineCore.post_step(core, True)  # never asks the worker: its answer was kept
        assert [u.draft_token_ids for u in updates] == ([] if expected is None else [expected])


def test_the_wrap_reads_whether_the_step_had_a_grammar_output() -> None:
    out = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1})

    def sample_tokens(self: Any, grammar_output: Any) -> Any:
        return out

    wrapped = draft_handoff.wrap_sample_tokens(sample_tokens)
    cases: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = [
        ((None,), {}, None),  # no grammar output: nothing for the scheduler to do
        ((), {"grammar_output": object()}, [[], []]),  # a constrained request: the lists go through
    ]
    for args, kwargs, expected in cases:
        assert wrapped(_runner([[], []]), *args, **kwargs) is out
        drafts = out.__dict__.pop(draft_handoff.OUTPUT_ATTR)
        assert (drafts if drafts is None else drafts.draft_token_ids) == expected


def test_behind_a_wrap_that_hides_the_signature_every_step_counts_as_constrained() -> None:
    out = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1})

    def opaque(self: Any, *args: Any, **kwargs: Any) -> Any:
        return out

    assert draft_handoff.wrap_sample_tokens(opaque)(_runner([[], []]), None) is out
    assert out.__dict__.pop(draft_handoff.OUTPUT_ATTR).draft_token_ids == [[], []]


def test_nothing_attached_where_upstream_must_ask_the_worker() -> None:
    import torch

    for runner in (_runner(torch.zeros(2, 3)),  # a GPU drafter's tensor: waits on a device copy
                   _runner([[1]], async_scheduling=True), _runner(None, spec=False)):
        out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
        draft_handoff.attach_drafts(runner, out)
        scheduler = SimpleNamespace()
        draft_handoff.keep_drafts(scheduler, out)
        assert draft_handoff.kept_drafts(scheduler) is draft_handoff._MISSING


def test_post_step_answers_kept_drafts_without_the_call_and_restores_the_executor() -> None:
    from vllm.v1.engine.core import EngineCore

    draft_handoff.apply()
    updates: list[Any] = []
    calls: list[str] = []

    class Executor:
        def take_draft_token_ids(self) -> Any:
            calls.append("rpc")
            return DraftTokenIds(["a"], [[9]])

    scheduler = SimpleNamespace(update_draft_token_ids=updates.append)
    core = SimpleNamespace(scheduler=scheduler, model_executor=Executor(), check_for_draft_tokens=True,
                           async_scheduling=False)
    kept = DraftTokenIds(["a"], [[1, 2]])
    scheduler._specserve_kept_drafts = kept
    EngineCore.post_step(core, True)
    assert updates == [kept] and calls == [] and "take_draft_token_ids" not in vars(core.model_executor)
    EngineCore.post_step(core, True)  # nothing kept: upstream asks the executor
    assert calls == ["rpc"] and updates[-1].draft_token_ids == [[9]]
