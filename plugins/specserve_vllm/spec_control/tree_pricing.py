"""What a tree step is worth and what it costs, learned online, for the goodput controller.

With trees on (engine setting ``tree``), the controller chooses each step between no
speculation, chains (priced as before) and trees. It prices a tree of ``n`` nodes for row ``i``
against the same row's chain:

    value_i(n) = gain[n] * chain_i(min(n, depth))      (expected accepted drafts)
    time(n)    = chain step time for the same drafts * cost[bucket]

``chain_i(m)`` is the row's expected accepted drafts with a chain of ``m`` (the sum of its
survival probabilities), ``depth`` the deepest a chain can go (the number of heads for
Medusa/Hydra). ``gain[n]`` (per node count) and ``cost[bucket]`` (per batch-size bucket) are
EWMAs of measured over predicted: ``gain`` from each tree verification (accepted drafts over the
chain's expectation at plan time), ``cost`` from each step that verified trees (measured time
over the chain price of its drafts). Both start optimistic (``gain`` a little above 1, ``cost``
1), so the first steps at a batch size try trees and learn their real price; a controller that
settled on chains tries trees again every ``explore_every`` speculative steps.

    >>> p = TreePricing(max_nodes=4, gain_prior=1.2)
    >>> p.value(np.array([[0.9, 0.8, 0.7, 0.6]]), depth=4).round(2).tolist()  # chain sums 0.9 .. 3.0
    [[1.08, 2.04, 2.88, 3.6]]
    >>> p.observe_value(nodes=4, accepted=2, expected=3.0); round(float(p.gain[3]), 3)
    1.147
    >>> p.observe_time(rows=1, ratio=2.0); round(p.cost_factor(1), 2)
    1.1
"""

from __future__ import annotations

import numpy as np

from specserve_vllm.spec_control.step_time import BUCKETS, bucket

GAIN_PRIOR = 1.1
"""Starting tree gain over the chain at every node count: optimistic, so trees get tried."""


class TreePricing:
    """Per node count gain and per batch bucket cost of tree steps relative to chains."""

    def __init__(self, max_nodes: int, gain_prior: float = GAIN_PRIOR, alpha: float = 0.1,
                 explore_every: int = 128) -> None:
        self.max_nodes = max_nodes
        self.gain = np.full(max_nodes, float(gain_prior))  # [n - 1]
        self.cost = np.ones(len(BUCKETS))  # [bucket]
        self.alpha = alpha
        self.explore_every = explore_every
        self._since_tree = 0

    def value(self, survival: np.ndarray, depth: int) -> np.ndarray:
        """``[B, max_nodes]`` expected accepted drafts of a tree of ``1 .. max_nodes`` nodes per
        row, from the rows' chain survival ``[B, k]`` (``k >= 1``) and the deepest chain."""
        chain = np.cumsum(survival[:, : max(1, min(depth, survival.shape[1]))], axis=1)  # [B, d]
        cols = np.minimum(np.arange(self.max_nodes), chain.shape[1] - 1)
        return chain[:, cols] * self.gain[None, :]

    def cost_factor(self, rows: int) -> float:
        """Tree step time over the chain price of the same drafts, at ``rows`` rows."""
        return float(self.cost[bucket(rows)])

    def observe_value(self, nodes: int, accepted: int, expected: float) -> None:
        """One tree verification: ``accepted`` of ``nodes`` drafts held where a chain was
        expected to hold ``expected``."""
        if nodes < 1 or expected <= 0:
            return
        i = min(nodes, self.max_nodes) - 1
        ratio = min(accepted / expected, 4.0)
        self.gain[i] += self.alpha * (ratio - self.gain[i])

    def observe_time(self, rows: int, ratio: float) -> None:
        """A step that verified trees took ``ratio`` times its chain price."""
        if ratio > 0:
            b = bucket(rows)
            self.cost[b] += self.alpha * (min(ratio, 10.0) - self.cost[b])

    def explore(self, chose_tree: bool) -> bool:
        """Whether a speculative step that chose chains should try trees instead (one step in
        ``explore_every``, so a price learned under other conditions gets re-measured)."""
        if chose_tree:
            self._since_tree = 0
            return False
        self._since_tree += 1
        if self._since_tree >= self.explore_every:
            self._since_tree = 0
            return True
        return False

    def state(self) -> dict[str, list[float]]:
        """As plain data (exported with the controller's model)."""
        return {"tree_gain": self.gain.round(4).tolist(), "tree_cost": self.cost.round(4).tolist()}
