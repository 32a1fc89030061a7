"""The draft-tree value type: draft tokens plus the index of each token's parent.

A draft tree hangs off the *root*, the last token already in the sequence (not itself a draft).
Node ``i`` holds ``tokens[i]``; ``parents[i]`` is the index of its parent node, or ``-1`` when
the parent is the root. Nodes are in breadth-first order, so ``parents[i] < i`` always, and
siblings appear in the drafter's preference order (best first).

Example: root ``r`` with children ``5`` and ``7``; ``5`` has child ``9``::

    >>> t = DraftTree(tokens=(5, 7, 9), parents=(-1, -1, 0))
    >>> t.depths()
    (1, 1, 2)
    >>> t.children(-1), t.children(0)
    ((0, 1), (2,))
    >>> t.path_to(2)
    (5, 9)
    >>> best_path(t)
    (5, 9)

Masks, positions and retrieve paths for tree verification are pure functions of this value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens and their parent indices, in breadth-first order (validated on construction)."""

    tokens: tuple[int, ...]
    """Draft token ids, one per node."""
    parents: tuple[int, ...]
    """Parent node index per node; ``-1`` means the root (the sequence's last token)."""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"tokens and parents differ in length: {len(self.tokens)} != {len(self.parents)}"
            )
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must satisfy -1 <= parent < index")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(tokens=(), parents=())

    @classmethod
    def chain(cls, tokens: tuple[int, ...] | list[int]) -> DraftTree:
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

    def path_to(self, node: int) -> tuple[int, ...]:
        """Draft tokens from the root's first child down to ``node`` inclusive."""
        path: list[int] = []
        while node >= 0:
            path.append(self.tokens[node])
            node = self.parents[node]
        return tuple(reversed(path))


def best_path(tree: DraftTree) -> tuple[int, ...]:
    """The chain draft of a tree: from the root, repeatedly descend into the first child.

    Siblings are stored best first, so this is the drafter's single most preferred
    continuation. ``best_path(DraftTree((5, 7, 9, 3), (-1, -1, 1, 0))) == (5, 3)``.
    """
    first_child: dict[int, int] = {}
    for i, p in enumerate(tree.parents):
        first_child.setdefault(p, i)
    path: list[int] = []
    node = first_child.get(-1)
    while node is not None:
        path.append(tree.tokens[node])
        node = first_child.get(node)
    return tuple(path)
