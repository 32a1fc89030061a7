"""A step's tree plan: which scheduled requests verify a tree, and the position shifts they need.

The scheduler sees a tree as ``N`` draft tokens (its nodes in preorder) and may truncate them
(``spec_token_ids[:n]``); vLLM's runner lays each request's scheduled tokens out as
``root, draft_1, ..., draft_n`` at positions ``num_computed + 0..n`` and computes slots from
those positions. A request verifies a tree only when its scheduled drafts are exactly a prefix
of the tree its drafter proposed and that prefix branches; otherwise it runs as a chain (the
native path, bit for bit). For tree requests the runner's positions get ``depth - (i + 1)``
added to node ``i``'s row after the slot mapping is computed, so slots stay one per row and
RoPE follows depth.

    >>> t = DraftTree(tokens=(5, 9, 7), parents=(-1, 0, -1))
    >>> plan = plan_step([t, t], scheduled_drafts=[(5, 9, 7), (5, 8)], query_start=[0, 4, 7])
    >>> [(r.req_index, r.row_start, r.tree.tokens) for r in plan.requests]   # request 1: a chain
    [(0, 0, (5, 9, 7))]
    >>> position_deltas(plan, num_tokens=7).tolist()   # node 7 sits at depth 1, not 3
    [0, 0, 0, -2, 0, 0, 0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specserve_vllm.tree.draft import DraftTree, best_path_length, depth_positions


@dataclass(frozen=True)
class RequestTree:
    """One tree request of a step: its batch row, first flat token row, and scheduled tree."""

    req_index: int
    row_start: int
    """Flat index of the request's root row among the step's scheduled tokens."""
    tree: DraftTree
    """The tree as scheduled (a preorder prefix of the proposed one)."""


@dataclass(frozen=True)
class TreePlan:
    requests: tuple[RequestTree, ...]

    def tree_for(self, req_index: int) -> DraftTree | None:
        return next((r.tree for r in self.requests if r.req_index == req_index), None)


def scheduled_tree(tree: DraftTree | None, drafts: Sequence[int]) -> DraftTree | None:
    """The prefix of ``tree`` that ``drafts`` schedule, when they are exactly a prefix of its
    tokens and that prefix branches; None when the drafts run as a chain (or not at all).

    >>> t = DraftTree(tokens=(5, 9, 7), parents=(-1, 0, -1))
    >>> scheduled_tree(t, (5, 9, 7)).parents, scheduled_tree(t, (5, 9)), scheduled_tree(t, (5, 8))
    ((-1, 0, -1), None, None)
    """
    n = len(drafts)
    if tree is None or n == 0 or n > len(tree) or tuple(int(t) for t in drafts) != tree.tokens[:n]:
        return None
    scheduled = tree.prefix(n)
    return None if best_path_length(scheduled) == n else scheduled


def plan_step(trees: Sequence[DraftTree | None], scheduled_drafts: Sequence[Sequence[int]],
              query_start: Sequence[int]) -> TreePlan:
    """Tree requests of a step (``query_start``: ``[R+1]`` flat offsets of each request's tokens).

    A request is planned as a tree when its drafter proposed a tree, the scheduled drafts are a
    prefix of its tokens, they are the request's last scheduled tokens after the root, and the
    scheduled prefix is not a chain.
    """
    out = []
    for r, (tree, drafts) in enumerate(zip(trees, scheduled_drafts)):
        scheduled = scheduled_tree(tree, drafts)
        if scheduled is None:
            continue  # no tree, or a chain: the native path verifies it
        n = len(drafts)
        start, end = int(query_start[r]), int(query_start[r + 1])
        if end - start < n + 1:
            continue
        out.append(RequestTree(req_index=r, row_start=end - (n + 1), tree=scheduled))
    return TreePlan(tuple(out))


def position_deltas(plan: TreePlan, num_tokens: int) -> np.ndarray:
    """``[num_tokens]`` int64 to add to the runner's sequential positions (zero off trees)."""
    delta = np.zeros(num_tokens, dtype=np.int64)
    for r in plan.requests:
        rows = len(r.tree) + 1
        delta[r.row_start : r.row_start + rows] = depth_positions(r.tree, 0) - np.arange(rows)
    return delta
