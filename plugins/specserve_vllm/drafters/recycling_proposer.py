"""Token Recycling as a vLLM proposer (one adjacency matrix per engine).

Selected through vLLM's own ``custom_class`` speculative method (the least invasive seam: no
change to vLLM's drafter selection)::

    speculative_config = {
        "method": "custom_class",
        "model": "specserve_vllm.drafters.recycling_proposer.RecyclingProposer",
        "num_speculative_tokens": 4,
    }

``custom_class`` proposers only see token ids, so the matrix is fed by
:mod:`specserve_vllm.compat.logits_feed`, which hands the proposer the target's logits at
every position the runner computed them (all verified draft positions plus the bonus
position, of every request, every step); the proposer keeps each row's top-``topk_width``
candidates. Chains read only a row's first candidate, so a chain engine keeps one column and
learns it with an argmax (on CPU numpy's, several times cheaper than a torch top-k there:
the feed runs every step, speculation off included); trees keep :data:`recycling.DEFAULT_K`.
Feeding happens before proposing within a step, so drafts use the freshest predictions.
Drafts are chains (the best path of the BFS tree) unless the engine setting ``tree`` asks for
trees (``static`` or ``dynamic``, see
:mod:`specserve_vllm.drafters.recycling_trees`): then each row's draft is a tree's nodes in
preorder, its node count bounded like a chain's length, and the tree is kept in
``last_trees`` for :mod:`specserve_vllm.compat.tree_steps`, which verifies it. The per-step plan
(``set_draft_lengths``) bounds each row's draft; rows planned at 0 are not walked, and the
matrix keeps learning whatever the plan.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from specserve_vllm.drafters import recycling
from specserve_vllm.drafters.argmax_backlog import ArgmaxBacklog, best_candidates
from specserve_vllm.drafters.hindsight import HindsightRows, HindsightTally
from specserve_vllm.drafters.recycling_trees import TreeShape, hit_ranks, rank_acceptance, recycling_tree, row_hits
from specserve_vllm.spec_k import PlannedLengths, bounded_room
from specserve_vllm.tree.draft import DraftTree

logger = logging.getLogger(__name__)

BACKLOG_ELEMENTS = 1 << 20
"""Logits values kept before a batched top-k (4 MiB in fp32: 256 rows of the demo's vocabulary)."""

BACKLOG_STEPS = 1024
"""Steps kept before what they teach is written into the matrix."""

ARGMAX_MIN_ROWS = 16
"""The fewest logits rows a one-column matrix keeps for one argmax (a large vocabulary)."""

CLASS_PATH = f"{__name__}.RecyclingProposer"
"""The ``speculative_config["model"]`` value that selects this proposer."""


class RecyclingProposer:
    """Chain drafts from the engine-wide recycling matrix (vLLM ``custom_class`` proposer)."""

    def __init__(self, vllm_config: Any, topk_width: int | None = None,
                 tree_shape: TreeShape | None = None) -> None:
        """``topk_width``: candidates kept per token (default: 1 for chains, the paper's 8 for
        trees)."""
        spec = vllm_config.speculative_config
        self.num_speculative_tokens: int = int(spec.num_speculative_tokens)
        self.max_model_len: int = int(vllm_config.model_config.max_model_len)
        if tree_shape is None:
            from specserve.engine import settings

            tree_shape = settings.current().tree
        self.tree_shape: TreeShape = tree_shape
        if topk_width is None:
            topk_width = 1 if tree_shape == "chain" else recycling.DEFAULT_K
        self.topk_width = topk_width
        self._planned = PlannedLengths()
        vocab = int(vllm_config.model_config.get_vocab_size())
        self.matrix: np.ndarray = recycling.new_matrix(vocab, topk_width)  # [vocab, k]
        self._matrix_view: Any = None
        """A tensor sharing :attr:`matrix`'s memory (built on the first fast write)."""
        self.last_trees: list[DraftTree | None] = []
        """Per row of the last ``propose``: the drafted tree (tree shapes only), else None."""
        self._backlog: list[tuple[Any, Any]] = []
        """Steps not learnt yet (:meth:`observe_logits`): ``(input_tokens, logits)`` tensors, or
        ``(input_tokens, candidates [n, 1])`` numpy arrays for a one-column matrix."""
        self._backlog_elements = 0
        self._argmax = ArgmaxBacklog(max(ARGMAX_MIN_ROWS, BACKLOG_ELEMENTS // max(vocab, 1)))
        """A one-column matrix's steps not learnt yet, as logits rows on CPU (one copy per step;
        their argmax is taken in one go at the flush). Older steps wait in :attr:`_backlog`."""
        self.rank_hits = np.zeros(topk_width + 1, dtype=np.int64)
        """How often the target's next token was the matrix's rank-r candidate (last: none);
        measured for ``dynamic`` trees only."""
        self.row_hits: np.ndarray | None = (
            np.zeros((vocab, topk_width + 1), dtype=np.int32) if tree_shape == "dynamic" else None)
        """The same per input token (``[vocab, k + 1]``): each matrix row's own record."""
        self.hindsight: HindsightTally | None = None
        """Scores of the chain drafts steps without drafts would have had (:mod:`.hindsight`),
        kept once :meth:`enable_hindsight` was called (chains only)."""
        logger.info(
            "token recycling matrix: vocab=%d k=%d dtype=%s bytes=%d",
            vocab, topk_width, self.matrix.dtype, self.matrix.nbytes,
        )

    def enable_hindsight(self) -> bool:
        """Score what chain drafts would have done on steps without drafts (for the goodput
        controller; :meth:`take_hindsight`). False for trees, which do not keep the rows."""
        if self.tree_shape != "chain" or self.topk_width != 1:
            return False
        if self.hindsight is None:
            self.hindsight = HindsightTally()
        return True

    def take_hindsight(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(req_ids, temperatures, acceptance probability)`` of the rows scored since the last
        call, every kept row learnt first (empty without :meth:`enable_hindsight`)."""
        if self.hindsight is None:
            return [], np.zeros(0), np.zeros(0)
        self.flush_backlog()
        return self.hindsight.take()

    def observe_logits(self, input_tokens: Any, logits: Any, rows: HindsightRows | None = None) -> None:
        """This step's target logits (``[n, vocab]``) after ``input_tokens`` (``[n]``, a tensor
        or a numpy array). The logits are the runner's, which the sampler edits next: what is
        kept is copied here. ``rows``: the step's requests when it drafted nothing, for
        hindsight (used once :meth:`enable_hindsight` was called).

        Steps without speculation never propose, so what they teach waits and is learnt in
        one go when the drafter next proposes or the backlog fills: a one-column matrix copies
        the rows into a preallocated buffer for one batched argmax (:mod:`.argmax_backlog`; off
        the CPU, each step's argmax), a wider one keeps a copy of the logits for one batched
        top-k. The rows are written in order, the last
        occurrence of a token winning, exactly as step-by-step updates would. ``dynamic``
        trees measure rank acceptance position by position, so they learn at once."""
        if self.tree_shape == "dynamic":
            self._learn(torch_ints(input_tokens), logits)
            return
        if self.topk_width == 1:
            ring = self._argmax
            rows = rows if self.hindsight is not None else None
            added = ring.add(input_tokens, logits, rows)
            if not added and len(ring):  # full, or another width or dtype: the older rows first
                self.flush_backlog()
                added = ring.add(input_tokens, logits, rows)
            if added:
                if not ring.room or ring.steps + len(self._backlog) >= BACKLOG_STEPS:
                    self.flush_backlog()
                return
            # Logits off the CPU, or more rows than the ring holds: the candidates now.
            self._backlog.append((_numpy(input_tokens), best_candidates(logits)))
            self._backlog_elements += int(input_tokens.shape[0])
        else:
            self._backlog.append((torch_ints(input_tokens), logits.clone()))
            self._backlog_elements += int(logits.numel())
        if self._backlog_elements >= BACKLOG_ELEMENTS or len(self._backlog) >= BACKLOG_STEPS:
            self.flush_backlog()

    def flush_backlog(self) -> None:
        """Learn every kept step (in the order they came); the ring's rows are scored for
        hindsight against the matrix as it was before them."""
        if len(self._argmax):
            if self._backlog:  # older rows: learnt first
                self._learn_backlog()
            tokens, best, found = self._argmax.take_hindsight(
                self.matrix[:, 0] if self.hindsight is not None else None)
            if found is not None and self.hindsight is not None:
                self.hindsight.add(*found)
            recycling.update_inplace(self.matrix, tokens, best)
            return
        self._learn_backlog()

    def _learn_backlog(self) -> None:
        """Learn the steps kept in :attr:`_backlog` (in the order they came)."""
        if not self._backlog:
            return
        backlog, self._backlog, self._backlog_elements = self._backlog, [], 0
        if self.topk_width == 1:
            tokens = np.concatenate([t for t, _ in backlog])
            candidates = np.concatenate([c for _, c in backlog])
            recycling.update_inplace(self.matrix, tokens, candidates)
            return
        if len(backlog) == 1:
            self._learn(*backlog[0])
            return
        import torch

        self._learn(torch.cat([t for t, _ in backlog]), torch.cat([x for _, x in backlog]))

    def _learn(self, input_tokens: Any, logits: Any) -> None:
        import torch

        width = min(self.topk_width, int(logits.shape[-1]))
        with torch.no_grad():
            topk = torch.topk(logits, width, dim=-1).indices
        self.observe_topk(input_tokens.cpu(), topk.cpu(), int(logits.shape[-1]))

    def observe_topk(self, input_tokens: Any, topk_ids: Any, logits_width: int | None = None) -> None:
        """Record the target's top candidates (``[n, topk_width]``) after ``input_tokens`` (``[n]``);
        numpy arrays or CPU tensors. ``logits_width``: the vocabulary the candidates were taken
        from, when known (no candidate is out of the matrix's range if it is within)."""
        if self.tree_shape == "dynamic":
            tokens, ranks = hit_ranks(self.matrix, np.asarray(input_tokens), np.asarray(topk_ids)[:, 0])
            self.rank_hits += np.bincount(ranks, minlength=self.rank_hits.size)
            if self.row_hits is not None:
                row_hits(self.row_hits, tokens, ranks)
            # Rows keep the recent distinct successors (rank 0 as before): DySpec branches into
            # what followed the token in other contexts, which one context's top-k misses when
            # many requests share the matrix.
            recycling.update_successors_inplace(self.matrix, np.asarray(input_tokens), np.asarray(topk_ids))
            return
        if not self._write_rows(input_tokens, topk_ids, logits_width):
            recycling.update_inplace(self.matrix, np.asarray(input_tokens), np.asarray(topk_ids))

    def _write_rows(self, input_tokens: Any, topk_ids: Any, logits_width: int | None) -> bool:
        """:func:`recycling.update_inplace` for tensors, as one indexed write into the matrix
        (through a tensor view of it): a token seen more than once keeps its last row, as
        there. Returns False, writing nothing, when a token or candidate is out of the matrix's
        range (``update_inplace`` then handles it). This runs every step, right after the
        forward pass, so fewer operations matter even with speculation off."""
        import torch

        if not (isinstance(input_tokens, torch.Tensor) and isinstance(topk_ids, torch.Tensor)):
            return False
        vocab, k = self.matrix.shape
        tokens = input_tokens.tolist()
        if (topk_ids.dim() != 2 or topk_ids.shape[1] != k or not tokens
                or min(tokens) < 0 or max(tokens) >= vocab):
            return False
        if (logits_width is None or logits_width > vocab) and int(topk_ids.max()) >= vocab:
            return False
        last = {t: i for i, t in enumerate(tokens)}  # the last occurrence of each token
        if len(last) < len(tokens):
            keep = torch.tensor(sorted(last.values()), dtype=torch.long)
            input_tokens, topk_ids = input_tokens[keep], topk_ids[keep]
        if self._matrix_view is None:
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                self._matrix_view = torch.from_numpy(self.matrix)  # shares the matrix's memory
        self._matrix_view[input_tokens] = topk_ids.to(self._matrix_view.dtype)
        return True

    def set_draft_lengths(self, lengths: Any, chains: bool = False) -> None:
        """This step's planned draft length per row (``[num_reqs]``), used by the next ``propose``;
        ``chains``: draft chains this once even in tree mode."""
        self._planned.set(lengths, chains)

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        self.flush_backlog()  # drafts see every position the target has predicted
        num_reqs = len(sampled_token_ids)
        n = np.asarray(num_tokens_no_spec[:num_reqs], dtype=np.int64)  # [num_reqs]
        room = np.minimum(self.num_speculative_tokens, self.max_model_len - n)
        shape = self._planned.shape(self.tree_shape)
        room = bounded_room(room, self._planned.take(num_reqs))  # [num_reqs]
        # Requests not decoding this step (no sampled token), planned at 0 or at the length
        # limit draft nothing.
        active = np.array([bool(s) for s in sampled_token_ids], dtype=bool) & (room > 0) & (n > 0)
        self.last_trees = [None] * num_reqs
        if not active.any():
            return [[] for _ in range(num_reqs)]
        roots = np.full(num_reqs, recycling.EMPTY, dtype=np.int64)
        rows = np.nonzero(active)[0]
        roots[rows] = token_ids_cpu[rows, n[rows] - 1]
        if shape != "chain":
            out: list[list[int]] = [[] for _ in range(num_reqs)]
            acceptance = rank_acceptance(self.rank_hits)
            for r in rows.tolist():
                tree = recycling_tree(self.matrix, int(roots[r]), shape, int(room[r]), acceptance, self.row_hits)
                self.last_trees[r] = tree
                out[r] = list(tree.tokens)
            return out
        chains = recycling.draft_chains(self.matrix, roots, int(room[rows].max()))
        return [c[: max(int(r), 0)] for c, r in zip(chains, room.tolist())]

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No weights: the matrix is built online."""


def _numpy(ints: Any) -> np.ndarray:
    """A numpy copy of ``ints`` (a numpy array, or a tensor on any device)."""
    if isinstance(ints, np.ndarray):
        return ints.copy()
    return ints.numpy().copy() if ints.device.type == "cpu" else ints.cpu().numpy()


def torch_ints(ints: Any) -> Any:
    """``ints`` as a tensor (numpy arrays are copied)."""
    import torch

    return torch.from_numpy(ints.copy()) if isinstance(ints, np.ndarray) else ints
