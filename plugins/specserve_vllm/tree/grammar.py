"""Grammar pruning of a draft tree: the nodes a grammar allows, and one token mask per node.

A structured-output request may only verify draft nodes its grammar allows, and each kept
node's logits need the mask of the grammar state after that node's path. xgrammar walks a
tree given in the rows of :func:`~specserve_vllm.tree.draft.first_child_next_sibling`. Row 0 is
the last committed token: its id is not read, and its row is the mask of the current state.
Each node's row is the mask of the token that may follow its path; a node the grammar rejects
gets an empty row and its subtree is not visited. The matcher ends in the state it started in.

The pure parts (:func:`allowed`, :func:`kept_nodes`, :func:`select`) do not import xgrammar;
:func:`grammar_prune` runs the walk. This is the building block of grammar-pruned trees
(``docs/trees.md``, "Grammar-pruned trees"); the engine does not call it yet, and
structured-output requests verify chains.

    >>> tree = DraftTree((1, 2, 3, 1), (-1, 0, 0, -1))
    >>> rows = np.zeros((5, 1), dtype=np.int32)
    >>> rows[0, 0], rows[1, 0] = 0b0010, 0b1000   # root allows token 1; after it, token 3
    >>> kept_nodes(tree, rows)
    (True, False, True, True)
    >>> select(tree, kept_nodes(tree, rows))
    DraftTree(tokens=(1, 3, 1), parents=(-1, 0, -1))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from specserve_vllm.tree.draft import DraftTree, first_child_next_sibling


def allowed(bitmask: np.ndarray, row: int, token: int) -> bool:
    """Whether ``token``'s bit is set in ``bitmask[row]`` (32 tokens per int32 word).

    >>> allowed(np.array([[0b100, 0]], dtype=np.int32), 0, 2), allowed(np.array([[0b100, 0]]), 0, 34)
    (True, False)
    """
    word = int(bitmask[row, token >> 5]) & 0xFFFFFFFF
    return bool((word >> (token & 31)) & 1)


def kept_nodes(tree: DraftTree, bitmask: np.ndarray) -> tuple[bool, ...]:
    """Per node: its parent is kept and the parent's row (row 0 for the root's children) allows
    its token. Rows as in :func:`first_child_next_sibling`: node ``i``'s row is ``i + 1``."""
    keep: list[bool] = []
    for tok, parent in zip(tree.tokens, tree.parents):
        keep.append((parent < 0 or keep[parent]) and allowed(bitmask, parent + 1, tok))
    return tuple(keep)


def select(tree: DraftTree, keep: Sequence[bool]) -> DraftTree:
    """The nodes marked in ``keep`` (closed under ancestors), re-indexed; still DFS preorder."""
    index: dict[int, int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for i, (tok, parent) in enumerate(zip(tree.tokens, tree.parents)):
        if not keep[i]:
            continue
        if parent >= 0 and parent not in index:
            raise ValueError(f"node {i} is kept but its parent {parent} is not")
        index[i] = len(tokens)
        tokens.append(tok)
        parents.append(index[parent] if parent >= 0 else -1)
    return DraftTree(tuple(tokens), tuple(parents))


def leaves(tree: DraftTree) -> tuple[int, ...]:
    """Nodes without children, in preorder (the best path's end first).

    >>> leaves(DraftTree((5, 9, 7), (-1, 0, -1)))
    (1, 2)
    """
    return tuple(i for i in range(len(tree)) if _is_leaf(tree, i))


def _is_leaf(tree: DraftTree, node: int) -> bool:
    # in preorder a node's first child, if any, comes right after it
    return node + 1 == len(tree) or tree.parents[node + 1] != node


def graft(tree: DraftTree, chains: Mapping[int, Sequence[int]]) -> DraftTree:
    """``tree`` with ``chains[leaf]`` hung below each given leaf as its only child chain, placed
    right after the leaf so the result is still DFS preorder (grammar-forced tokens extend the
    branches that survived pruning).

    >>> graft(DraftTree((5, 9, 7), (-1, 0, -1)), {1: (3, 4), 2: (8,)})
    DraftTree(tokens=(5, 9, 3, 4, 7, 8), parents=(-1, 0, 1, 2, -1, 4))
    """
    index: dict[int, int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for i, (tok, parent) in enumerate(zip(tree.tokens, tree.parents)):
        index[i] = len(tokens)
        tokens.append(tok)
        parents.append(index[parent] if parent >= 0 else -1)
        chain = chains.get(i, ())
        if chain and not _is_leaf(tree, i):
            raise ValueError(f"node {i} has children; only leaves are grafted onto")
        for tok_forced in chain:
            tokens.append(int(tok_forced))
            parents.append(len(tokens) - 2)
    return DraftTree(tuple(tokens), tuple(parents))


def grammar_prune(tree: DraftTree, matcher: Any, vocab_size: int) -> tuple[DraftTree, np.ndarray]:
    """``(the nodes matcher's grammar allows, their mask rows)`` for one request's tree.

    ``matcher``: an ``xgrammar.GrammarMatcher`` in the request's current state (unchanged on
    return). The rows are ``[len(pruned) + 1, words]``: row 0 for the token after the committed
    one, then one per kept node, in the pruned tree's order (the order vLLM lays a request's
    draft rows out in).
    """
    import torch
    import xgrammar

    first, sibling = first_child_next_sibling(tree)
    tokens = torch.tensor((0, *tree.tokens), dtype=torch.int64)
    bitmask = xgrammar.allocate_token_bitmask(len(tree) + 1, vocab_size)
    matcher.traverse_draft_tree(torch.tensor(first, dtype=torch.int64), torch.tensor(sibling, dtype=torch.int64),
                                tokens, bitmask)
    rows = bitmask.numpy()
    keep = kept_nodes(tree, rows)
    order = [0] + [i + 1 for i, k in enumerate(keep) if k]
    return select(tree, keep), rows[order].copy()
