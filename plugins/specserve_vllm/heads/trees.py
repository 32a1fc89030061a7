"""Medusa / Hydra tree drafts at a node budget: a static template or a DySpec dynamic tree.

The heads' candidates come with real draft log-probabilities
(:func:`~specserve_vllm.tree.heads_expand.heads_expander`), so DySpec scores a candidate with its
path's draft probability. Depth is bounded by the number of heads. Both shapes are DFS preorder
with the best child first; the first-child path is the heads' greedy chain.
"""

from __future__ import annotations

from typing import Any

import torch

from specserve_vllm.tree.build import SMALL_BUDGET_WIDTHS, dynamic_tree, static_tree
from specserve_vllm.tree.draft import DraftTree
from specserve_vllm.tree.heads_expand import heads_expander

CANDIDATES = 4
"""Top candidates per head a tree may branch into."""

LOOKAHEAD = 8
"""Waiting candidates a DySpec expansion also runs through the heads (one batched call per
depth instead of one call per node; the tree does not change)."""


def heads_tree(heads: Any, state: torch.Tensor, first_token: int, lm_head: torch.Tensor, embed: torch.Tensor,
               shape: str, budget: int) -> DraftTree:
    """One request's tree of at most ``budget`` nodes from its heads' input ``state [d]`` and its
    last sampled token ``first_token``; ``shape`` is ``static`` or ``dynamic``."""
    if budget <= 0:
        return DraftTree.empty()
    expand = heads_expander(heads, state, first_token, lm_head, embed, CANDIDATES)
    depth = min(budget, int(heads.config.num_heads))
    if shape == "static":
        return static_tree(expand, SMALL_BUDGET_WIDTHS[:depth], max_nodes=budget)
    if shape == "dynamic":
        return dynamic_tree(expand, budget, max_depth=depth, width=CANDIDATES, lookahead=LOOKAHEAD)
    raise ValueError(f"no tree shape {shape!r} for heads; choose static or dynamic")
