"""The draft-tree value type: draft tokens plus the index of each token's parent.

A draft tree hangs off the *root*, the last token already in the sequence (not itself a draft).
Node ``i`` holds ``tokens[i]``; ``parents[i]`` is its parent's index, or ``-1`` for the root.
Nodes are in DFS preorder with each node's children in the drafter's preference order (best
first). Two consequences the engine relies on:

* the drafter's best path (first child, first child, ...) is the prefix ``0..d-1``, so when it
  is accepted its KV is already where a chain's would be and compaction moves nothing;
* every prefix of the node list is itself a valid tree (a preorder prefix holds the ancestors
  of each of its nodes), so the scheduler may truncate drafts (``spec_token_ids[:n]``).

Query rows of a verification step are ``1 + N`` per request: row 0 is the root, row ``1 + i``
is node ``i``. Masks and positions below use that row numbering.

Example: root ``r`` with children ``5`` (best) and ``7``; ``5`` has child ``9``::

    >>> t = DraftTree(tokens=(5, 9, 7), parents=(-1, 0, -1))
    >>> t.depths()
    (1, 2, 1)
    >>> t.children(-1), t.children(0)
    ((0, 2), (1,))
    >>> t.path_to(1), best_path(t)
    ((5, 9), (5, 9))
    >>> leaf_paths(t)
    ((0, 1), (2,))
    >>> ancestor_mask(t).astype(int).tolist()   # rows/cols: root, 5, 9, 7
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    >>> depth_positions(t, root_position=10).tolist()
    [10, 11, 12, 11]

This module is pure (numpy only, no torch or vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens and their parent indices in DFS preorder, best child first (validated)."""

    tokens: tuple[int, ...]
    """Draft token ids, one per node."""
    parents: tuple[int, ...]
    """Parent node index per node; ``-1`` means the root (the sequence's last token)."""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"tokens and parents differ in length: {len(self.tokens)} != {len(self.parents)}"
            )
        stack: list[int] = []  # the path root -> previous node
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must satisfy -1 <= parent < index")
            while stack and stack[-1] != p:
                stack.pop()
            if p != -1 and not stack:
                raise ValueError(f"node {i} has parent {p}, which is not on the path to node {i - 1}: "
                                 "nodes must be in DFS preorder")
            stack.append(i)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(tokens=(), parents=())

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        """A tree that is a single path: ``chain([4, 2]) == DraftTree((4, 2), (-1, 0))``."""
        toks = tuple(int(t) for t in tokens)
        return cls(tokens=toks, parents=tuple(range(-1, len(toks) - 1)))

    def depths(self) -> tuple[int, ...]:
        """Depth of each node (children of the root have depth 1)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return tuple(out)

    def children(self, node: int) -> tuple[int, ...]:
        """Indices of ``node``'s children in preference order (``node=-1``: the root's)."""
        return tuple(i for i, p in enumerate(self.parents) if p == node)

    def node_path(self, node: int) -> tuple[int, ...]:
        """Node indices from the root's child down to ``node`` inclusive (``()`` for the root)."""
        path: list[int] = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return tuple(reversed(path))

    def path_to(self, node: int) -> tuple[int, ...]:
        """Draft tokens from the root's child down to ``node`` inclusive."""
        return tuple(self.tokens[i] for i in self.node_path(node))

    def prefix(self, n: int) -> DraftTree:
        """The first ``n`` nodes (a valid tree: preorder prefixes are ancestor-closed)."""
        return DraftTree(tokens=self.tokens[:n], parents=self.parents[:n])


