"""Token Recycling as a vLLM proposer (one adjacency matrix per engine).

Selected through vLLM's own ``custom_class`` speculative method (the least invasive seam: no
change to vLLM's drafter selection)::

    speculative_config = {
        "method": "custom_class",
        "model": "specserve_vllm.drafters.recycling_proposer.RecyclingProposer",
        "num_speculative_tokens": 4,
    }

``custom_class`` proposers only see token ids, so the matrix is fed by
:mod:`specserve_vllm.compat.logits_feed`, which hands every drafter that has an
``observe_topk`` method the target's top-``topk_width`` candidates at every position whose
logits the runner computed (all verified draft positions plus the bonus position, of every
request, every step). Feeding happens before proposing within a step, so drafts use the
freshest predictions. Drafts are chains (the best path of the BFS tree) until tree
verification lands. The per-step plan (``set_draft_lengths``) bounds each row's chain; rows
planned at 0 are not walked, and the matrix keeps learning whatever the plan.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from specserve_vllm.drafters import recycling
from specserve_vllm.spec_k import PlannedLengths, bounded_room

logger = logging.getLogger(__name__)

CLASS_PATH = f"{__name__}.RecyclingProposer"
"""The ``speculative_config["model"]`` value that selects this proposer."""


class RecyclingProposer:
    """Chain drafts from the engine-wide recycling matrix (vLLM ``custom_class`` proposer)."""

    def __init__(self, vllm_config: Any, topk_width: int = recycling.DEFAULT_K) -> None:
        spec = vllm_config.speculative_config
        self.num_speculative_tokens: int = int(spec.num_speculative_tokens)
        self.max_model_len: int = int(vllm_config.model_config.max_model_len)
        self.topk_width = topk_width
        self._planned = PlannedLengths()
        vocab = int(vllm_config.model_config.get_vocab_size())
        self.matrix: np.ndarray = recycling.new_matrix(vocab, topk_width)  # [vocab, k]
        logger.info(
            "token recycling matrix: vocab=%d k=%d dtype=%s bytes=%d",
            vocab, topk_width, self.matrix.dtype, self.matrix.nbytes,
        )

    def observe_topk(self, input_tokens: np.ndarray, topk_ids: np.ndarray) -> None:
        """Record the target's top candidates (``[n, topk_width]``) after ``input_tokens`` (``[n]``)."""
        recycling.update_inplace(self.matrix, input_tokens, topk_ids)

    def set_draft_lengths(self, lengths: Any) -> None:
        """This step's planned draft length per row (``[num_reqs]``), used by the next ``propose``."""
        self._planned.set(lengths)

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        num_reqs = len(sampled_token_ids)
        n = np.asarray(num_tokens_no_spec[:num_reqs], dtype=np.int64)  # [num_reqs]
        room = np.minimum(self.num_speculative_tokens, self.max_model_len - n)
        room = bounded_room(room, self._planned.take(num_reqs))  # [num_reqs]
        # Requests not decoding this step (no sampled token), planned at 0 or at the length
        # limit draft nothing.
        active = np.array([bool(s) for s in sampled_token_ids], dtype=bool) & (room > 0) & (n > 0)
        if not active.any():
            return [[] for _ in range(num_reqs)]
        roots = np.full(num_reqs, recycling.EMPTY, dtype=np.int64)
        rows = np.nonzero(active)[0]
        roots[rows] = token_ids_cpu[rows, n[rows] - 1]
        chains = recycling.draft_chains(self.matrix, roots, int(room[rows].max()))
        return [c[: max(int(r), 0)] for c, r in zip(chains, room.tolist())]

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No weights: the matrix is built online."""
