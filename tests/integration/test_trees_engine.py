"""Tree speculation in the real vLLM engine (CPU, in-process, demo model, fp32): lossless.

Token Recycling (8 nodes) and Medusa / Hydra heads (4 nodes, the demo heads' depth) drafting
static and DySpec trees (engine setting ``tree``), against one no-speculation baseline:

* greedy outputs equal token for token at batch 1 and 8, also with the ``jitter`` policy cutting
  each row's tree to a random preorder prefix per step (whole steps without drafts too), with the
  ``goodput`` controller switching between no speculation, chains and trees (Hydra, 8 nodes on 4
  heads), and in a batch where every other request has a repetition penalty (those keep chains);
* trees were really verified: the runner's tree counters show tree verifications and accepted
  nodes, and (static trees) accepted side branches whose K/V was compacted, so a silently
  skipped tree path fails the test;
* at temperature > 0 the sampled distribution equals plain sampling (chi-square homogeneity per
  position), with sampled tree verifications counted during that run;
* vLLM's per-request spec metrics stay consistent (no scheduler assertion, accepted <= drafted);
* structured-output requests (JSON schemas, a regex) verify grammar-pruned trees: greedy outputs
  equal no speculation at batch 1 and 8 for every drafter and shape, with grammar tree
  verifications counted, and at temperature > 0 the regex-constrained law equals plain
  constrained sampling;
* with default settings the same drafter drafts chains and no tree step runs.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.spec_runs import (PROMPTS, REPETITIVE, assert_greedy_equal, assert_same_law, cheap_rows_calibration,
                               heads_env, run_batches)

from specserve.engine import settings
from specserve.engine.local import local_llm, model_runner
from specserve.speculative_config import speculative_config
from specserve_vllm.compat.spec_length import PLANNER_ATTR
from specserve_vllm.compat.tree_steps import COUNTERS_ATTR

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

BUDGET = {"recycling": 8, "medusa": 4, "hydra": 4}  # nodes of a tree (heads: one per depth)
BUDGET_OF = {"hydra-dynamic-goodput": 8}
"""Runs with another node budget: Hydra trees of 8 nodes on 4 heads, the goodput controller
choosing each step between no speculation, chains (at most 4 deep) and trees."""
MAX_TOKENS = 48
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}
SCHEMAS: tuple[dict[str, Any], ...] = (
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "size": {"type": "integer", "minimum": 0}},
     "required": ["name", "size"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                                      "done": {"type": "boolean"}},
     "required": ["items", "done"], "additionalProperties": False},
)
REGEX = "[a-z_ .()=,:]{1,60}"
"""Code without line breaks: wide enough that drafted side branches survive the grammar."""
NUM_SAMPLES = 320
SAMPLE_TOKENS = 3
TREES = ("recycling-static", "recycling-dynamic", "recycling-static-jitter",
         "medusa-static", "medusa-dynamic", "hydra-static", "hydra-dynamic", "hydra-dynamic-goodput")
STATIC = tuple(t for t in TREES if "static" in t)
SAMPLED = ("recycling-static", "hydra-dynamic")


def _budget(name: str) -> int:
    return BUDGET_OF.get(name, BUDGET[name.split("-")[0]])


PINNED_FIT_ALPHA = 1e-4
"""The step fit's weight per measured step in the runs with a test calibration."""


def _engine(model_dir: Path, spec: dict[str, Any] | None, policy: str | None = None,
            calibration: str | None = None) -> Any:
    # With a test calibration the step fit is pinned to it (a tiny weight per measured step): whether
    # speculating pays at batch 8 then follows the calibration, not this host's speed at the time
    # (an online fit on a slow, shared host could turn a whole batch-8 run off).
    pinned = {"calibration": calibration, "fit_alpha": PINNED_FIT_ALPHA} if calibration else {}
    ours = {"spec_policy": policy, "seed": 5, **pinned}
    extra = {"additional_config": {"specserve": ours}} if policy else {}
    return local_llm(model_dir, max_num_seqs=8, speculative_config=spec, dtype="float32",
                     structured_outputs_config=STRUCTURED,
                     per_request_spec_decode_metrics="detailed" if spec else "none",
                     disable_log_stats=not spec, **extra)


def _engine_metrics(llm: Any) -> dict[str, Any]:
    """vLLM's speculative counters (the scheduler's ``SpecDecodingStats``, which assert)."""
    found: dict[str, Any] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_num"):
            found[metric.name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return found


def _runner(llm: Any) -> Any:
    return model_runner(llm)


def _counters(llm: Any) -> Any:
    found = getattr(_runner(llm), COUNTERS_ATTR, None)
    return None if found is None else copy.deepcopy(found)


def _exported_trees(llm: Any) -> Any:
    """The tree counters in the planner's snapshot (what a served engine publishes on /metrics)."""
    planner = getattr(_runner(llm), PLANNER_ATTR)
    with planner.lock:
        return planner.snapshot().get("trees")


def _sampled(llm: Any, regex: str | None = None) -> list[Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    grammar = StructuredOutputsParams(regex=regex) if regex else None
    # the largest tree budget past the tokens compared, so that the first steps' trees have room:
    # a row drafts no more nodes than it can still commit before max_tokens
    room = max(max(BUDGET.values()), *BUDGET_OF.values())
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=SAMPLE_TOKENS + room, ignore_eos=True, seed=i,
                             structured_outputs=grammar) for i in range(NUM_SAMPLES)]
    return [r.outputs[0] for r in llm.generate([PROMPTS[REPETITIVE]] * NUM_SAMPLES, params, use_tqdm=False)]


