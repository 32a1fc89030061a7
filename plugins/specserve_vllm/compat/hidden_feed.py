"""Hand the target's last hidden state of each request to drafters that draft from it.

vLLM 0.32 gives hidden states only to its built-in Medusa/EAGLE proposers; a ``custom_class``
proposer sees token ids. One wrap on ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner
inherits it): when the runner's drafter has ``observe_hidden(hidden)``, it is called first with
``hidden [num_reqs, d]``, row ``r`` being the final-norm hidden state at the position from which
request ``r``'s last sampled token was sampled (the last accepted draft position, the bonus
position, or the last prompt position), chosen exactly as vLLM's own Medusa branch does. Then
the original method runs and calls the drafter's ``propose``. Drafters without
``observe_hidden`` cost nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from specserve_vllm.compat.upstream import live_source_digests

logger = logging.getLogger(__name__)

_MARK = "_specserve_hidden_feed"

# sha256 of the upstream source the wrap relies on (see tests/unit/test_heads_compat.py):
# the argument names below, and the Medusa branch whose row choice last_hidden_rows mirrors.
UPSTREAM_SHA256: dict[str, str] = {
    "GPUModelRunner.propose_draft_token_ids": "a60269aca9de4e251b8132aa1d95de38497b65bfdb20fbb54596fe4d5600ad35",
}

ARGUMENTS: tuple[str, ...] = ("sampled_token_ids", "sample_hidden_states", "spec_decode_metadata")


def _targets() -> dict[str, Callable[..., Any]]:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return {"GPUModelRunner.propose_draft_token_ids": GPUModelRunner.propose_draft_token_ids}


def upstream_digests() -> dict[str, str]:
    """sha256 of the (unpatched) source of every function this patch depends on."""
    return live_source_digests(_targets())


def last_hidden_rows(num_draft_tokens: list[int], num_sampled: list[int]) -> list[int]:
    """Row of ``sample_hidden_states`` behind each request's last sampled token.

    Request ``r`` owns ``num_draft_tokens[r] + 1`` consecutive rows (its drafts plus the bonus
    position); with ``num_sampled[r]`` tokens accepted and sampled, the last one came from row
    ``num_sampled[r] - 1`` of its block. A request that sampled nothing gets its block's first
    row (its drafter output is discarded anyway).

    >>> last_hidden_rows([2, 0, 3], [3, 1, 1])
    [2, 3, 4]
    >>> last_hidden_rows([1, 1], [0, 2])
    [0, 3]
    """
    rows: list[int] = []
    offset = 0
    for drafted, sampled in zip(num_draft_tokens, num_sampled):
        rows.append(offset + max(sampled, 1) - 1)
        offset += drafted + 1
    return rows


def _hidden_per_request(sampled_token_ids: Any, sample_hidden_states: Any, spec_decode_metadata: Any) -> Any:
    import torch

    if not isinstance(sampled_token_ids, list):
        return None
    if sample_hidden_states.shape[0] == len(sampled_token_ids):
        return sample_hidden_states
    if spec_decode_metadata is None:
        return None
    rows = last_hidden_rows(list(spec_decode_metadata.num_draft_tokens), [len(t) for t in sampled_token_ids])
    index = torch.tensor(rows, dtype=torch.long, device=sample_hidden_states.device)
    return sample_hidden_states.index_select(0, index)


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    current = GPUModelRunner.propose_draft_token_ids
    if getattr(current, _MARK, False):
        return
    signature = inspect.signature(current)

    @functools.wraps(current)
    def propose_draft_token_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        observe = getattr(getattr(self, "drafter", None), "observe_hidden", None)
        if callable(observe):
            bound = signature.bind(self, *args, **kwargs).arguments
            observe(_hidden_per_request(*(bound[name] for name in ARGUMENTS)))
        return current(self, *args, **kwargs)

    setattr(propose_draft_token_ids, _MARK, True)
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids  # type: ignore[method-assign]
    logger.debug("installed hidden feed patch")
