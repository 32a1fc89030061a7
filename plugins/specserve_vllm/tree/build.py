"""Tree drafts from any drafter: static top-k trees and DySpec dynamic trees.

Every drafter is seen through an *expander*: given paths (draft tokens after the root), it
returns each path's candidate next tokens with a draft log-probability, best first. Medusa
reads head ``len(path)``'s top-k (heads are independent of the path); Hydra runs head
``len(path)`` on the path's tokens (sequential heads); Token Recycling reads the adjacency
matrix row of the path's last token with a per-rank prior. Expanders take a batch of paths so
a drafter can run one forward per tree level.

* :func:`static_tree`: breadth-first, ``widths[d]`` children per node at depth ``d``, cut at a
  node budget (the Medusa/Hydra/Token Recycling templates).
* :func:`dynamic_tree` (DySpec): grow the tree one node at a time, always adding the candidate
  with the highest estimated probability of being accepted -- the product of draft
  probabilities along its path -- until the node budget. Path scores only fall with depth, so
  the result is the ``budget`` best-scored candidates, ancestor-closed, and maximises the
  estimated accepted length (the sum of path scores) among trees of that size.

Both return DFS preorder with better siblings first, so the greedy path is the node prefix.

    >>> top = medusa_expander(np.array([[5, 6], [7, 8]]), np.log(np.array([[0.6, 0.3], [0.9, 0.05]])))
    >>> static_tree(top, widths=(2, 1))
    DraftTree(tokens=(5, 7, 6, 7), parents=(-1, 0, -1, 2))
    >>> dynamic_tree(top, budget=3)          # 5 (.6), 5-7 (.54), 6 (.3) beat 6-7 (.27)
    DraftTree(tokens=(5, 7, 6), parents=(-1, 0, -1))
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np

from specserve_vllm.tree.draft import DraftTree, from_topological

SMALL_BUDGET_WIDTHS: tuple[int, ...] = (2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
"""A static template for the small node budgets a CPU engine verifies: two alternatives at the
two shallowest levels (where second candidates are most often right), single continuations
below. A budget of 8 gives depth 3, a budget of 16 depth 5."""

Path = tuple[int, ...]
Candidates = list[tuple[int, float]]
Expander = Callable[[Sequence[Path]], list[Candidates]]
"""paths -> per path its candidate next tokens ``(token, log-probability)``, best first."""


def static_tree(expand: Expander, widths: Sequence[int], max_nodes: int | None = None) -> DraftTree:
    """Breadth-first template: each node at depth ``d`` keeps its ``widths[d]`` best candidates.

    ``len(widths)`` is the maximum depth; a ``max_nodes`` budget keeps the shallow levels.
    """
    tokens: list[int] = []
    parents: list[int] = []
    budget = math.inf if max_nodes is None else max_nodes
    frontier: list[tuple[int, Path]] = [(-1, ())]
    for width in widths:
        if not frontier or len(tokens) >= budget:
            break
        nxt: list[tuple[int, Path]] = []
        for (node, path), cands in zip(frontier, expand([p for _, p in frontier])):
            for tok, _ in cands[: max(int(width), 0)]:
                if len(tokens) >= budget:
                    break
                tokens.append(int(tok))
                parents.append(node)
                nxt.append((len(tokens) - 1, (*path, int(tok))))
        frontier = nxt
    return from_topological(tokens, parents)[0]


def dynamic_tree(expand: Expander, budget: int, max_depth: int | None = None, width: int | None = None,
                 lookahead: int = 0) -> DraftTree:
    """DySpec: add the best-scored candidate until ``budget`` nodes (or no candidates are left).

    A candidate's score is its path's summed draft log-probability. ``width`` caps the
    candidates taken per expansion, ``max_depth`` the depth. Ties go to the earlier candidate.

    ``lookahead``: when a node must be expanded, also expand up to that many of the best
    waiting candidates in the same ``expand`` call (kept until they are taken). The tree is the
    same for any ``lookahead``; drafters whose expansion is a batched model call (Hydra's heads)
    make fewer, larger calls.
    """
    tokens: list[int] = []
    parents: list[int] = []
    heap: list[tuple[float, int, int, Path]] = []  # (-score, order, parent node, path incl. token)
    expanded: dict[Path, Candidates] = {}
    order = 0

    def expandable(path: Path) -> bool:
        return max_depth is None or len(path) < max_depth

    def candidates(path: Path) -> Candidates:
        if path not in expanded:
            batch = [path]
            room = budget - len(tokens) - 1  # nodes that may still be taken after this one
            if lookahead > 0 and room > 0:
                batch += [e[3] for e in heapq.nsmallest(min(lookahead, room), heap)
                          if expandable(e[3]) and e[3] not in expanded]
            expanded.update(zip(batch, expand(batch)))
        return expanded.pop(path)

    def push(node: int, path: Path, score: float) -> None:
        nonlocal order
        if not expandable(path):
            return
        for tok, logp in candidates(path)[:width]:
            if logp == -math.inf:
                continue
            heapq.heappush(heap, (-(score + float(logp)), order, node, (*path, int(tok))))
            order += 1

    push(-1, (), 0.0)
    while heap and len(tokens) < budget:
        neg, _, parent, path = heapq.heappop(heap)
        tokens.append(path[-1])
        parents.append(parent)
        if len(tokens) < budget:
            push(len(tokens) - 1, path, -neg)
    return from_topological(tokens, parents)[0]


def expected_accepted(tree: DraftTree, expand: Expander) -> float:
    """Estimated accepted tokens per step: the sum of the nodes' path probabilities.

    The estimate DySpec maximises (draft probability as the acceptance proxy); used to
    compare tree shapes at equal budgets.
    """
    total = 0.0
    score = {-1: 0.0}
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        cands = dict(reversed(expand([tree.path_to(p) if p >= 0 else ()])[0]))  # first wins
        score[i] = score[p] + cands.get(tok, -math.inf)
        total += math.exp(score[i])
    return total


def medusa_expander(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> Expander:
    """Independent heads: a path of length ``d`` continues with head ``d``'s top-k.

    ``topk_ids``, ``topk_logprobs``: ``[num_heads, k]`` for one request, best first.
    """
    ids = np.asarray(topk_ids)
    logps = np.asarray(topk_logprobs, dtype=np.float64)

    def expand(paths: Sequence[Path]) -> list[Candidates]:
        return [list(zip(ids[len(p)].tolist(), logps[len(p)].tolist())) if len(p) < ids.shape[0] else []
                for p in paths]

    return expand


def rank_prior(acceptance_by_rank: Sequence[float]) -> tuple[float, ...]:
    """Log-priors per candidate rank for drafters without probabilities (Token Recycling).

    ``acceptance_by_rank[r]``: how often rank ``r``'s candidate was the target's token
    (measured, or a guess). Zeros become ``-inf`` (never expanded first).

    >>> [round(x, 3) for x in rank_prior((0.5, 0.25, 0.0))]
    [-0.693, -1.386, -inf]
    """
    return tuple(math.log(a) if a > 0 else -math.inf for a in acceptance_by_rank)


def recycling_expander(matrix: np.ndarray, root: int,
                       log_prior: Sequence[float] | Callable[[int], Sequence[float]]) -> Expander:
    """Token Recycling: a path continues with the matrix row of its last token (or the root's).

    ``log_prior[r]`` scores the rank-``r`` candidate (see :func:`rank_prior`), or
    ``log_prior(token)[r]`` in the row of ``token``; empty entries (``-1``) end a row.
    """
    vocab, k = matrix.shape
    fixed = None if callable(log_prior) else list(log_prior)[:k]

    def expand(paths: Sequence[Path]) -> list[Candidates]:
        out: list[Candidates] = []
        for p in paths:
            tok = p[-1] if p else root
            row = matrix[tok].tolist() if 0 <= tok < vocab else []
            if fixed is not None:
                prior = fixed
            else:
                prior = list(log_prior(tok))[:k] if row else []  # type: ignore[operator]
            cands: Candidates = []
            for tok_next, logp in zip(row, prior):
                if tok_next < 0:
                    break
                cands.append((int(tok_next), float(logp)))
            out.append(cands)
        return out

    return expand
