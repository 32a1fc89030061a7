"""The per-request spec_k patch: idempotence, and the capping on a stand-in runner."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from specserve_vllm.compat import spec_length


def test_apply_is_idempotent() -> None:
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    spec_length.apply()
    first = (GPUModelRunner.propose_draft_token_ids, InputProcessor._validate_params)
    spec_length.apply()
    assert (GPUModelRunner.propose_draft_token_ids, InputProcessor._validate_params) == first
    assert getattr(first[0], "__wrapped__").__name__ == "propose_draft_token_ids"
    # Other patches (the hidden-state feed) may wrap the same method; spec_length wraps it once.
    chain, fn = [], first[0]
    while fn is not None:
        chain.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    ours = [f for f in chain if f.__code__.co_filename == spec_length.__file__]
    assert len(ours) == 1, "wrapped exactly once"


def _runner(extra_args: list[dict | None]) -> SimpleNamespace:
    req_ids = [f"r{i}" for i in range(len(extra_args))]
    requests = {
        rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=ea)) for rid, ea in zip(req_ids, extra_args)
    }
    return SimpleNamespace(input_batch=SimpleNamespace(req_ids=req_ids), requests=requests)


def test_caps_lists_and_tensors_per_request() -> None:
    runner = _runner([None, {"spec_k": 0}, {"spec_k": 2}, {"spec_k": "bad"}])
    assert spec_length.request_caps(runner) == [None, 0, 2, None]
    drafts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    assert spec_length._cap_runner_drafts(runner, drafts) == [[1, 2, 3], [], [7, 8], [1, 1, 1]]
    as_tensor = spec_length._cap_runner_drafts(runner, torch.tensor(drafts))
    assert as_tensor == [[1, 2, 3], [], [7, 8], [1, 1, 1]]


def test_caps_are_parsed_once_per_request_and_forgotten_when_it_finishes() -> None:
    from specserve_vllm.spec_control.planner import StepPlanner
    from specserve_vllm.spec_control.plan import FixedPolicy

    runner = _runner([{"spec_k": 1}, None])
    planner = StepPlanner(FixedPolicy(), 4)
    assert spec_length.request_caps(runner, planner.spec_ks) == [1, None]
    assert planner.spec_ks == {"r0": 1, "r1": None}
    runner.requests["r0"].sampling_params.extra_args = {"spec_k": 3}  # not read again while r0 runs
    assert spec_length.request_caps(runner, planner.spec_ks) == [1, None]
    planner.finished(frozenset({"r0"}))
    assert planner.spec_ks == {"r1": None}
    assert spec_length.request_caps(runner, planner.spec_ks) == [3, None]
    planner.spec_ks.update({f"gone{i}": 0 for i in range(spec_length.KNOWN_CAPS_LIMIT)})  # finishes never seen
    assert spec_length.request_caps(runner, planner.spec_ks) == [3, None]
    assert set(planner.spec_ks) == {"r0", "r1"}, "the cache starts over past its limit"


def test_no_caps_leaves_drafts_untouched() -> None:
    runner = _runner([None, {"temperature_hint": 1}])
    drafts = torch.zeros(2, 3, dtype=torch.int32)
    assert spec_length._cap_runner_drafts(runner, drafts) is drafts
