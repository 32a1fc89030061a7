"""specserve's drafters inside the real vLLM engine (CPU, in-process, demo model): lossless.

Token Recycling (model-free) and Medusa / Hydra heads (on the target's hidden states), each
against one no-speculation baseline: greedy outputs equal token for token at batch 1 and 8,
drafts really get accepted, ``spec_k = 0`` turns drafting off per request, and at temperature > 0
the sampled distribution equals plain sampling (a chi-square homogeneity test per position) for
Token Recycling and Hydra, and for Token Recycling with k changing per row and step. Chains are
verified by the walk (the default ``chain_verify``; its steps are counted, so a silently skipped
walk fails) and, for Token Recycling, by vLLM's rejection sampler too (``chain_verify``
``rejection``, no step walked), both lossless.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.spec_runs import (PROMPTS, REPETITIVE, assert_greedy_equal, assert_same_law, greedy, heads_env, homogeneity_z,
                              run_batches, walked_chain_steps)

from specserve.speculative_config import speculative_config
from specserve.engine.local import local_llm, model_runner

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

K = 4
MAX_TOKENS = 48
NUM_SAMPLES = 320  # seeded requests per engine for the temperature > 0 comparison
SAMPLE_TOKENS = 3
TEMPERATURE = 1.0
TOP_K = 3  # few categories per position whatever the model, so the test always has power
DRAFTERS = ("recycling", "medusa", "hydra")
SAMPLED = ("recycling", "hydra")  # one model-free and one head drafter


def _engine(model_dir: Path, spec: dict[str, Any] | None, policy: str | None = None,
            chain_verify: str | None = None) -> Any:
    ours = {**({"spec_policy": policy, "seed": 11} if policy else {}),
            **({"chain_verify": chain_verify} if chain_verify else {})}
    extra = {"additional_config": {"specserve": ours}} if ours else {}
    return local_llm(
        model_dir,
        max_num_seqs=8, speculative_config=spec, dtype="float32",  # equality tests run in fp32
        per_request_spec_decode_metrics="detailed" if spec else "none", **extra,
    )


def _greedy(extra_args: dict[str, Any] | None = None) -> Any:
    return greedy(MAX_TOKENS, extra_args)


def _sampled(llm: Any) -> list[Any]:
    """``NUM_SAMPLES`` seeded samples of a short continuation of one prompt (the law is compared
    over its first ``SAMPLE_TOKENS`` tokens)."""
    from vllm import SamplingParams

    params = [
        # K tokens past the ones compared, so that the first steps' drafts have room: a row drafts
        # no more than it can still commit before max_tokens
        SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_tokens=SAMPLE_TOKENS + K, ignore_eos=True, seed=i)
        for i in range(NUM_SAMPLES)
    ]
    return [r.outputs[0] for r in llm.generate([PROMPTS[REPETITIVE]] * NUM_SAMPLES, params, use_tqdm=False)]


def _run(llm: Any) -> dict[str, Any]:
    return run_batches(llm, MAX_TOKENS)


@pytest.fixture(scope="module")
def runs(demo_model_dir: Path) -> Iterator[dict[str, dict[str, Any]]]:
    from specserve.head_training import demo_heads_dir

    out: dict[str, dict[str, Any]] = {}
    llm = _engine(demo_model_dir, None)
    out["none"] = _run(llm)
    out["none"]["sampled"] = _sampled(llm)
    del llm
    gc.collect()
    for drafter in DRAFTERS:
        heads = str(demo_heads_dir(drafter)) if drafter in ("medusa", "hydra") else None
        with heads_env(heads):
            llm = _engine(demo_model_dir, speculative_config(drafter, K))  # type: ignore[arg-type]
        out[drafter] = _run(llm)
        out[drafter]["walked"] = walked_chain_steps(model_runner(llm))
        off = llm.generate([PROMPTS[REPETITIVE]], _greedy({"spec_k": 0}), use_tqdm=False)[0].outputs[0]
        out[drafter]["spec_k0"] = off
        if drafter in SAMPLED:
            out[drafter]["sampled"] = _sampled(llm)
        del llm
        gc.collect()
    # k changing per row and per step (the ``jitter`` policy: a random length in [0, k] and whole
    # steps without drafts), sampled like the others
    llm = _engine(demo_model_dir, speculative_config("recycling", K), policy="jitter")
    out["jitter"] = {"sampled": _sampled(llm), "walked": walked_chain_steps(model_runner(llm))}
    del llm
    gc.collect()
    # chains verified by vLLM's rejection sampler instead of the walk
    llm = _engine(demo_model_dir, speculative_config("recycling", K), chain_verify="rejection")
    out["rejection"] = _run(llm)
    out["rejection"]["sampled"] = _sampled(llm)
    out["rejection"]["walked"] = walked_chain_steps(model_runner(llm))
    del llm
    gc.collect()
    yield out


@pytest.mark.parametrize("drafter", [*DRAFTERS, "rejection"])
def test_greedy_outputs_identical_to_no_speculation(runs: dict[str, dict[str, Any]], drafter: str) -> None:
    assert_greedy_equal(runs[drafter], runs["none"], MAX_TOKENS)


@pytest.mark.parametrize("drafter", [*DRAFTERS, "jitter"])
def test_chains_are_walked_by_default(runs: dict[str, dict[str, Any]], drafter: str) -> None:
    assert runs[drafter]["walked"] > 0


def test_chain_verify_rejection_keeps_vllms_sampler(runs: dict[str, dict[str, Any]]) -> None:
    assert runs["rejection"]["walked"] == 0


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_drafts_get_accepted(runs: dict[str, dict[str, Any]], drafter: str) -> None:
    metrics = [o.spec_decode_metrics.to_dict() for o in runs[drafter]["outputs"]]
    drafted = sum(m["num_draft_tokens"] for m in metrics)
    accepted = sum(m["num_accepted_draft_tokens"] for m in metrics)
    assert drafted > 0 and accepted > 0, f"{drafter}: drafted {drafted}, accepted {accepted}"
    assert all(max(m["per_step_drafted"] or [0]) <= K for m in metrics)
    # Every drafted token is verified by the target, so acceptance never exceeds drafting.
    assert all(m["num_accepted_draft_tokens"] <= m["num_draft_tokens"] for m in metrics)


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_spec_k_zero_turns_drafting_off_for_that_request(runs: dict[str, dict[str, Any]], drafter: str) -> None:
    off = runs[drafter]["spec_k0"]
    assert off.spec_decode_metrics.to_dict()["num_draft_tokens"] == 0
    assert list(off.token_ids) == runs["none"]["batch8"][REPETITIVE]


def test_homogeneity_z_tells_equal_from_different() -> None:
    same = [i % 5 for i in range(200)]
    assert homogeneity_z(same, list(reversed(same))) < 0
    assert homogeneity_z(same, [0] * 100 + [1] * 100) > 5


@pytest.mark.parametrize("drafter", [*SAMPLED, "jitter", "rejection"])
def test_sampling_distribution_matches_no_speculation(runs: dict[str, dict[str, Any]], drafter: str) -> None:
    # Each position's token distribution (over seeded samples) must match plain sampling;
    # accepting drafts the target would not have sampled shows up as a large z.
    base, spec = runs["none"]["sampled"], runs[drafter]["sampled"]
    assert_same_law(base, spec, SAMPLE_TOKENS)
    metrics = [o.spec_decode_metrics.to_dict() for o in spec]
    drafted = sum(m["num_draft_tokens"] for m in metrics)
    accepted = sum(m["num_accepted_draft_tokens"] for m in metrics)
    assert 0 < accepted < drafted, "both the accept and the reject path must have been exercised"
    if drafter == "jitter":  # the draft length really changed from step to step
        assert len({d for m in metrics for d in m.get("per_step_drafted") or []}) >= 3
