"""Hydra++ prefix-attention heads inside the real vLLM engine (CPU, in-process, demo model).

A prefix-attention Hydra checkpoint is trained briefly in the test's tmp dir; against a
no-speculation engine its greedy outputs are equal token for token at batch 1 and 8, drafts
get accepted, and the proposer's per-request cache saw every committed position exactly once
in order (no rewinds, prefix-cache hits filled from earlier requests, finished requests freed).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.spec_runs import greedy, heads_env, run_batches

from specserve.speculative_config import speculative_config
from specserve.engine.local import local_llm

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

K = 4
MAX_TOKENS = 40


def _greedy() -> Any:
    return greedy(MAX_TOKENS)


def _run(llm: Any) -> dict[str, Any]:
    return run_batches(llm, MAX_TOKENS)


def _drafter(llm: Any) -> Any:
    """The in-process engine's proposer (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner.drafter


@pytest.fixture(scope="module")
def runs(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from specserve.head_training import build
    from specserve.head_training.recipe import HeadsRecipe

    heads_dir = tmp_path_factory.mktemp("heads") / "hydra-pa"
    recipe = HeadsRecipe(kind="hydra", prefix_attention=True, sequences=24, heldout_sequences=4,
                         new_tokens=64, steps=60)
    build(demo_model_dir, {"hydra": heads_dir}, recipe, progress=False)
    out: dict[str, Any] = {}
    llm = local_llm(demo_model_dir, max_num_seqs=8, dtype="float32")  # equality tests run in fp32
    out["none"] = _run(llm)
    del llm
    gc.collect()
    with heads_env(str(heads_dir)):
        llm = local_llm(demo_model_dir, max_num_seqs=8, speculative_config=speculative_config("hydra", K),
                        per_request_spec_decode_metrics="detailed", dtype="float32")
    out["hydra-pa"] = _run(llm)
    cache = _drafter(llm).prefix_cache
    out["stats"] = dict(cache.stats)
    # vLLM reports finished requests to the runner at its next step: run one more request.
    llm.generate(["# done\n"], _greedy(), use_tqdm=False)
    out["live_after"] = set(cache.live)
    out["retired"] = len(cache.retired)
    del llm
    gc.collect()
    yield out


def test_greedy_outputs_identical_to_no_speculation(runs: dict[str, Any]) -> None:
    assert all(len(t) == MAX_TOKENS for t in runs["none"]["batch8"])
    assert runs["hydra-pa"]["batch1"] == runs["none"]["batch1"]
    assert runs["hydra-pa"]["batch8"] == runs["none"]["batch8"]


def test_drafts_get_accepted(runs: dict[str, Any]) -> None:
    metrics = [o.spec_decode_metrics.to_dict() for o in runs["hydra-pa"]["outputs"]]
    drafted = sum(m["num_draft_tokens"] for m in metrics)
    accepted = sum(m["num_accepted_draft_tokens"] for m in metrics)
    assert drafted > 0 and accepted > 0, f"drafted {drafted}, accepted {accepted}"


def test_cache_saw_every_committed_position_once(runs: dict[str, Any]) -> None:
    stats = runs["stats"]
    assert stats["rewinds"] == 0, stats  # no position fed twice (start always = cached length)
    assert stats["missing_positions"] == 0, stats  # prefix-cache hits found their donor
    assert len(runs["live_after"]) <= 1  # the 11 earlier requests were freed from the live set
    assert runs["retired"] >= 1
