"""Token Recycling's pure parts: the adjacency matrix update and BFS drafting (returned in preorder)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.drafters import recycling
from specserve_vllm.tree.draft import DraftTree, best_path

VOCAB = 12
K = 3


@st.composite
def matrices(draw: st.DrawFn) -> np.ndarray:
    cells = draw(st.lists(st.integers(-1, VOCAB - 1), min_size=VOCAB * K, max_size=VOCAB * K))
    return np.array(cells, dtype=np.int16).reshape(VOCAB, K)


@st.composite
def updates(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, 10))
    prev = np.array(draw(st.lists(st.integers(-1, VOCAB - 1), min_size=n, max_size=n)), dtype=np.int64)
    topk = np.array(
        draw(st.lists(st.integers(0, VOCAB + 3), min_size=n * (K + 1), max_size=n * (K + 1))),
        dtype=np.int64,
    ).reshape(n, K + 1)
    return prev, topk


def test_memory_budget_for_a_32k_vocabulary() -> None:
    m = recycling.new_matrix(32000, k=8)
    assert m.dtype == np.int16
    assert m.nbytes <= 2 * 1024 * 1024
    assert recycling.new_matrix(32768, k=1).dtype == np.int32
    assert (m == recycling.EMPTY).all()


@settings(deadline=None)
@given(matrices(), updates())
def test_update_overwrites_last_occurrence_and_nothing_else(m: np.ndarray, upd: tuple) -> None:
    prev, topk = upd
    before = m.copy()
    out = recycling.update(m, prev, topk)
    assert (m == before).all(), "update must not mutate its input"
    assert out.dtype == m.dtype and out.shape == m.shape
    expected = before.copy()
    for t, row in zip(prev.tolist(), topk.tolist()):
        if 0 <= t < VOCAB:
            expected[t] = [c if c < VOCAB else recycling.EMPTY for c in row[:K]]
    assert (out == expected).all()


@settings(deadline=None)
@given(matrices(), updates())
def test_successor_rows_follow_the_sequential_rule_and_keep_rank_0(m: np.ndarray, upd: tuple) -> None:
    """Each position, in order: the new top-1, then the row as it was, then the rest of the new
    top-k, valid and distinct, cut to k. Rank 0 is what the plain update writes wherever the
    new top-1 is in the vocabulary, so chains draft the same tokens."""
    prev, topk = upd
    out = m.copy()
    recycling.update_successors_inplace(out, prev, topk)
    expected = m.copy()
    for t, row in zip(prev.tolist(), topk.tolist()):
        if not 0 <= t < VOCAB:
            continue
        merged = [row[0], *expected[t].tolist(), *row[1:K]]
        kept: list[int] = []
        for c in merged:
            if 0 <= c < VOCAB and c not in kept:
                kept.append(c)
        expected[t] = (kept + [recycling.EMPTY] * K)[:K]
    assert (out == expected).all()
    plain = recycling.update(m, prev, topk)
    last_top1 = {t: row[0] for t, row in zip(prev.tolist(), topk.tolist()) if 0 <= t < VOCAB}
    for t, top1 in last_top1.items():
        if top1 < VOCAB:
            assert out[t, 0] == plain[t, 0] == top1


def test_update_rejects_too_few_candidates() -> None:
    with pytest.raises(ValueError, match="columns"):
        recycling.update(recycling.new_matrix(4, k=3), np.array([1]), np.array([[2, 3]]))


@settings(max_examples=200, deadline=None)
@given(matrices(), st.integers(0, VOCAB - 1), st.lists(st.integers(0, 3), min_size=0, max_size=4))
def test_bfs_tree_follows_the_matrix(m: np.ndarray, root: int, widths: list[int]) -> None:
    tree = recycling.draft_tree(m, root, widths)
    depths = tree.depths()
    assert all(d <= len(widths) for d in depths)
    assert recycling.EMPTY not in tree.tokens
    for node in [-1, *range(len(tree))]:
        kids = tree.children(node)
        parent_tok = root if node < 0 else tree.tokens[node]
        depth = 0 if node < 0 else depths[node]
        if depth >= len(widths):
            assert kids == ()
            continue
        # A node's children are the leading non-empty entries of its row, best first.
        row = m[parent_tok, : widths[depth]].tolist()
        leading = row[: row.index(-1)] if -1 in row else row
        assert [tree.tokens[c] for c in kids] == leading
    # Breadth-first expansion, preorder layout: the first-child chain is the node prefix.
    assert tree.tokens[: len(best_path(tree))] == best_path(tree)


@settings(deadline=None)
@given(matrices(), st.integers(0, VOCAB - 1), st.lists(st.integers(1, 3), min_size=1, max_size=5))
def test_best_path_of_any_template_is_the_greedy_chain(m: np.ndarray, root: int, widths: list[int]) -> None:
    chain = recycling.draft_chain(m, root, len(widths))
    assert best_path(recycling.draft_tree(m, root, widths)) == chain
    tok = root
    for c in chain:  # each step takes the row's top candidate
        assert c == m[tok, 0]
        tok = c
    if len(chain) < len(widths):
        assert m[tok, 0] == recycling.EMPTY


@settings(deadline=None)
@given(matrices(), st.lists(st.integers(-1, VOCAB), max_size=6), st.integers(0, 5))
def test_batched_chains_equal_single_chains(m: np.ndarray, roots: list[int], length: int) -> None:
    expected = [list(recycling.draft_chain(m, r, length)) if 0 <= r < VOCAB else [] for r in roots]
    assert recycling.draft_chains(m, np.array(roots, dtype=np.int64), length) == expected


def test_max_nodes_budget() -> None:
    m = np.array([[1, 2], [0, 2], [1, 0]], dtype=np.int16)
    t = recycling.draft_tree(m, 0, (2, 2, 2), max_nodes=5)
    assert len(t) == 5
    # BFS keeps levels 1-2 whole (1, 2 | 0, 2 under 1) and the first of level 3's under 2;
    # the layout is preorder.
    assert (t.tokens, t.parents) == ((1, 0, 2, 2, 1), (-1, 0, 0, -1, 3))


def test_recycled_predictions_drive_drafts() -> None:
    # The target predicted "4 after 3" and "5 after 4": drafting from 3 replays that.
    m = recycling.new_matrix(8, k=2)
    m = recycling.update(m, np.array([3, 4]), np.array([[4, 0], [5, 1]]))
    assert recycling.draft_chain(m, 3, 4) == (4, 5)
    assert recycling.draft_chain(m, 7, 4) == ()
    assert recycling.draft_chain(m, 3, 0) == ()


@pytest.mark.parametrize("parents", [(0,), (-2,), (-1, 1)])
def test_tree_rejects_bad_parents(parents: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="parent"):
        DraftTree(tokens=tuple(range(len(parents))), parents=parents)
