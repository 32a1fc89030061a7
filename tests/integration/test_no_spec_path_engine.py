"""The per-step draft plan on the real vLLM engine (CPU, in-process, demo model, fp32).

* Greedy outputs equal a no-drafter engine's token for token while k changes per request and per
  step (the ``jitter`` policy: a random length in ``[0, cap]`` per row and step, and whole steps
  off), with requests capped at different ``spec_k`` in the same batch, at batch 1 and 8, for
  Token Recycling and Hydra.
* The same with the ``goodput`` controller choosing k each step (recycling): outputs equal, and
  the controller did change k (speculating steps and non-speculative ones, several lengths).
* Steps without drafts score what the drafts they skipped would have done (hindsight).
* A step in which every row has k = 0 takes vLLM's non-speculative branch: no verification
  (neither vLLM's rejection sampler nor the walk that verifies chains by default) and no call
  of the drafter's ``propose``, the plain sampler is called, and the state feeds keep running
  (the recycling matrix keeps changing). The same engine with drafts walks its chains and
  proposes, so the spies can see it.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support.spec_runs import PROMPTS, greedy, heads_env, walked_chain_steps

from specserve.speculative_config import speculative_config
from specserve.engine.local import local_llm, model_runner

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

K = 4
MAX_TOKENS = 40
SPEC_KS: list[int | None] = [None, 0, 1, 2, 3, None, 4, 2]  # per request of the batch of 8
DRAFTERS = ("recycling", "hydra")


def _engine(model_dir: Path, spec: dict[str, Any] | None, policy: str | None = None,
            calibration: str | None = None) -> Any:
    ours: dict[str, Any] = {"spec_policy": policy, "seed": 7}
    if calibration:
        ours["calibration"] = calibration
    extra = {"additional_config": {"specserve": ours}} if policy else {}
    return local_llm(model_dir, max_num_seqs=8, speculative_config=spec, dtype="float32",
                     per_request_spec_decode_metrics="detailed" if spec else "none", **extra)


def _args(spec_k: int | None) -> dict[str, Any] | None:
    return None if spec_k is None else {"spec_k": spec_k}


def _generate(llm: Any, prompts: list[str], spec_ks: list[int | None]) -> list[Any]:
    params = [greedy(MAX_TOKENS, _args(k)) for k in spec_ks]
    return [r.outputs[0] for r in llm.generate(prompts, params, use_tqdm=False)]


def _runs(llm: Any) -> dict[str, Any]:
    batch1 = [_generate(llm, [p], [k])[0] for p, k in zip(PROMPTS[:3], SPEC_KS[:3])]
    batch8 = _generate(llm, PROMPTS, SPEC_KS)
    return {"batch1": [list(o.token_ids) for o in batch1], "batch8": [list(o.token_ids) for o in batch8],
            "outputs": batch8}


def _runner(llm: Any) -> Any:
    """The in-process model runner (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one worker)."""
    return model_runner(llm)


class _Spy:
    """Counts calls to ``target`` and forwards them."""

    def __init__(self, target: Callable[..., Any]) -> None:
        self.target, self.calls = target, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.target(*args, **kwargs)


@pytest.fixture(scope="module")
def runs(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from specserve.head_training import demo_heads_dir

    out: dict[str, Any] = {}
    llm = _engine(demo_model_dir, None)
    out["none"] = _runs(llm)
    del llm
    gc.collect()
    for drafter in DRAFTERS:
        heads = str(demo_heads_dir(drafter)) if drafter == "hydra" else None
        with heads_env(heads):
            llm = _engine(demo_model_dir, speculative_config(drafter, K), policy="jitter")  # type: ignore[arg-type]
        out[drafter] = _runs(llm)
        runner = _runner(llm)
        out[drafter]["stats"] = runner._specserve_planner.stats.snapshot()
        if drafter == "recycling":
            out["spies"] = _spied_runs(llm, runner)
        del llm, runner
        gc.collect()
    llm = _engine(demo_model_dir, speculative_config("recycling", K), policy="goodput",
                  calibration=str(_break_even_calibration(tmp_path_factory.mktemp("calibration"))))
    out["goodput"] = _runs(llm)
    from vllm import SamplingParams

    policy = _runner(llm)._specserve_planner.policy
    out["goodput"]["classes_greedy"] = policy.acceptance.seen_classes()
    for seed, prompt in enumerate(PROMPTS[:2]):  # one at a time: batch 1 speculates under this calibration
        llm.generate([prompt], SamplingParams(temperature=0.8, seed=seed, max_tokens=MAX_TOKENS), use_tqdm=False)
    out["goodput"]["classes_after_sampled"] = policy.acceptance.seen_classes()
    out["goodput"]["stats"] = _runner(llm)._specserve_planner.stats.snapshot()
    del llm, policy
    gc.collect()
    yield out


def _break_even_calibration(directory: Path) -> Path:
    """A calibration whose break-even falls between batch 1 (speculate) and batch 8 (do not) on
    this small batch. Written out in full, so that a new shipped calibration leaves it alone."""
    data = {
        "cost": {"base": 6.9, "per_token": 1.0, "per_row": 1.2, "context": 0.0, "spec": 4.0,
                 "spec_row": 1.5, "draft": 0.3, "draft_token": 0.06},
        "drafter_cost": {"RecyclingProposer": [0.3, 0.06]},
        "acceptance": {"RecyclingProposer": [0.82, 0.8, 0.83, 0.84]},
        "source": "test: break-even between batch 1 and batch 8",
    }
    path = directory / "calibration.json"
    path.write_text(json.dumps(data))
    return path


def _spied_runs(llm: Any, runner: Any) -> dict[str, Any]:
    """Every request at spec_k=0, then every request at the engine's k, with spies installed."""
    spies = {"rejection": _Spy(runner.rejection_sampler), "sampler": _Spy(runner.sampler),
             "propose": _Spy(runner.drafter.propose)}
    runner.rejection_sampler, runner.sampler, runner.drafter.propose = (
        spies["rejection"], spies["sampler"], spies["propose"])
    matrix_before = runner.drafter.matrix.copy()
    no_spec_before = getattr(runner, "_specserve_no_spec_steps", 0)
    planner = runner._specserve_planner
    stats, records = planner.stats, planner.records  # a record per step the step timer timed
    timed_before, plans_before = len(records), stats.steps
    try:
        walked_before = walked_chain_steps(runner)
        off = _generate(llm, PROMPTS, [0] * len(PROMPTS))
        counts_off = {name: spy.calls for name, spy in spies.items()}
        counts_off["no_spec_steps"] = getattr(runner, "_specserve_no_spec_steps", 0) - no_spec_before
        counts_off["walked"] = walked_chain_steps(runner) - walked_before
        counts_off["timed"], counts_off["plans"] = len(records) - timed_before, stats.steps - plans_before
        timed_before = len(records)
        runner.drafter.flush_backlog()  # k=0 steps' rows are learnt in batches, before any draft
        matrix_changed = not np.array_equal(runner.drafter.matrix, matrix_before)
        on = _generate(llm, PROMPTS[:2], [None, None])
        counts_on = {name: spy.calls - counts_off[name] for name, spy in spies.items()}
        counts_on["walked"] = walked_chain_steps(runner) - walked_before - counts_off["walked"]
        counts_on["timed"] = len(records) - timed_before
    finally:
        runner.rejection_sampler, runner.sampler = spies["rejection"].target, spies["sampler"].target
        del runner.drafter.propose
    return {"off": [list(o.token_ids) for o in off], "counts_off": counts_off, "counts_on": counts_on,
            "matrix_changed": matrix_changed, "on": on}


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_greedy_outputs_identical_while_k_changes_per_request_and_step(runs: dict[str, Any], drafter: str) -> None:
    assert all(len(t) == MAX_TOKENS for t in runs["none"]["batch8"])
    assert runs[drafter]["batch1"] == runs["none"]["batch1"]
    assert runs[drafter]["batch8"] == runs["none"]["batch8"]


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_k_really_varied_and_drafts_were_accepted(runs: dict[str, Any], drafter: str) -> None:
    stats = runs[drafter]["stats"]
    assert stats["no_spec_steps"] > 0 and stats["steps"] > stats["no_spec_steps"], stats
    assert len([k for k, n in stats["k_rows"].items() if n]) >= 4, stats["k_rows"]
    metrics = [o.spec_decode_metrics.to_dict() for o in runs[drafter]["outputs"]]
    for spec_k, m in zip(SPEC_KS, metrics):
        cap = K if spec_k is None else spec_k
        assert max(m.get("per_step_drafted") or [0]) <= cap, (spec_k, m)
    default = metrics[0].get("per_step_drafted", [])
    assert len(set(default)) >= 2, f"k never changed between steps of one request: {default}"
    assert sum(m["num_accepted_draft_tokens"] for m in metrics) > 0


