"""Tree verification: which draft path the target accepts, plus the bonus token.

The target scores all ``1 + N`` rows of a request in one forward pass (row 0 the root, row
``1 + i`` node ``i``; see :mod:`specserve_vllm.tree.draft`). Row ``r`` holds the target's
next-token distribution after the path to ``r``, so verification walks down the tree:

* greedy (temperature 0): at the current row take the target's argmax; if a child holds it,
  descend into that child, else emit it as the bonus token and stop. The output is exactly
  what greedy decoding without speculation would produce (one more token at a leaf).
* sampling (temperature > 0, deterministic drafts): draw one token ``x`` from the target at
  every row (independently, all at once); walk from the root: if a child holds the current
  row's ``x`` descend, else emit ``x`` and stop. Every emitted token is a draw from the target
  at exactly the context it would have had without speculation, so the output distribution is
  the target's (lossless). A draft token is accepted with the target's probability of it: the
  same acceptance as SpecInfer/SGLang's target-only tree sampling for drafts that carry no
  probabilities. A chain is the tree without branches (:func:`chain_outputs` walks a step's
  chains at once).

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


def _check_tokens(tree: DraftTree, tokens: Sequence[int] | np.ndarray) -> list[int]:
    out = np.asarray(tokens).tolist()
    if len(out) != len(tree) + 1:
        raise ValueError(f"expected {len(tree) + 1} row tokens for a {len(tree)}-node tree, got {len(out)}")
    return out


def _children_by_row(tree: DraftTree) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    for i, p in enumerate(tree.parents):
        kids[p + 1].append(i)
    return kids


def verify_greedy(tree: DraftTree, logits: np.ndarray) -> TreeVerdict:
    """Follow the target's argmax down the tree (``logits``: ``[N+1, vocab]``);
    :func:`verify_argmax` over each row's argmax."""
    return verify_argmax(tree, _check_rows(tree, logits).argmax(axis=-1))


def verify_argmax(tree: DraftTree, target: Sequence[int] | np.ndarray) -> TreeVerdict:
    """Follow ``target`` (``[N+1]``, the target's argmax after each row) down the tree.

    When siblings repeat a token, the one with the longer matching descent is taken, so the
    accepted path is the longest path the target agrees with.

    >>> verify_argmax(DraftTree(tokens=(1, 3, 2), parents=(-1, 0, -1)), [1, 3, 0, 5]).tokens
    (1, 3, 0)
    """
    target = _check_tokens(tree, target)
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


def verify_drawn(tree: DraftTree, draws: Sequence[int] | np.ndarray) -> TreeVerdict:
    """Lossless verification at temperature > 0 for deterministic drafts, over one draw from
    the target's sampling law per row (``draws``: ``[N+1]``, drawn independently).

    From the root: if a child holds the current row's draw, descend into it (the first such
    child: the choice must not look at deeper draws), else emit the draw and stop. Every
    emitted token is the draw of a row whose context is exactly the tokens emitted before it,
    so the output follows the target's law; rows off the walked path are drawn and unused.

    >>> verify_drawn(DraftTree(tokens=(1, 3, 2), parents=(-1, 0, -1)), [2, 9, 9, 7])
    TreeVerdict(accepted=(2,), tokens=(2, 7))
    """
    draws = _check_tokens(tree, draws)
    kids = _children_by_row(tree)
    accepted: list[int] = []
    row = 0
    while True:
        node = next((c for c in kids[row] if tree.tokens[c] == draws[row]), None)
        if node is None:
            return TreeVerdict(tuple(accepted), (*(tree.tokens[i] for i in accepted), int(draws[row])))
        accepted.append(node)
        row = node + 1


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


def chain_outputs(draft_ids: np.ndarray, num_drafts: Sequence[int], row_tokens: np.ndarray,
                  width: int) -> np.ndarray:
    """``[R, width]`` int32: each request's accepted drafts then the token of its first row
    that did not match, padded with ``-1``, in vLLM's layout for a step's output.

    A chain is a tree without branches, so its walk needs one token per logits row: request
    ``r`` owns ``num_drafts[r] + 1`` consecutive rows of ``row_tokens`` (the target's argmax,
    or one draw from its law, per row) and its drafts are the next ``num_drafts[r]`` of
    ``draft_ids``. Draft ``j`` is accepted when row ``j`` gave it and every earlier draft was
    accepted; the first row that gave another token emits that token (at a chain's end, the
    last row's token is the bonus). Drawing every row at once is lossless: row ``j``'s token is
    only used when the context before it is exactly what the target produced.

    >>> chain_outputs(np.array([5, 6, 7, 9]), [3, 1], np.array([5, 6, 8, 1, 4, 2]), 4).tolist()
    [[5, 6, 8, -1], [4, -1, -1, -1]]
    >>> chain_outputs(np.array([5, 6]), [2, 0], np.array([5, 6, 3, 8]), 3).tolist()
    [[5, 6, 3], [8, -1, -1]]
    """
    n = np.asarray(num_drafts, dtype=np.int64)
    drafts = np.asarray(draft_ids, dtype=np.int64)
    tokens = np.asarray(row_tokens, dtype=np.int64)
    if len(drafts) != n.sum() or len(tokens) != n.sum() + len(n):
        raise ValueError(f"{len(drafts)} drafts and {len(tokens)} rows for draft counts {n.tolist()}")
    if n.size and n.max() + 1 > width:
        raise ValueError(f"a request emits up to {int(n.max()) + 1} tokens, more than width {width}")
    longest = int(n.max(initial=0))
    row_start = np.cumsum(n + 1) - (n + 1)
    draft_start = np.cumsum(n) - n
    cols = np.arange(longest + 1)
    tok = tokens[row_start[:, None] + np.minimum(cols, n[:, None])]  # [R, longest + 1]
    at = np.minimum(draft_start[:, None] + cols[:longest], max(len(drafts) - 1, 0))  # past a row's drafts: masked
    own = drafts[at] if drafts.size else tok[:, :longest]
    match = (own == tok[:, :longest]) & (cols[:longest] < n[:, None])
    accepted = np.cumprod(match, axis=1).sum(axis=1)
    out = np.full((len(n), width), -1, dtype=np.int32)
    out[:, : longest + 1] = np.where(cols <= accepted[:, None], tok, -1)
    return out
