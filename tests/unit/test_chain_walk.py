"""Chains verified by the walk (``compat.chain_walk``, ``tree.verify.chain_outputs``): the walk
equals the tree walk on chains, each row's token follows the law vLLM samples from, seeded rows
repeat, and steps the walk cannot take fall back to vLLM's rejection sampler."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.compat import chain_walk
from specserve_vllm.spec_control.planner import PlannerSettings, settings_from
from specserve_vllm.tree.draft import DraftTree
from specserve_vllm.tree.verify import chain_outputs, verify_greedy

VOCAB = 6


@st.composite
def chain_steps(draw: Any) -> tuple[list[list[int]], list[int]]:
    """Per request a chain of drafts, and one target token per row (drafts + 1 rows each)."""
    chains = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=5), min_size=1, max_size=6))
    rows = sum(len(c) + 1 for c in chains)
    # Tokens biased towards the drafts so long accepted prefixes occur.
    tokens = []
    for chain in chains:
        for j in range(len(chain) + 1):
            hit = j < len(chain) and draw(st.booleans())
            tokens.append(chain[j] if hit else draw(st.integers(0, VOCAB - 1)))
    assert len(tokens) == rows
    return chains, tokens


@given(chain_steps())
@settings(max_examples=200, deadline=None)
def test_chain_outputs_equal_the_tree_walk_on_chains(step: tuple[list[list[int]], list[int]]) -> None:
    chains, tokens = step
    width = max(len(c) for c in chains) + 1
    out = chain_outputs(np.array([t for c in chains for t in c], dtype=np.int64), [len(c) for c in chains],
                        np.array(tokens), width)
    start = 0
    for r, chain in enumerate(chains):
        rows = np.eye(VOCAB)[tokens[start : start + len(chain) + 1]]  # one-hot: the argmax is the token
        start += len(chain) + 1
        verdict = verify_greedy(DraftTree.chain(chain), rows)
        assert [t for t in out[r].tolist() if t != -1] == list(verdict.tokens)
        assert out[r].tolist()[len(verdict.tokens):] == [-1] * (width - len(verdict.tokens))


def test_chain_outputs_rejects_inconsistent_shapes() -> None:
    with pytest.raises(ValueError, match="drafts"):
        chain_outputs(np.array([1, 2]), [3], np.array([1, 2, 3, 4]), 4)
    with pytest.raises(ValueError, match="width"):
        chain_outputs(np.array([1, 2]), [2], np.array([1, 2, 3]), 2)


def _metadata(temperature: list[float], top_k: list[int] | None = None,
              generators: dict[int, torch.Generator] | None = None) -> Any:
    temps = torch.tensor(temperature, dtype=torch.float32)
    greedy = [t < 1e-5 for t in temperature]
    return NS(all_greedy=all(greedy), all_random=not any(greedy), temperature=temps,
              top_k=None if top_k is None else torch.tensor(top_k), top_p=None, generators=generators or {})


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(7, 50)
    tokens = chain_walk.row_tokens(logits, [2, 0, 2], _metadata([0.0, 0.0, 0.0]))
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
LAWS = {  # (temperature, top-k, top-p) -> the law vLLM samples from
    "plain": (1.0, None, None, [0.5, 0.3, 0.15, 0.05]),
    "top-2": (1.0, 2, None, [0.625, 0.375, 0.0, 0.0]),
    "temperature 0.5": (0.5, None, None, list(np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365)),
    "top-p 0.7": (1.0, None, 0.7, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # smallest set with mass >= 0.7
}


@pytest.mark.parametrize("name", list(LAWS))
def test_sampled_rows_follow_the_target_law_and_greedy_rows_their_argmax(name: str) -> None:
    temperature, top_k, top_p, law = LAWS[name]
    torch.manual_seed(0)
    n = 8000  # requests alternate greedy and sampled, one row each
    temps = [0.0 if i % 2 == 0 else temperature for i in range(n)]
    meta = _metadata(temps, top_k=None if top_k is None else [top_k] * n)
    meta.top_p = None if top_p is None else torch.full((n,), top_p)
    logits = LOGITS.repeat(n, 1)
    tokens = chain_walk.row_tokens(logits, [0] * n, meta)
    assert torch.equal(logits, LOGITS.repeat(n, 1))  # not edited
    assert set(tokens[0::2].tolist()) == {0}
    counts = np.bincount(tokens[1::2], minlength=4)
    expected = np.array(law) * (n // 2)
    assert counts[expected == 0].sum() == 0  # masked by top-k / top-p
    kept = expected > 0
    chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    assert chi2 < {1: 10.8, 2: 13.8, 3: 16.3}[int(kept.sum()) - 1]  # chi-square critical values, p = 0.001


def test_rows_of_seeded_requests_repeat() -> None:
    logits = torch.randn(8, 40)

    def draw(seed: int) -> list[int]:
        meta = _metadata([1.0, 1.0], generators={1: torch.Generator().manual_seed(seed)})
        return chain_walk.row_tokens(logits, [3, 3], meta)[4:].tolist()

    assert draw(5) == draw(5)
    assert any(draw(5) != draw(s) for s in range(6, 12))


def test_inverse_cdf_draws_never_draw_a_masked_token() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).repeat(4, 1)
    edges = torch.tensor([0.0, 0.5 - 1e-12, 0.5, 1.0 - 2.0**-53], dtype=torch.float64)
    assert chain_walk.inverse_cdf_draws(logits, edges).tolist() == [0, 0, 2, 2]


def test_a_drafter_with_draft_probabilities_keeps_the_rejection_sampler() -> None:
    calls: list[Any] = []
    walked: list[int] = []
    sample = chain_walk.walk_sampler(lambda *a: calls.append(a) or "vllm", lambda: walked.append(1))
    assert sample("meta", torch.ones(2, 3), "logits", "sampling") == "vllm"
    assert len(calls) == 1 and not walked


def test_the_walk_writes_vllms_output_layout() -> None:
    meta = NS(num_draft_tokens=[2, 1], draft_token_ids=torch.tensor([3, 4, 5]), max_spec_len=2)
    logits = torch.full((5, 8), -5.0)
    for row, token in enumerate([3, 1, 9 % 8, 5, 2]):  # request 0: 3 accepted, 4 rejected (1 emitted)
        logits[row, token] = 5.0
    walked: list[int] = []
    out = chain_walk.walk_sampler(None, lambda: walked.append(1))(meta, None, logits, _metadata([0.0, 0.0]))
    assert out.sampled_token_ids.tolist() == [[3, 1, -1], [5, 2, -1]]
    assert out.logprobs_tensors is None and walked == [1]


def test_only_vllms_builtin_logits_processors_allow_the_walk() -> None:
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    builtin = MinPLogitsProcessor.__new__(MinPLogitsProcessor)
    custom = NS()
    assert chain_walk.builtin_processors_only(NS(all=[builtin]))
    assert not chain_walk.builtin_processors_only(NS(all=[builtin, custom]))


def _params(**changes: Any) -> Any:
    plain = dict(temperature=0.7, min_p=0.0, logprobs=None, prompt_logprobs=None, presence_penalty=0.0,
                 frequency_penalty=0.0, repetition_penalty=1.0, bad_words=None, logit_bias=None,
                 allowed_token_ids=None, min_tokens=0)
    return NS(**{**plain, **changes})


def _runner(params: list[Any], logprobs: int | None = None, budget: bool = False) -> Any:
    holder = NS(has_tracked_requests=lambda: budget)
    metadata = NS(max_num_logprobs=logprobs, logprob_token_ids=None, thinking_budget_state_holder=holder)
    ids = [f"r{i}" for i in range(len(params))]
    runner = NS(input_batch=NS(sampling_metadata=metadata, req_ids=ids, num_reqs=len(ids)),
                requests={i: NS(sampling_params=p) for i, p in zip(ids, params)})
    setattr(runner, chain_walk.ENABLED_ATTR, True)
    setattr(runner, chain_walk.BUILTIN_ATTR, True)
    return runner


def test_a_step_walks_only_when_every_request_allows_it() -> None:
    assert chain_walk.walkable(_runner([_params(), _params(temperature=0.0)]))
    assert not chain_walk.walkable(_runner([_params(), _params(repetition_penalty=1.1)]))
    assert not chain_walk.walkable(_runner([_params(min_p=0.1)]))
    assert not chain_walk.walkable(_runner([_params()], logprobs=2))
    assert not chain_walk.walkable(_runner([_params()], budget=True))
    off = _runner([_params()])
    setattr(off, chain_walk.ENABLED_ATTR, False)
    assert not chain_walk.walkable(off)
    custom = _runner([_params()])
    setattr(custom, chain_walk.BUILTIN_ATTR, False)  # a custom logits processor
    assert not chain_walk.walkable(custom) and not chain_walk.plain_law(custom)


def test_the_setting_is_read_from_the_engine_config() -> None:
    assert settings_from(None, env={}).chain_verify == "walk"
    assert settings_from({"specserve": {"chain_verify": "rejection"}}, env={}).chain_verify == "rejection"
    with pytest.raises(ValueError, match="chain_verify"):
        PlannerSettings(chain_verify="sometimes")