def test_all_k0_steps_run_without_drafter_or_verification(runs: dict[str, Any]) -> None:
    spied = runs["spies"]
    off = spied["counts_off"]
    assert off["rejection"] == 0 and off["walked"] == 0 and off["propose"] == 0, off
    assert off["sampler"] > 0 and off["no_spec_steps"] >= MAX_TOKENS, off
    assert spied["off"] == runs["none"]["batch8"]
    assert spied["matrix_changed"], "the recycling matrix stopped learning on k=0 steps"
    on = spied["counts_on"]
    assert on["walked"] > 0 and on["propose"] > 0, on
    # the step timer samples long plain runs and times every step that verified drafts
    assert 4 <= off["timed"] < off["plans"] // 2, off
    assert on["timed"] >= on["walked"] > 0, on
    assert [list(o.token_ids) for o in spied["on"]] == runs["none"]["batch8"][:2]


def test_goodput_controller_changes_k_and_outputs_stay_identical(runs: dict[str, Any]) -> None:
    assert runs["goodput"]["batch1"] == runs["none"]["batch1"]
    assert runs["goodput"]["batch8"] == runs["none"]["batch8"]
    stats = runs["goodput"]["stats"]
    assert stats["no_spec_steps"] > 0 and stats["drafter_calls"] > 0, stats
    assert len([k for k, n in stats["k_rows"].items() if n]) >= 2, stats["k_rows"]
    assert stats["timed_steps"] > 0 and stats["mape"] is not None, stats


def test_goodput_steps_without_drafts_score_their_would_be_drafts(runs: dict[str, Any]) -> None:
    """Batch 8 does not speculate under this calibration: its steps hand the controller the
    hindsight scores of the chain drafts they would have verified (greedy: 0 or 1 each)."""
    stats = runs["goodput"]["stats"]
    assert stats["hindsight_rows"] >= MAX_TOKENS, stats
    assert 0 < stats["hindsight_accepted"] < stats["hindsight_rows"], stats


def test_goodput_learns_greedy_and_sampled_requests_in_their_own_classes(runs: dict[str, Any]) -> None:
    """The engine hands each request's temperature to the controller: greedy runs count in the
    greedy class only, sampled ones (0.8) in theirs."""
    assert runs["goodput"]["classes_greedy"] == [0]
    assert runs["goodput"]["classes_after_sampled"] == [0, 2]
