"""KV compaction: after verification, move the accepted path's K/V to contiguous rows.

A verification step writes the K/V of its ``1 + N`` rows (root, then the nodes in preorder) to
``1 + N`` consecutive positions. When the target accepts the path ``i_1, ..., i_a`` (node
indices, root's child first), the sequence continues as ``root, tok(i_1), ..., tok(i_a)``: node
``i_j`` must end up in row ``j``. Rows are offsets from the root's row; the engine maps them to
cache slots with the step's slot mapping (:func:`slot_moves`), so the moves do not depend on
the cache layout.

Alias safety: ``i_1 < i_2 < ...`` and ``i_j >= j - 1``, so every source row ``1 + i_j`` is at or
after its destination ``j`` and after every earlier destination. Applying the moves one by one
in order never reads a row that an earlier move overwrote. The best path (the preorder prefix)
needs no moves.

    >>> from specserve_vllm.tree.draft import DraftTree
    >>> t = DraftTree(tokens=(5, 9, 7, 8), parents=(-1, 0, -1, 2))
    >>> kv_moves(t, (2, 3))           # accept 7 -> 8: rows 3, 4 move to 1, 2
    (KVMove(src=3, dst=1), KVMove(src=4, dst=2))
    >>> kv_moves(t, (0, 1))           # the best path is already in place
    ()
    >>> slot_moves(kv_moves(t, (2,)), row_slots=(40, 41, 42, 43, 44))
    ((43, 41),)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specserve_vllm.tree.draft import DraftTree


@dataclass(frozen=True)
class KVMove:
    """Copy the K/V of row ``src`` to row ``dst`` (rows are offsets from the root's row)."""

    src: int
    dst: int


def check_accepted_path(tree: DraftTree, accepted: Sequence[int]) -> tuple[int, ...]:
    """``accepted`` as a tuple, after checking it is a path from the root (``ValueError`` if not)."""
    path = tuple(int(i) for i in accepted)
    if path and (not 0 <= path[-1] < len(tree) or tree.node_path(path[-1]) != path):
        raise ValueError(f"accepted nodes {list(path)} are not a path from the root of the tree")
    return path


def kv_moves(tree: DraftTree, accepted: Sequence[int]) -> tuple[KVMove, ...]:
    """The moves that place accepted node ``i_j`` in row ``j``, in a safe application order."""
    path = check_accepted_path(tree, accepted)
    return tuple(KVMove(src=1 + i, dst=j) for j, i in enumerate(path, start=1) if 1 + i != j)


def slot_moves(moves: Sequence[KVMove], row_slots: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(src_slot, dst_slot)`` pairs from the request's ``1 + N`` slots of this step."""
    out = []
    for m in moves:
        src, dst = int(row_slots[m.src]), int(row_slots[m.dst])
        if src < 0 or dst < 0:
            raise ValueError(f"move {m} touches a padded slot ({src} -> {dst})")
        out.append((src, dst))
    return tuple(out)


def apply_moves_inplace(rows: np.ndarray, moves: Sequence[KVMove]) -> None:
    """Reference application: ``rows[m.dst] = rows[m.src]`` for each move in order.

    ``rows`` is ``[1 + N, ...]`` (one entry per row, any trailing shape), e.g. a stash of the
    step's K or V rows; the engine does the same copies between cache slots.
    """
    for m in moves:
        rows[m.dst] = rows[m.src]