def from_topological(tokens: Sequence[int], parents: Sequence[int]) -> tuple[DraftTree, tuple[int, ...]]:
    """Reorder any tree with ``parents[i] < i`` (e.g. breadth-first) into DFS preorder.

    Siblings keep their relative order (earlier index = preferred). Returns the tree and
    ``order`` with ``order[new] = old`` node index.

    >>> t, order = from_topological((3, 4, 5), (-1, -1, 0))   # BFS: 3 -> 5, then 4
    >>> t.tokens, t.parents, order
    ((3, 5, 4), (-1, 0, -1), (0, 2, 1))
    """
    if len(tokens) != len(parents):
        raise ValueError(f"tokens and parents differ in length: {len(tokens)} != {len(parents)}")
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}; parents must satisfy -1 <= parent < index")
        kids.setdefault(int(p), []).append(i)
    order: list[int] = []
    stack = list(reversed(kids.get(-1, [])))
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(kids.get(node, [])))
    new_index = {old: new for new, old in enumerate(order)}
    new_parents = tuple(-1 if parents[old] < 0 else new_index[int(parents[old])] for old in order)
    return DraftTree(tokens=tuple(int(tokens[old]) for old in order), parents=new_parents), tuple(order)


def best_path_length(tree: DraftTree) -> int:
    """How many leading nodes form the first-child chain (the drafter's best path).

    >>> best_path_length(DraftTree((5, 3, 7, 9), (-1, 0, -1, 2)))
    2
    """
    n = 0
    while n < len(tree) and tree.parents[n] == n - 1:
        n += 1
    return n


def best_path(tree: DraftTree) -> tuple[int, ...]:
    """The chain draft of a tree: from the root, repeatedly descend into the first child.

    Children are stored best first in preorder, so this is the prefix of the node list.
    ``best_path(DraftTree((5, 3, 7, 9), (-1, 0, -1, 2))) == (5, 3)``.
    """
    return tree.tokens[: best_path_length(tree)]


def ancestor_mask(tree: DraftTree) -> np.ndarray:
    """``[N+1, N+1]`` bool: row ``a`` may attend to row ``b`` (``b`` is ``a`` or its ancestor).

    Row/column 0 is the root, ``1 + i`` is node ``i``. Every row also attends to the whole
    committed prefix (not part of this mask). A chain gives the causal (lower-triangular) mask.

    >>> ancestor_mask(DraftTree.chain([7, 8])).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    n = len(tree)
    mask = np.zeros((n + 1, n + 1), dtype=bool)
    mask[:, 0] = True
    for i, p in enumerate(tree.parents):
        if p >= 0:
            mask[1 + i] = mask[1 + p]
        mask[1 + i, 1 + i] = True
    return mask


def depth_positions(tree: DraftTree, root_position: int) -> np.ndarray:
    """``[N+1]`` int64 RoPE positions: root at ``root_position``, node ``i`` at root + depth.

    >>> depth_positions(DraftTree((1, 2, 3), (-1, -1, 1)), 4).tolist()
    [4, 5, 5, 6]
    """
    return np.asarray((root_position, *(root_position + d for d in tree.depths())), dtype=np.int64)


def leaf_paths(tree: DraftTree) -> tuple[tuple[int, ...], ...]:
    """Node-index paths from the root's child to every leaf, in preorder of the leaves.

    The first is the best path. ``leaf_paths(DraftTree.chain([4, 2])) == ((0, 1),)``.
    """
    has_child = {p for p in tree.parents if p >= 0}
    return tuple(tree.node_path(i) for i in range(len(tree)) if i not in has_child)


def first_child_next_sibling(tree: DraftTree) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per row (root first) the row of its first child and of its next sibling, ``-1`` if none.

    The encoding grammar matchers use to walk a draft tree (rows as in :func:`ancestor_mask`).

    >>> first_child_next_sibling(DraftTree((5, 9, 7), (-1, 0, -1)))
    ((1, 2, -1, -1), (-1, 3, -1, -1))
    """
    n = len(tree)
    first = [-1] * (n + 1)
    nxt = [-1] * (n + 1)
    last: dict[int, int] = {}
    for i, p in enumerate(tree.parents):
        parent_row, row = p + 1, i + 1
        if parent_row in last:
            nxt[last[parent_row]] = row
        else:
            first[parent_row] = row
        last[parent_row] = row
    return tuple(first), tuple(nxt)
