"""One engine step's tree state: which requests verify trees, their K/V rows, and the counters.

The runner wraps (:mod:`specserve_vllm.compat.tree_steps`) create a :class:`TreeStep` when a
step has tree requests, the attention wrap (:mod:`specserve_vllm.compat.tree_attention`)
stashes each layer's K/V rows of those requests in it, and verification uses the stash to
compact an accepted side branch. Requests whose sampling needs more than the target's
distribution after temperature, top-k and top-p (penalties, min-p, logits processors, logprobs)
keep chains: their drafts are still a tree's preorder nodes, which vLLM's rejection sampler
verifies as a chain, losslessly. A grammar is not such a change: its mask rows are applied to
the logits before verification. Structured-output requests verify the tree the engine core
pruned with their grammar (:mod:`specserve_vllm.compat.tree_grammar`), never the drafter's.

    >>> from types import SimpleNamespace as NS
    >>> plain = NS(temperature=0.0, logprobs=None, prompt_logprobs=None, presence_penalty=0.0,
    ...            frequency_penalty=0.0, repetition_penalty=1.0, bad_words=None, logit_bias=None,
    ...            allowed_token_ids=None, min_tokens=0)
    >>> tree_eligible(plain), tree_eligible(NS(**{**vars(plain), "repetition_penalty": 1.1}))
    (True, False)
    >>> tree_eligible(NS(**{**vars(plain), "temperature": 0.8, "min_p": 0.0}))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from specserve_vllm.tree.plan import TreePlan

GREEDY_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``)."""


def tree_eligible(params: Any) -> bool:
    """Whether a request's sampling parameters allow tree verification: greedy, or sampling
    with temperature, top-k and top-p only, and nothing else that changes the target's logits
    or needs per-token output beyond the tokens."""
    if params is None:
        return False
    return (
        (params.temperature < GREEDY_EPS or not params.min_p)
        and params.logprobs is None
        and params.prompt_logprobs is None
        and not params.presence_penalty
        and not params.frequency_penalty
        and params.repetition_penalty == 1.0
        and not params.bad_words
        and not params.logit_bias
        and not params.allowed_token_ids
        and not params.min_tokens
    )


@dataclass(frozen=True)
class StashedLayer:
    """One attention layer's K/V of a tree step and where they were written, kept for the
    step's compaction: the layer's own K/V and the step's slot mapping, whole (each tree
    request's rows start at its plan's ``row_start``). Nothing writes them between the layer's
    attention and the compaction, so they are held, not copied."""

    key_cache: Any
    """The layer's ``[num_blocks, kv_heads, block_size, head]`` key half (written in place)."""
    value_cache: Any
    isa: str
    key: Any
    """``[T, kv_heads, head]`` the step's keys (tree rows' RoPE at depth positions)."""
    value: Any
    slots: Any
    """``[T]`` the cache slot of each row this step."""
    k_scale: float = 1.0
    v_scale: float = 1.0
    kv_cache_dtype: str = "auto"


class SideRows(NamedTuple):
    """What every attention layer of a step shares for one tree request's side rows."""

    keep: int
    """Rows the kernel gets right: the root and the best path."""
    seq_len: int
    block_ids: list[int]
    bias: Any
    """:func:`~specserve_vllm.tree.attention.side_rows_bias` for the layers' query groups, its
    columns split by cache block (:func:`~specserve_vllm.tree.attention.bias_by_block`)."""


@dataclass
class TreeStep:
    """A step with tree requests: the plan and the K/V rows the attention layers stashed."""

    plan: TreePlan
    stash: list[StashedLayer] = field(default_factory=list)
    side_rows: dict[int, SideRows] = field(default_factory=dict)
    """Per request index, filled by the step's first attention layer."""


@dataclass
class TreeCounters:
    """Totals since the engine started (read by tests and benchmarks)."""

    steps: int = 0
    """Steps that verified at least one tree."""
    verified: int = 0
    """Tree verifications (one per request and step)."""
    accepted_nodes: int = 0
    """Draft nodes accepted by tree verification."""
    compacted: int = 0
    """Verifications whose accepted path was not the preorder prefix (its K/V moved)."""
    grammar: int = 0
    """Tree verifications of structured-output requests (trees pruned by their grammar)."""
    whole_batch: int = 0
    """Steps in which every request verified a tree, so vLLM's rejection sampler did not run."""
    walked_chains: int = 0
    """Steps without trees whose chains were verified by the walk
    (:mod:`~specserve_vllm.compat.chain_walk`), so vLLM's rejection sampler did not run."""
    depth_tested: list[int] = field(default_factory=list)
    """Per depth d (index d - 1): verifications that reached depth d (the tree has a node there
    and every shallower node on the path was accepted)."""
    depth_accepted: list[int] = field(default_factory=list)
    """Per depth d: verifications that accepted a node at depth d."""

    def record_depths(self, tree_depth: int, accepted: int) -> None:
        """One verification of a ``tree_depth``-deep tree that accepted ``accepted`` nodes.

        >>> c = TreeCounters()
        >>> c.record_depths(3, 1); c.record_depths(2, 2)
        >>> c.depth_tested, c.depth_accepted
        ([2, 2, 0], [2, 1, 0])
        """
        grow = tree_depth - len(self.depth_tested)
        if grow > 0:
            self.depth_tested.extend([0] * grow)
            self.depth_accepted.extend([0] * grow)
        for d in range(min(accepted + 1, tree_depth)):
            self.depth_tested[d] += 1
        for d in range(accepted):
            self.depth_accepted[d] += 1
