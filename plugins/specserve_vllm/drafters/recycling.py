"""Token Recycling: draft from a matrix of the target model's own past top-k predictions.

Paper: "Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token
Recycling". Every verification step computes the target's logits at each verified position; the
top-k of those logits is normally thrown away. Token Recycling keeps it in an *adjacency matrix*
``M`` of shape ``[vocab, k]``: row ``t`` holds the top-k next tokens the target predicted the last
time it saw token ``t`` as input, best first. Drafting walks the matrix breadth-first from the
sequence's last token, which yields a draft tree (a chain when every node keeps one child),
returned in DFS preorder like every :class:`~specserve_vllm.tree.draft.DraftTree`.

One matrix serves the whole engine (all requests feed it, and it outlives requests): the paper
finds the shared, persistent matrix works better than per-request ones.

Memory: ``vocab * k`` ids. Ids are ``int16`` when ``vocab_size <= 32767`` (every id and the
empty marker ``-1`` fit), else ``int32``. A 32k vocabulary with ``k = 8`` takes
``32000 * 8 * 2`` bytes = 500 KiB; a 128k vocabulary takes 4 MiB.

Worked example (vocab 6, k 2)::

    >>> import numpy as np
    >>> m = new_matrix(6, k=2)
    >>> m = update(m, prev_tokens=np.array([1, 3]), topk_ids=np.array([[3, 4], [5, 1]]))
    >>> m[1].tolist(), m[3].tolist(), m[0].tolist()
    ([3, 4], [5, 1], [-1, -1])
    >>> t = draft_tree(m, root=1, widths=(2, 1))
    >>> t.tokens, t.parents          # 1 -> {3, 4}; 3 -> 5; 4 has no row yet
    ((3, 5, 4), (-1, 0, -1))
    >>> draft_chain(m, root=1, length=3)   # 1 -> 3 -> 5 -> (row 5 empty)
    (3, 5)

This module is pure (numpy only, no vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from specserve_vllm.tree.draft import DraftTree, best_path, from_topological

EMPTY = -1
"""Matrix entry meaning "no candidate recorded"."""

DEFAULT_K = 8
"""Candidates kept per token (the paper uses 8)."""


def matrix_dtype(vocab_size: int) -> np.dtype:
    """``int16`` when every id (and ``EMPTY``) fits, else ``int32``.

    >>> matrix_dtype(32000), matrix_dtype(32768)
    (dtype('int16'), dtype('int32'))
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def new_matrix(vocab_size: int, k: int = DEFAULT_K) -> np.ndarray:
    """An empty ``[vocab_size, k]`` matrix (all ``EMPTY``)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return np.full((vocab_size, k), EMPTY, dtype=matrix_dtype(vocab_size))


def _rows_to_write(matrix: np.ndarray, prev_tokens: np.ndarray, topk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [m], candidates [m, k])`` int64 of the positions whose input token has a row;
    out-of-range candidates become ``EMPTY``. Raises on a ``topk_ids`` of the wrong shape."""
    vocab, k = matrix.shape
    prev = np.asarray(prev_tokens, dtype=np.int64).reshape(-1)
    cand = np.asarray(topk_ids)
    if cand.ndim != 2 or cand.shape[0] != prev.shape[0]:
        raise ValueError(f"topk_ids must be [{prev.shape[0]}, >={k}], got {list(cand.shape)}")
    if cand.shape[1] < k:
        raise ValueError(f"topk_ids has {cand.shape[1]} columns, the matrix needs {k}")
    valid = (prev >= 0) & (prev < vocab)
    prev, cand = prev[valid], cand[valid, :k].astype(np.int64)
    return prev, np.where((cand >= 0) & (cand < vocab), cand, EMPTY)


def update_inplace(matrix: np.ndarray, prev_tokens: np.ndarray, topk_ids: np.ndarray) -> None:
    """Overwrite row ``prev_tokens[i]`` with ``topk_ids[i, :k]`` for every i, in place.

    ``prev_tokens``: ``[n]`` input token at each verified position; ``topk_ids``: ``[n, >=k]``
    the target's top candidates for the next token there, best first. When a token occurs
    more than once the last occurrence wins (it saw the most context). Out-of-range input
    tokens (e.g. padding ``-1``) are skipped; out-of-range candidates (padded vocabulary
    columns) are stored as ``EMPTY``.
    """
    prev, cand = _rows_to_write(matrix, prev_tokens, topk_ids)
    if prev.size == 0:
        return
    # Keep only the last occurrence of each token so the result does not depend on how
    # numpy orders duplicate writes.
    _, first_in_reversed = np.unique(prev[::-1], return_index=True)
    keep = prev.size - 1 - first_in_reversed
    matrix[prev[keep]] = cand[keep].astype(matrix.dtype, copy=False)


