"""The draft-tree type and its pure functions: preorder, masks, positions, paths, KV moves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.tree import compaction
from specserve_vllm.tree.draft import (
    DraftTree,
    ancestor_mask,
    best_path,
    best_path_length,
    depth_positions,
    first_child_next_sibling,
    from_topological,
    leaf_paths,
)


@st.composite
def topological_parents(draw: st.DrawFn, max_nodes: int = 16) -> list[int]:
    n = draw(st.integers(0, max_nodes))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


@st.composite
def trees(draw: st.DrawFn, max_nodes: int = 16) -> DraftTree:
    parents = draw(topological_parents(max_nodes))
    tokens = draw(st.lists(st.integers(0, 50), min_size=len(parents), max_size=len(parents)))
    return from_topological(tokens, parents)[0]


def _ancestors_or_self(tree: DraftTree, i: int) -> set[int]:
    out = {i}
    while tree.parents[i] >= 0:
        i = tree.parents[i]
        out.add(i)
    return out


@settings(deadline=None)
@given(topological_parents())
def test_from_topological_keeps_the_tree_and_sibling_order(parents: list[int]) -> None:
    tokens = [100 + i for i in range(len(parents))]  # token = 100 + old index
    tree, order = from_topological(tokens, parents)
    assert sorted(order) == list(range(len(parents)))
    for new, old in enumerate(order):
        assert tree.tokens[new] == tokens[old]
        p = tree.parents[new]
        assert (order[p] if p >= 0 else -1) == parents[old]
    for node in [-1, *range(len(tree))]:
        old_node = order[node] if node >= 0 else -1
        old_kids = [i for i, p in enumerate(parents) if p == old_node]
        assert [order[c] for c in tree.children(node)] == old_kids


@settings(deadline=None)
@given(trees())
def test_every_preorder_prefix_is_ancestor_closed(tree: DraftTree) -> None:
    for n in range(len(tree) + 1):
        prefix = tree.prefix(n)  # constructing it validates preorder
        for i in range(n):
            assert all(a < n for a in _ancestors_or_self(tree, i))
        assert best_path(prefix) == best_path(tree)[:n]


@pytest.mark.parametrize("parents", [(-1, -1, 0), (-1, 0, 1, 0, 2)])
def test_non_preorder_layouts_are_rejected(parents: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="preorder"):
        DraftTree(tokens=tuple(range(len(parents))), parents=parents)


def test_tree_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="length"):
        DraftTree(tokens=(1, 2), parents=(-1,))


@settings(deadline=None)
@given(trees())
def test_mask_is_the_ancestor_relation(tree: DraftTree) -> None:
    mask = ancestor_mask(tree)
    n = len(tree)
    assert mask.shape == (n + 1, n + 1) and mask.dtype == bool
    assert mask[:, 0].all() and mask[0, 1:].sum() == 0
    for i in range(n):
        expected = {1 + a for a in _ancestors_or_self(tree, i)} | {0}
        assert set(np.flatnonzero(mask[1 + i]).tolist()) == expected
    # Attention only looks back: the mask is lower-triangular in preorder.
    assert not np.triu(mask, 1).any()


@settings(deadline=None)
@given(st.lists(st.integers(0, 50), max_size=12))
def test_a_chain_gives_the_causal_mask_and_consecutive_positions(tokens: list[int]) -> None:
    tree = DraftTree.chain(tokens)
    n = len(tokens)
    assert (ancestor_mask(tree) == np.tril(np.ones((n + 1, n + 1), dtype=bool))).all()
    assert depth_positions(tree, 7).tolist() == list(range(7, 8 + n))
    assert best_path(tree) == tuple(tokens) and compaction.kv_moves(tree, tuple(range(n))) == ()


@settings(deadline=None)
@given(trees(), st.integers(0, 1000))
def test_positions_follow_depth(tree: DraftTree, root: int) -> None:
    pos = depth_positions(tree, root)
    assert pos[0] == root
    for i in range(len(tree)):
        assert pos[1 + i] - root == len(tree.node_path(i)) == tree.depths()[i]
        assert ancestor_mask(tree)[1 + i].sum() == tree.depths()[i] + 1


@settings(deadline=None)
@given(trees())
def test_leaf_paths_cover_the_tree_and_start_with_the_best_path(tree: DraftTree) -> None:
    paths = leaf_paths(tree)
    assert {i for p in paths for i in p} == set(range(len(tree)))
    for p in paths:
        assert tree.children(p[-1]) == ()
        assert all(tree.parents[b] == a for a, b in itertools.pairwise(p)) and tree.parents[p[0]] == -1
    if len(tree):
        assert paths[0] == tuple(range(best_path_length(tree)))
    # The best path is the first-child descent.
    node, descent = -1, []
    while tree.children(node):
        node = tree.children(node)[0]
        descent.append(tree.tokens[node])
    assert best_path(tree) == tuple(descent)


@settings(deadline=None)
@given(trees())
def test_first_child_next_sibling_encodes_children(tree: DraftTree) -> None:
    first, nxt = first_child_next_sibling(tree)
    for node in [-1, *range(len(tree))]:
        rows, row = [], first[node + 1]
        while row != -1:
            rows.append(row)
            row = nxt[row]
        assert rows == [1 + c for c in tree.children(node)]


@settings(max_examples=300, deadline=None)
@given(trees(max_nodes=20), st.data())
def test_compaction_places_the_path_contiguously_and_is_alias_safe(tree: DraftTree, data: st.DataObject) -> None:
    if not len(tree):
        return
    leaf = data.draw(st.integers(0, len(tree) - 1))
    path = tree.node_path(leaf)
    moves = compaction.kv_moves(tree, path)
    rows = np.arange(len(tree) + 1) * 10  # distinct K/V stand-ins, one per row
    gathered = rows[[0, *(1 + i for i in path)]].copy()  # the out-of-place answer
    compaction.apply_moves_inplace(rows, moves)  # the in-place one, in order
    assert rows[: len(path) + 1].tolist() == gathered.tolist()
    written: set[int] = set()
    for m in moves:
        assert m.src > m.dst and m.src not in written, "a move read a row an earlier move overwrote"
        written.add(m.dst)
    if path == tuple(range(len(path))):
        assert moves == (), "a preorder-prefix path needs no copies"


def test_kv_moves_reject_a_non_path_and_slots_map_rows() -> None:
    tree = DraftTree(tokens=(5, 9, 7, 8), parents=(-1, 0, -1, 2))
    with pytest.raises(ValueError, match="not a path"):
        compaction.kv_moves(tree, (0, 3))
    with pytest.raises(ValueError, match="not a path"):
        compaction.kv_moves(tree, (3,))
    moves = compaction.kv_moves(tree, (2, 3))
    assert compaction.slot_moves(moves, (130, 131, 132, 133, 134)) == ((133, 131), (134, 132))
    with pytest.raises(ValueError, match="padded"):
        compaction.slot_moves(moves, (130, 131, 132, 133, -1))
