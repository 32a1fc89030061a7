"""Tree drafts: static top-k templates, DySpec dynamic trees, and the drafters' expanders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.drafters import recycling
from specserve_vllm.heads.config import HeadsConfig
from specserve_vllm.heads.model import build_heads
from specserve_vllm.tree.build import (
    Expander,
    dynamic_tree,
    expected_accepted,
    medusa_expander,
    rank_prior,
    recycling_expander,
    static_tree,
)
from specserve_vllm.tree.draft import DraftTree, best_path
from specserve_vllm.tree.heads_expand import heads_expander

VOCAB, K, HEADS = 10, 3, 4


@st.composite
def medusa_tops(draw: st.DrawFn) -> Expander:
    ids = np.array([draw(st.permutations(range(VOCAB)))[:K] for _ in range(HEADS)])
    probs = np.array([sorted(draw(st.lists(st.floats(0.01, 1.0), min_size=K, max_size=K)), reverse=True)
                      for _ in range(HEADS)])
    return medusa_expander(ids, np.log(probs / (probs.sum(axis=1, keepdims=True) + 0.1)))


@st.composite
def recycling_cases(draw: st.DrawFn) -> tuple[np.ndarray, int, Expander]:
    m = np.array([draw(st.permutations(range(VOCAB)))[:K] for _ in range(VOCAB)], dtype=np.int16)
    for row in range(VOCAB):  # some rows end early
        cut = draw(st.integers(0, K))
        m[row, cut:] = recycling.EMPTY
    root = draw(st.integers(0, VOCAB - 1))
    return m, root, recycling_expander(m, root, rank_prior((0.5, 0.2, 0.1)))


def _all_candidate_scores(expand: Expander, depth: int) -> list[float]:
    """Path scores of every candidate node down to ``depth`` (brute force)."""
    scores, frontier = [], [((), 0.0)]
    for _ in range(depth):
        nxt = []
        for (path, s), cands in zip(frontier, expand([p for p, _ in frontier])):
            for tok, lp in cands:
                if lp > -math.inf:
                    scores.append(s + lp)
                    nxt.append(((*path, tok), s + lp))
        frontier = nxt
    return scores


def _node_scores(tree: DraftTree, expand: Expander) -> list[float]:
    out: dict[int, float] = {-1: 0.0}
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        out[i] = out[p] + dict(expand([tree.path_to(p) if p >= 0 else ()])[0])[tok]
    return [out[i] for i in range(len(tree))]


def _greedy_chain(expand: Expander, depth: int) -> tuple[int, ...]:
    path: tuple[int, ...] = ()
    for _ in range(depth):
        cands = expand([path])[0]
        if not cands:
            break
        path = (*path, cands[0][0])
    return path


@settings(max_examples=150, deadline=None)
@given(st.one_of(medusa_tops(), recycling_cases().map(lambda c: c[2])), st.integers(1, 7))
def test_dynamic_tree_takes_the_best_scored_candidates(expand: Expander, budget: int) -> None:
    tree = dynamic_tree(expand, budget)
    universe = sorted(_all_candidate_scores(expand, budget), reverse=True)
    assert len(tree) == min(budget, len(universe))
    assert sorted(_node_scores(tree, expand), reverse=True) == pytest.approx(universe[: len(tree)])
    chain = _greedy_chain(expand, budget)
    assert best_path(tree) == chain[: len(best_path(tree))]


@settings(max_examples=150, deadline=None)
@given(st.one_of(medusa_tops(), recycling_cases().map(lambda c: c[2])),
       st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_dynamic_tree_estimates_at_least_static_and_chain_at_equal_budget(expand: Expander, widths: list[int]) -> None:
    static = static_tree(expand, widths)
    n = len(static)
    dynamic = dynamic_tree(expand, n)
    chain = static_tree(expand, (1,) * n)
    assert len(dynamic) == n and len(chain) <= n
    assert expected_accepted(dynamic, expand) >= expected_accepted(static, expand) - 1e-9
    assert expected_accepted(dynamic, expand) >= expected_accepted(chain, expand) - 1e-9


@settings(max_examples=150, deadline=None)
@given(recycling_cases(), st.lists(st.integers(0, 3), max_size=4), st.integers(1, 20))
def test_recycling_static_tree_is_the_papers_bfs_tree(case: tuple, widths: list[int], budget: int) -> None:
    m, root, expand = case
    assert static_tree(expand, widths, max_nodes=budget) == recycling.draft_tree(m, root, widths, max_nodes=budget)


@settings(max_examples=100, deadline=None)
@given(st.one_of(medusa_tops(), recycling_cases().map(lambda c: c[2])), st.integers(1, 12), st.integers(1, 8),
       st.one_of(st.none(), st.integers(1, 4)))
def test_lookahead_expansion_grows_the_same_tree_in_fewer_calls(expand: Expander, budget: int, lookahead: int,
                                                                max_depth: int | None) -> None:
    calls: list[int] = []

    def counted(paths: list) -> list:
        calls.append(len(paths))
        return expand(paths)

    plain = dynamic_tree(counted, budget, max_depth=max_depth)
    plain_calls = len(calls)
    calls.clear()
    assert dynamic_tree(counted, budget, max_depth=max_depth, lookahead=lookahead) == plain
    assert len(calls) <= plain_calls


def test_lookahead_batches_the_waiting_candidates() -> None:
    expand = medusa_expander(np.array([[1, 2, 3]] * 4), np.log(np.array([[0.5, 0.3, 0.2]] * 4)))
    calls: list[int] = []

    def counted(paths: list) -> list:
        calls.append(len(paths))
        return expand(paths)

    tree = dynamic_tree(counted, 8, lookahead=4)
    assert tree == dynamic_tree(expand, 8)
    assert len(calls) < 8 and max(calls) > 1  # without lookahead: one call per taken node


def test_dynamic_tree_caps_depth_and_width() -> None:
    expand = medusa_expander(np.array([[1, 2, 3]] * 4), np.log(np.array([[0.9, 0.05, 0.04]] * 4)))
    assert dynamic_tree(expand, 10, max_depth=2).depths() == (1, 2, 2, 2, 1, 2, 2, 2, 1, 2)
    assert dynamic_tree(expand, 10, width=1) == DraftTree.chain([1, 2, 3][:1] * 4)
    assert dynamic_tree(expand, 0) == DraftTree.empty()


def _random_heads(kind: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    heads = build_heads(HeadsConfig(kind=kind, num_heads=HEADS, hidden_size=16, vocab_size=32))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.5)
    return heads, torch.randn(16), torch.randn(32, 16), torch.randn(32, 16)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_trees_contain_the_heads_chain_draft(kind: str) -> None:
    heads, hidden, lm_head, embed = _random_heads(kind)
    chain = heads.draft(hidden[None], torch.tensor([7]), lm_head, embed, HEADS)[0].tolist()
    expand = heads_expander(heads, hidden, 7, lm_head, embed, k=3)
    assert best_path(static_tree(expand, (1,) * HEADS)) == tuple(chain)
    tree = static_tree(expand, (3, 2, 1, 1))
    assert best_path(tree) == tuple(chain) and max(tree.depths()) == HEADS
    dyn = dynamic_tree(expand, 12)
    assert best_path(dyn) == tuple(chain[: len(best_path(dyn))])
    assert expected_accepted(dyn, expand) >= expected_accepted(static_tree(expand, (1,) * HEADS), expand)


def test_hydra_expander_batches_paths_like_single_calls() -> None:
    heads, hidden, lm_head, embed = _random_heads("hydra")
    expand = heads_expander(heads, hidden, 7, lm_head, embed, k=3)
    paths = [(), (1,), (4,), (1, 2), (9, 9, 9), (1, 2, 3, 4)]
    batched = expand(paths)
    for path, got in zip(paths, batched):
        single = expand([path])[0]
        assert [t for t, _ in got] == [t for t, _ in single]
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in single], abs=1e-5)
    assert batched[-1] == [], "no head beyond the last"
    # Hydra's candidates depend on the path (Medusa's would not).
    assert batched[1] != batched[2]