def update_successors_inplace(matrix: np.ndarray, prev_tokens: np.ndarray, topk_ids: np.ndarray) -> None:
    """Like :func:`update_inplace`, but row ``t`` keeps a history: the new top-1 first, then the
    row as it was (without that token), then the rest of the new top-k, duplicates dropped,
    cut to ``k``. Rank 0 is exactly :func:`update_inplace`'s (a chain drafts the same tokens);
    the other ranks become the recent, distinct top-1 successors of ``t`` across contexts, which
    a draft tree can branch into. Positions are applied in order (a repeated token updates its
    row once per occurrence).

        >>> m = new_matrix(6, k=3)
        >>> update_successors_inplace(m, np.array([1]), np.array([[3, 4, 5]])); m[1].tolist()
        [3, 4, 5]
        >>> update_successors_inplace(m, np.array([1, 1]), np.array([[2, 3, 0], [4, 0, 5]])); m[1].tolist()
        [4, 2, 3]
    """
    vocab, k = matrix.shape
    prev = np.asarray(prev_tokens).reshape(-1)
    cand = np.asarray(topk_ids)
    if cand.ndim != 2 or cand.shape[0] != prev.shape[0] or cand.shape[1] < k:
        raise ValueError(f"topk_ids must be [{prev.shape[0]}, >={k}], got {list(cand.shape)}")
    # Plain Python over the few rows of a step: two numpy calls in all (one read, one write),
    # where array operations per row cost several times more right after a forward pass.
    tokens = prev.tolist()
    distinct = [t for t in dict.fromkeys(tokens) if 0 <= t < vocab]
    if not distinct:
        return
    rows: dict[int, list[int]] = dict(zip(distinct, matrix[distinct].tolist()))
    for t, new in zip(tokens, cand[:, :k].tolist()):
        old = rows.get(t)
        if old is None:
            continue
        row: list[int] = []
        for c in (new[0], *old, *new[1:]):
            if 0 <= c < vocab and c not in row:
                row.append(c)
                if len(row) == k:
                    break
        rows[t] = row + [EMPTY] * (k - len(row))
    matrix[distinct] = list(rows.values())


def update(matrix: np.ndarray, prev_tokens: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """Pure form of :func:`update_inplace`: returns an updated copy, ``matrix`` is unchanged."""
    out = matrix.copy()
    update_inplace(out, prev_tokens, topk_ids)
    return out


def draft_tree(
    matrix: np.ndarray, root: int, widths: Sequence[int], max_nodes: int | None = None
) -> DraftTree:
    """Breadth-first expansion of the matrix from ``root`` (the sequence's last token).

    ``widths[d]`` is how many candidates each node at depth ``d`` expands (``d = 0`` is the
    root), so ``len(widths)`` is the tree's maximum depth: a static tree template in the
    paper's sense. Children come in the matrix's rank order (best first); expansion stops at
    ``EMPTY`` entries and after ``max_nodes`` nodes (so a budget keeps the shallow levels).
    The breadth-first result is returned in DFS preorder, so the best path is its prefix.

    >>> m = np.array([[1, 2], [2, 0], [-1, -1]], dtype=np.int16)
    >>> draft_tree(m, root=0, widths=(2, 2))      # BFS 1, 2 | 2, 0 under 1
    DraftTree(tokens=(1, 2, 0, 2), parents=(-1, 0, 0, -1))
    """
    vocab = matrix.shape[0]
    tokens: list[int] = []
    parents: list[int] = []
    budget = max_nodes if max_nodes is not None else sum(_level_sizes(widths))
    frontier: list[tuple[int, int]] = [(-1, int(root))]  # (node index, token)
    for width in widths:
        nxt: list[tuple[int, int]] = []
        for node, tok in frontier:
            if not 0 <= tok < vocab:
                continue
            for cand in matrix[tok, :width].tolist():
                if cand == EMPTY or len(tokens) >= budget:
                    break
                tokens.append(int(cand))
                parents.append(node)
                nxt.append((len(tokens) - 1, int(cand)))
        if not nxt:
            break
        frontier = nxt
    return from_topological(tokens, parents)[0]


def draft_chain(matrix: np.ndarray, root: int, length: int) -> tuple[int, ...]:
    """The best path of a width-1 tree of depth ``length``: follow each row's top candidate."""
    if length <= 0:
        return ()
    return best_path(draft_tree(matrix, root, (1,) * length))


def draft_chains(matrix: np.ndarray, roots: np.ndarray, length: int) -> list[list[int]]:
    """:func:`draft_chain` for many roots at once (vectorised over the batch; same result).

    >>> m = np.array([[1, 2], [2, 0], [-1, -1]], dtype=np.int16)
    >>> draft_chains(m, np.array([0, 2, 1]), 3)
    [[1, 2], [], [2]]
    """
    vocab = matrix.shape[0]
    cur = np.asarray(roots, dtype=np.int64).reshape(-1)
    if length <= 0 or cur.size == 0:
        return [[] for _ in range(cur.size)]
    alive = (cur >= 0) & (cur < vocab)
    steps = np.full((cur.size, length), EMPTY, dtype=np.int64)  # [n, length]
    for d in range(length):
        nxt = np.where(alive, matrix[np.where(alive, cur, 0), 0], EMPTY).astype(np.int64)
        alive &= (nxt >= 0) & (nxt < vocab)
        steps[:, d] = np.where(alive, nxt, EMPTY)
        cur = nxt
        if not alive.any():
            break
    lengths = np.where((steps == EMPTY).any(axis=1), (steps == EMPTY).argmax(axis=1), steps.shape[1])
    return [row[:n].tolist() for row, n in zip(steps, lengths.tolist())]


def _level_sizes(widths: Sequence[int]) -> list[int]:
    sizes, n = [], 1
    for w in widths:
        n *= max(int(w), 0)
        sizes.append(n)
    return sizes
