"""The engine-side pieces of tree speculation that run without an engine: Token Recycling's tree
shapes and proposer in tree mode, which requests may verify trees, the sampling law tree
verification draws from, and trees staying off by default."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from specserve.engine import settings
from specserve_vllm.drafters import recycling
from specserve_vllm.drafters.recycling_proposer import RecyclingProposer
from specserve_vllm.drafters.recycling_trees import STATIC_WIDTHS, recycling_tree
from specserve_vllm.tree.draft import DraftTree, best_path
from specserve_vllm.tree.step import tree_eligible


def _matrix(seed: int, vocab: int = 12, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = recycling.new_matrix(vocab, k)
    for tok in range(vocab):
        if rng.random() < 0.85:
            m[tok] = rng.choice(vocab, size=k, replace=False)
    return m


@hsettings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), root=st.integers(0, 11), budget=st.integers(0, 16),
       shape=st.sampled_from(["chain", "static", "dynamic"]))
def test_tree_shapes_fit_the_budget_and_start_with_the_chain(seed: int, root: int, budget: int, shape: str) -> None:
    m = _matrix(seed)
    tree = recycling_tree(m, root, shape, budget)  # type: ignore[arg-type]
    assert isinstance(tree, DraftTree) and len(tree) <= budget
    chain = recycling.draft_chain(m, root, budget)
    if shape == "chain":
        assert tree.tokens == chain
    if shape == "static":
        assert tree == recycling.draft_tree(m, root, STATIC_WIDTHS, max_nodes=budget)
    # the first candidate of each row leads every tree: the best path is a prefix of the chain
    path = best_path(tree)
    assert chain[: len(path)] == path


def _config(vocab: int, k: int) -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: vocab),
    )


def test_proposer_drafts_preorder_trees_and_keeps_them() -> None:
    proposer = RecyclingProposer(_config(vocab=6, k=4), topk_width=2, tree_shape="static")
    proposer.observe_topk(np.array([1, 3, 4]), np.array([[3, 4], [5, 1], [2, 0]]))
    tokens = np.array([[0, 1, 0], [0, 2, 0]])
    drafts = proposer.propose([[1], [2]], np.array([2, 2]), tokens)
    assert proposer.last_trees[0] == recycling.draft_tree(proposer.matrix, 1, STATIC_WIDTHS, max_nodes=4)
    assert drafts[0] == list(proposer.last_trees[0].tokens) == [3, 5, 1, 4]  # 1 -> {3 -> {5, 1}, 4}
    assert drafts[1] == [] and proposer.last_trees[1] == DraftTree.empty()  # row 2 of the matrix is empty


def test_trees_are_off_by_default() -> None:
    assert settings.EngineSettings().tree == "chain"
    with settings.override(tree="chain"):
        proposer = RecyclingProposer(_config(vocab=6, k=4), topk_width=2)
    assert proposer.tree_shape == "chain"
    proposer.observe_topk(np.array([1, 3]), np.array([[3, 4], [5, 1]]))
    assert proposer.propose([[1]], np.array([2]), np.array([[0, 1, 0]])) == [[3, 5]]  # 1 -> 3 -> 5, row 5 empty
    assert proposer.last_trees == [None]


def _params(**changes: object) -> SimpleNamespace:
    base = dict(temperature=0.0, logprobs=None, prompt_logprobs=None, presence_penalty=0.0,
                frequency_penalty=0.0, repetition_penalty=1.0, bad_words=None, logit_bias=None,
                allowed_token_ids=None, min_tokens=0, structured_outputs=None, min_p=0.0)
    return SimpleNamespace(**{**base, **changes})


@pytest.mark.parametrize(("changes", "eligible"), [
    ({}, True),
    ({"temperature": 0.7}, True),
    ({"temperature": 0.7, "min_p": 0.1}, False),
    ({"logprobs": 2}, False),
    ({"presence_penalty": 0.5}, False),
    ({"repetition_penalty": 1.2}, False),
    ({"bad_words": ["x"]}, False),
    ({"logit_bias": {1: 2.0}}, False),
    ({"min_tokens": 3}, False),
    ({"structured_outputs": object()}, True),  # with the engine core's pruned tree (tree_of)
])
def test_which_requests_verify_trees(changes: dict[str, object], eligible: bool) -> None:
    assert tree_eligible(_params(**changes)) is eligible
    assert not tree_eligible(None)


def test_dynamic_proposer_measures_rank_acceptance_before_learning() -> None:
    proposer = RecyclingProposer(_config(vocab=6, k=4), topk_width=2, tree_shape="dynamic")
    proposer.observe_topk(np.array([1]), np.array([[3, 4]]))  # row 1 empty: a miss
    proposer.observe_topk(np.array([1, 1]), np.array([[4, 3], [3, 4]]))  # 4 is rank 1, 3 rank 0
    assert proposer.rank_hits.tolist() == [1, 1, 1]
    assert proposer.row_hits is not None and proposer.row_hits[1].tolist() == [1, 1, 1]  # all on row 1
    assert proposer.row_hits.sum() == 3
    assert proposer.matrix[1].tolist() == [3, 4]  # learnt after measuring (last occurrence wins)


def test_dynamic_trees_widen_rows_whose_first_candidate_keeps_missing() -> None:
    from specserve_vllm.drafters.recycling_trees import recycling_tree

    # row 0 -> (1, 2), row 1 -> (3, 4), row 3 -> (5, 0); engine-wide, rank 0 is the one that hits
    matrix = np.array([[1, 2], [3, 4], [-1, -1], [5, 0], [-1, -1], [-1, -1]], dtype=np.int16)
    engine_wide = (0.8, 0.1)
    rows = np.zeros((6, 3), dtype=np.int32)
    chain_like = recycling_tree(matrix, 0, "dynamic", 3, engine_wide, rows)
    assert chain_like.tokens == (1, 3, 5)  # a chain: 0.8^3 beats any second candidate
    rows[1] = [0, 40, 0]  # after token 1, the target took the second candidate every time
    widened = recycling_tree(matrix, 0, "dynamic", 3, engine_wide, rows)
    assert widened.tokens[:2] == (1, 4) and set(widened.tokens) == {1, 4, 3}


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
@pytest.mark.parametrize("shape", ["static", "dynamic"])
def test_heads_trees_fit_the_budget_and_the_heads(kind: str, shape: str) -> None:
    from specserve_vllm.heads.config import HeadsConfig
    from specserve_vllm.heads.model import build_heads
    from specserve_vllm.heads.trees import heads_tree

    torch.manual_seed(0)
    heads = build_heads(HeadsConfig(kind=kind, num_heads=3, hidden_size=16, vocab_size=32))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.5)
    hidden, lm_head, embed = torch.randn(16), torch.randn(32, 16), torch.randn(32, 16)
    chain = heads.draft(hidden[None], torch.tensor([7]), lm_head, embed, 3)[0].tolist()
    for budget in (0, 1, 3, 6, 10):
        tree = heads_tree(heads, hidden, 7, lm_head, embed, shape, budget)
        assert len(tree) <= budget and (not tree or max(tree.depths()) <= 3)  # one head per depth
        path = best_path(tree)
        assert tuple(chain[: len(path)]) == path  # the first-child path is the heads' greedy chain
    assert len(heads_tree(heads, hidden, 7, lm_head, embed, shape, 6)) == 6
    with pytest.raises(ValueError):
        heads_tree(heads, hidden, 7, lm_head, embed, "chain", 3)


def test_gather_through_views_equals_the_generic_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import _custom_ops as ops

    from specserve_vllm.tree import cpu_kv

    block, heads, dim, length = 32, 2, 32, 70
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(length, heads, dim, generator=gen), torch.randn(length, heads, dim, generator=gen)
    cache = torch.zeros(4, heads, 2 * block, dim)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    slots = (table.long()[torch.arange(length) // block] * block + torch.arange(length) % block)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")
    assert cpu_kv._kinds("vec", torch.float32, block, dim) == ("transposed", "identity")
    fast = cpu_kv.gather_kv(key_cache, value_cache, table, length, "vec")
    monkeypatch.setattr(cpu_kv, "_kinds", lambda *args: ("permuted", "permuted"))
    generic = cpu_kv.gather_kv(key_cache, value_cache, table, length, "vec")
    for got, want, ref in zip(fast, generic, (k, v)):
        assert torch.equal(got, want) and torch.equal(got, ref)