def _mixed(llm: Any) -> list[list[int]]:
    """Greedy requests of which every other one has a repetition penalty (a chain request)."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                             repetition_penalty=1.3 if i % 2 else 1.0) for i in range(len(PROMPTS))]
    return [list(r.outputs[0].token_ids) for r in llm.generate(PROMPTS, params, use_tqdm=False)]


def _structured(llm: Any) -> dict[str, list[list[int]]]:
    """Greedy JSON-schema requests (each schema on every prompt) as one batch, then one by one."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    prompts = [p for _ in SCHEMAS for p in PROMPTS]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for schema in SCHEMAS for _ in PROMPTS]
    batch = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params, use_tqdm=False)]
    single = [list(llm.generate([p], [q], use_tqdm=False)[0].outputs[0].token_ids) for p, q in zip(prompts, params)]
    return {"batch": batch, "single": single}


@pytest.fixture(scope="module")
def runs(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    from specserve.head_training import demo_heads_dir

    # the goodput run is about switching, so its controller must find speculation worth it at batch 8
    calibration = cheap_rows_calibration(tmp_path_factory.mktemp("calibration"))
    out: dict[str, dict[str, Any]] = {}
    llm = _engine(demo_model_dir, None)
    out["none"] = run_batches(llm, MAX_TOKENS)
    out["none"]["sampled"] = _sampled(llm)
    out["none"]["mixed"] = _mixed(llm)
    out["none"]["structured"] = _structured(llm)
    out["none"]["sampled_regex"] = _sampled(llm, REGEX)
    del llm
    gc.collect()
    llm = _engine(demo_model_dir, speculative_config("recycling", BUDGET["recycling"]))  # default settings
    out["default"] = run_batches(llm, MAX_TOKENS)
    out["default"]["greedy_counters"] = _counters(llm)
    del llm
    gc.collect()
    for name in TREES:
        drafter, shape, *policy = name.split("-")
        heads = str(demo_heads_dir(drafter)) if drafter != "recycling" else None
        with heads_env(heads), settings.override(tree=shape):
            spec = speculative_config(drafter, _budget(name))  # type: ignore[arg-type]
            llm = _engine(demo_model_dir, spec, policy[0] if policy else None,
                          calibration if policy == ["goodput"] else None)
        out[name] = run_batches(llm, MAX_TOKENS)
        out[name]["greedy_counters"] = _counters(llm)
        out[name]["exported_trees"] = _exported_trees(llm)
        out[name]["engine_metrics"] = _engine_metrics(llm)
        if name == "recycling-static":
            before = _counters(llm)
            out[name]["mixed"] = _mixed(llm)
            out[name]["mixed_counters"] = (before, _counters(llm))
        before = _counters(llm)
        out[name]["structured"] = _structured(llm)
        out[name]["structured_counters"] = (before, _counters(llm))
        if name in SAMPLED:
            out[name]["sampled"] = _sampled(llm)
            out[name]["sampled_counters"] = _counters(llm)
            out[name]["sampled_regex"] = _sampled(llm, REGEX)
            out[name]["sampled_regex_counters"] = (out[name]["sampled_counters"], _counters(llm))
        del llm
        gc.collect()
    yield out


@pytest.mark.parametrize("tree", TREES)
def test_greedy_outputs_identical_to_no_speculation(runs: dict[str, dict[str, Any]], tree: str) -> None:
    assert_greedy_equal(runs[tree], runs["none"], MAX_TOKENS)


def test_default_settings_draft_chains(runs: dict[str, dict[str, Any]]) -> None:
    assert settings.current().tree == "chain"
    count = runs["default"]["greedy_counters"]
    assert count is not None and count.walked_chains > 0, "the chains were not walked"
    assert count.steps == 0 and count.verified == 0, "a tree step ran with trees off"
    assert runs["default"]["batch8"] == runs["none"]["batch8"]


def test_requests_that_keep_chains_share_the_batch_losslessly(runs: dict[str, dict[str, Any]]) -> None:
    # penalised requests are verified as chains of their preorder drafts, the others as trees
    assert runs["recycling-static"]["mixed"] == runs["none"]["mixed"]
    before, after = runs["recycling-static"]["mixed_counters"]
    assert after.verified > before.verified


@pytest.mark.parametrize("tree", TREES)
def test_trees_were_verified(runs: dict[str, dict[str, Any]], tree: str) -> None:
    count = runs[tree]["greedy_counters"]
    assert count is not None, "no tree step ran"
    assert count.steps > 0 and count.verified >= count.steps
    assert count.accepted_nodes > 0
    # per depth: every verification tests depth 1; acceptance never exceeds what was tested
    assert count.depth_tested[0] == count.verified
    assert sum(count.depth_accepted) == count.accepted_nodes
    assert all(a <= t for a, t in zip(count.depth_accepted, count.depth_tested))
    assert all(b <= a for a, b in zip(count.depth_tested, count.depth_tested[1:]))
    assert runs[tree]["exported_trees"] == dataclasses.asdict(count)  # what /metrics publishes
    # batch-1 tree steps verify every row themselves: vLLM's rejection sampler is skipped there
    # (and the outputs above and below stay equal to no speculation)
    assert 0 < count.whole_batch <= count.steps


@pytest.mark.parametrize("tree", STATIC)
def test_side_branches_were_accepted_and_compacted(runs: dict[str, dict[str, Any]], tree: str) -> None:
    # The static template always branches at depths 1 and 2, so a path off the preorder prefix
    # is accepted whenever a second candidate is the target's token. (A dynamic tree may be a
    # chain when the first candidate is accepted far more often than the rest.)
    assert runs[tree]["greedy_counters"].compacted > 0


@pytest.mark.parametrize("tree", TREES)
def test_spec_metrics_stay_consistent(runs: dict[str, dict[str, Any]], tree: str) -> None:
    metrics = [o.spec_decode_metrics.to_dict() for o in runs[tree]["outputs"]]
    drafted = sum(m["num_draft_tokens"] for m in metrics)
    accepted = sum(m["num_accepted_draft_tokens"] for m in metrics)
    assert 0 < accepted <= drafted
    assert all(max(m["per_step_drafted"] or [0]) <= _budget(tree) for m in metrics)
    # the engine-wide stats (accepted per position = per depth for trees) add up
    engine = runs[tree]["engine_metrics"]
    per_depth = engine["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert engine["vllm:spec_decode_num_drafts"] > 0
    assert sum(per_depth) == engine["vllm:spec_decode_num_accepted_tokens"] > 0
    assert list(per_depth) == sorted(per_depth, reverse=True)  # a depth is reached only via the one above


@pytest.mark.parametrize("tree", SAMPLED)
def test_sampling_distribution_matches_no_speculation(runs: dict[str, dict[str, Any]], tree: str) -> None:
    base, spec = runs["none"]["sampled"], runs[tree]["sampled"]
    assert_same_law(base, spec, SAMPLE_TOKENS)
    before, after = runs[tree]["greedy_counters"], runs[tree]["sampled_counters"]
    assert after.verified > before.verified, "no sampled request was verified as a tree"
    assert after.accepted_nodes > before.accepted_nodes


@pytest.mark.parametrize("tree", TREES)
def test_structured_outputs_verify_grammar_pruned_trees_losslessly(runs: dict[str, dict[str, Any]], tree: str) -> None:
    assert runs[tree]["structured"]["batch"] == runs["none"]["structured"]["batch"]
    assert runs[tree]["structured"]["single"] == runs["none"]["structured"]["single"]
    if tree.endswith("goodput"):
        return  # the controller may choose chains for these short requests
    before, after = runs[tree]["structured_counters"]
    grammar_before = before.grammar if before is not None else 0
    assert after.grammar > grammar_before, "no structured-output request verified a tree"


@pytest.mark.parametrize("tree", SAMPLED)
def test_constrained_sampling_distribution_matches_no_speculation(runs: dict[str, dict[str, Any]], tree: str) -> None:
    base, spec = runs["none"]["sampled_regex"], runs[tree]["sampled_regex"]
    assert_same_law(base, spec, SAMPLE_TOKENS)
    before, after = runs[tree]["sampled_regex_counters"]
    assert after.grammar > before.grammar, "no sampled structured-output request was verified as a tree"


def test_trees_stay_lossless_when_requests_are_preempted(demo_model_dir: Path) -> None:
    """A KV cache of four 128-token blocks for eight requests of 160 tokens: requests are preempted
    (their KV freed and recomputed later) when they outgrow their first block while drafting and
    verifying trees; outputs still equal no speculation's (with a cache that holds them all)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)
    llm = _engine(demo_model_dir, None)
    try:
        base = [list(r.outputs[0].token_ids) for r in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        del llm
        gc.collect()
    with settings.override(tree="static"):
        spec = speculative_config("recycling", BUDGET["recycling"])
        llm = local_llm(demo_model_dir, max_num_seqs=8, speculative_config=spec, dtype="float32",
                        max_model_len=256, kv_cache_memory_bytes=4 << 20, disable_log_stats=False)
    try:
        tree = [list(r.outputs[0].token_ids) for r in llm.generate(PROMPTS, params, use_tqdm=False)]
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        counters = _counters(llm)
    finally:
        del llm
        gc.collect()
    assert preemptions > 0, "the cache held the whole batch: nothing was preempted"
    assert counters is not None and counters.verified > 0 and counters.accepted_nodes > 0
    assert all(len(t) == 160 for t in base)
    assert tree == base
