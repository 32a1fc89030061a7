"""Token Recycling tree drafts at a node budget: a static template or a DySpec dynamic tree.

The engine setting ``tree`` picks the shape (``chain`` drafts the best path only, as before):

* ``static``: the breadth-first template :data:`STATIC_WIDTHS` (``widths[d]`` children per node
  at depth ``d``) cut at the budget, so shallow levels are kept (Token Recycling's static tree,
  scaled down to the budgets a small CPU engine verifies);
* ``dynamic``: DySpec's greedy growth over the matrix rows, scored with a per-rank acceptance
  since the matrix carries no probabilities: how often the matrix's rank-``r`` candidate was the
  target's next token, measured online (:func:`rank_hits`) and shrunk towards
  :data:`RANK_ACCEPTANCE` while few positions are seen (:func:`rank_acceptance`). With per-row
  counts (:func:`row_hits`) each row's candidates are scored by that row's own record, shrunk
  towards the engine-wide rates (:func:`row_acceptance`): a row whose first candidate keeps
  missing gets width, one that keeps hitting gets depth.

Both return DFS preorder with the best child first, so the scheduler may cut a tree to any
prefix and the chain draft is its first-child path.

    >>> import numpy as np
    >>> m = np.array([[1, 2], [2, 0], [0, 1]], dtype=np.int16)
    >>> recycling_tree(m, root=0, shape="static", budget=4)
    DraftTree(tokens=(1, 2, 0, 2), parents=(-1, 0, 0, -1))
    >>> recycling_tree(m, root=0, shape="chain", budget=3)
    DraftTree(tokens=(1, 2, 0), parents=(-1, 0, 1))
    >>> len(recycling_tree(m, root=0, shape="dynamic", budget=5))
    5
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

from specserve_vllm.drafters import recycling
from specserve_vllm.tree.build import SMALL_BUDGET_WIDTHS, dynamic_tree, rank_prior, recycling_expander
from specserve_vllm.tree.draft import DraftTree

TreeShape = Literal["chain", "static", "dynamic"]
TREE_SHAPES: tuple[str, ...] = get_args(TreeShape)

STATIC_WIDTHS: tuple[int, ...] = SMALL_BUDGET_WIDTHS
"""Children per node by depth (the shared small-budget template of :mod:`specserve_vllm.tree.build`)."""

RANK_ACCEPTANCE: tuple[float, ...] = (0.6, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01)
"""Assumed chance that the matrix's rank-``r`` candidate is the target's next token, before any
is measured (a guess, not fitted)."""

PRIOR_WEIGHT = 32.0
"""Pseudo-positions the assumed rates count for against the measured ones."""


ROW_PRIOR_WEIGHT = 8.0
"""Pseudo-positions the engine-wide rates count for against one row's own record."""


