"""Tree verification: which draft path the target accepts, plus the bonus token.

The target scores all ``1 + N`` rows of a request in one forward pass (row 0 the root, row
``1 + i`` node ``i``; see :mod:`specserve_vllm.tree.draft`). Row ``r`` holds the target's
next-token distribution after the path to ``r``, so verification walks down the tree:

* greedy (temperature 0): at the current row take the target's argmax; if a child holds it,
  descend into that child, else emit it as the bonus token and stop. The output is exactly
  what greedy decoding without speculation would produce (one more token at a leaf).
* sampling (temperature > 0, deterministic drafts): at the current row draw ``x`` from the
  target; if a child holds ``x`` descend, else emit ``x`` and stop. Every emitted token is a
  draw from the target at exactly the context it would have had without speculation, so the
  output distribution is the target's (lossless). A draft token is accepted with the target's
  probability of it: the same acceptance as SpecInfer/SGLang's target-only tree sampling for
  drafts that carry no probabilities, with one random draw per emitted token.

    >>> from specserve_vllm.tree.draft import DraftTree
    >>> t = DraftTree(tokens=(1, 3, 2), parents=(-1, 0, -1))   # root -> 1 -> 3, root -> 2
    >>> logits = np.eye(4)[[2, 0, 0, 1]]   # argmax per row: root 2, node0 0, node1 0, node2 1
    >>> verify_greedy(t, logits)
    TreeVerdict(accepted=(2,), tokens=(2, 1))

This module is pure (numpy only); the engine passes its logits as arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from specserve_vllm.tree.draft import DraftTree


@dataclass(frozen=True)
class TreeVerdict:
    """The accepted path (node indices, root's child first) and the tokens to append."""

    accepted: tuple[int, ...]
    tokens: tuple[int, ...]
    """The accepted nodes' tokens then the bonus token: ``len(accepted) + 1`` tokens."""

    @property
    def bonus(self) -> int:
        return self.tokens[-1]


def _check_rows(tree: DraftTree, rows: np.ndarray) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[0] != len(tree) + 1:
        raise ValueError(f"expected [{len(tree) + 1}, vocab] rows for a {len(tree)}-node tree, got {list(arr.shape)}")
    return arr


def _children_by_row(tree: DraftTree) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    for i, p in enumerate(tree.parents):
        kids[p + 1].append(i)
    return kids


def verify_greedy(tree: DraftTree, logits: np.ndarray) -> TreeVerdict:
    """Follow the target's argmax down the tree (``logits``: ``[N+1, vocab]``).

    When siblings repeat a token, the one with the longer matching descent is taken, so the
    accepted path is the longest path the target agrees with.
    """
    rows = _check_rows(tree, logits)
    target = rows.argmax(axis=-1).tolist()  # [N+1] the target's token after each row
    kids = _children_by_row(tree)

    @cache
    def matching_depth(row: int) -> int:
        hits = [1 + matching_depth(c + 1) for c in kids[row] if tree.tokens[c] == target[row]]
        return max(hits, default=0)

    accepted: list[int] = []
    row = 0
    while True:
        hits = [c for c in kids[row] if tree.tokens[c] == target[row]]
        if not hits:
            break
        node = max(hits, key=lambda c: (matching_depth(c + 1), -c))
        accepted.append(node)
        row = node + 1
    return TreeVerdict(tuple(accepted), (*(tree.tokens[i] for i in accepted), int(target[row])))


def target_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``logits / temperature`` along the last axis (float64).

    >>> target_probs(np.log(np.array([[1.0, 3.0]])), 1.0).round(3).tolist()
    [[0.25, 0.75]]
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def _draw(p: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(p, dtype=np.float64)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


def verify_sampled(tree: DraftTree, probs: np.ndarray, rng: np.random.Generator) -> TreeVerdict:
    """Lossless verification at temperature > 0 for deterministic drafts.

    ``probs``: ``[N+1, vocab]`` the target's sampling distribution at each row (after
    temperature, top-k/top-p, penalties). Draws once per emitted token from ``rng``.
    """
    rows = _check_rows(tree, probs)
    kids = _children_by_row(tree)
    accepted: list[int] = []
    row = 0
    while True:
        x = _draw(rows[row], rng)
        node = next((c for c in kids[row] if tree.tokens[c] == x), None)
        if node is None:
            return TreeVerdict(tuple(accepted), (*(tree.tokens[i] for i in accepted), x))
        accepted.append(node)
        row = node + 1


def row_offsets(trees: Sequence[DraftTree]) -> np.ndarray:
    """``[R+1]`` start of each request's rows in the flat ``[sum(1 + N_r), vocab]`` logits.

    >>> row_offsets([DraftTree.chain([1, 2]), DraftTree.empty()]).tolist()
    [0, 3, 4]
    """
    return np.cumsum([0, *(len(t) + 1 for t in trees)], dtype=np.int64)


def sampled_token_ids(verdicts: Sequence[TreeVerdict], width: int) -> np.ndarray:
    """``[R, width]`` int32 in vLLM's layout for a step's output: tokens, padded with ``-1``.

    >>> sampled_token_ids([TreeVerdict((0,), (5, 6)), TreeVerdict((), (7,))], 3).tolist()
    [[5, 6, -1], [7, -1, -1]]
    """
    out = np.full((len(verdicts), width), -1, dtype=np.int32)
    for r, v in enumerate(verdicts):
        if len(v.tokens) > width:
            raise ValueError(f"request {r} emits {len(v.tokens)} tokens, more than width {width}")
        out[r, : len(v.tokens)] = v.tokens
    return out