def hit_ranks(matrix: np.ndarray, input_tokens: np.ndarray, next_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, ranks)`` of the positions whose input token has a matrix row: the rank of the
    target's next token among that row's candidates (``k``: not among them).

    >>> m = np.array([[1, 2], [2, 0], [-1, -1]], dtype=np.int16)
    >>> [a.tolist() for a in hit_ranks(m, np.array([0, 0, 1, 2, 7]), np.array([1, 2, 1, 0, 0]))]
    [[0, 0, 1, 2], [0, 1, 2, 2]]
    """
    vocab, k = matrix.shape
    tokens = np.asarray(input_tokens, dtype=np.int64).reshape(-1)
    nxt = np.asarray(next_tokens, dtype=np.int64).reshape(-1)
    valid = (tokens >= 0) & (tokens < vocab)
    tokens, nxt = tokens[valid], nxt[valid]
    hit = matrix[tokens] == nxt[:, None]  # [n, k]
    return tokens, np.where(hit.any(axis=1), hit.argmax(axis=1), k)


def rank_hits(matrix: np.ndarray, input_tokens: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """``[k + 1]`` counts: at how many positions the target's next token was the matrix's rank-``r``
    candidate for the input token (column ``k``: not among them). Call before the matrix learns
    these positions.

    >>> m = np.array([[1, 2], [2, 0], [-1, -1]], dtype=np.int16)
    >>> rank_hits(m, np.array([0, 0, 1, 2]), np.array([1, 2, 1, 0])).tolist()
    [1, 1, 2]
    """
    return np.bincount(hit_ranks(matrix, input_tokens, next_tokens)[1], minlength=matrix.shape[1] + 1)


def row_hits(counts: np.ndarray, tokens: np.ndarray, ranks: np.ndarray) -> None:
    """Add each position's rank (:func:`hit_ranks`) to its input token's row of ``counts``
    (``[vocab, k + 1]``), in place.

    >>> c = np.zeros((3, 3), dtype=np.int32)
    >>> row_hits(c, np.array([0, 0, 1]), np.array([0, 2, 1])); c.tolist()
    [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    """
    np.add.at(counts, (tokens, ranks), 1)


def row_acceptance(counts: np.ndarray, engine_wide: tuple[float, ...],
                   weight: float = ROW_PRIOR_WEIGHT) -> tuple[float, ...]:
    """Per-rank acceptance of one row (``counts``: its ``[k + 1]`` record), shrunk towards the
    engine-wide rates with ``weight`` pseudo-positions.

    >>> row_acceptance(np.array([0, 0, 0]), (0.8, 0.1))
    (0.8, 0.1)
    >>> [round(a, 2) for a in row_acceptance(np.array([0, 4, 0]), (0.8, 0.1), weight=4)]  # its first keeps missing
    [0.4, 0.55]
    """
    # Plain Python: called once per expanded node of every dynamic tree, on ``k + 1`` numbers.
    c = counts.tolist() if isinstance(counts, np.ndarray) else list(counts)
    total = sum(c) + weight
    return tuple((c[r] + weight * a) / total for r, a in enumerate(engine_wide[: len(c) - 1]))


def rank_acceptance(hits: np.ndarray) -> tuple[float, ...]:
    """Per-rank acceptance from :func:`rank_hits` totals, shrunk towards :data:`RANK_ACCEPTANCE`.

    >>> [round(a, 3) for a in rank_acceptance(np.array([0, 0, 0]))]
    [0.6, 0.15]
    >>> [round(a, 3) for a in rank_acceptance(np.array([900, 50, 50]))]
    [0.891, 0.053]
    """
    counts = np.asarray(hits, dtype=np.float64)
    k = counts.size - 1
    prior = np.array([RANK_ACCEPTANCE[r] if r < len(RANK_ACCEPTANCE) else 0.0 for r in range(k)])
    return tuple(((counts[:k] + PRIOR_WEIGHT * prior) / (counts.sum() + PRIOR_WEIGHT)).tolist())


def recycling_tree(matrix: np.ndarray, root: int, shape: TreeShape, budget: int,
                   acceptance: tuple[float, ...] = RANK_ACCEPTANCE, rows: np.ndarray | None = None) -> DraftTree:
    """One request's draft of at most ``budget`` nodes from ``root`` (its last token);
    ``acceptance`` per rank scores ``dynamic`` trees, per row when ``rows`` (``[vocab, k + 1]``,
    :func:`row_hits`) gives each row's record."""
    if budget <= 0:
        return DraftTree.empty()
    if shape == "chain":
        return DraftTree.chain(recycling.draft_chain(matrix, root, budget))
    if shape == "static":
        return recycling.draft_tree(matrix, root, STATIC_WIDTHS, max_nodes=budget)
    if shape == "dynamic":
        prior: Any = rank_prior(acceptance)
        if rows is not None:
            def prior(tok: int) -> tuple[float, ...]:
                return rank_prior(row_acceptance(rows[tok], acceptance))
        expand = recycling_expander(matrix, root, prior)
        return dynamic_tree(expand, budget, max_depth=budget, width=matrix.shape[1])
    raise ValueError(f"unknown tree shape {shape!r}; choose one of {', '.join(TREE_SHAPES)}")
