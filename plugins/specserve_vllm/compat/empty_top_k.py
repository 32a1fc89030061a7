"""Top-k sampling on a speculative step without drafts (vLLM 0.32, PyTorch top-k path).

With speculative decoding on, the V1 runner always builds spec-decode metadata, so a step in
which no request has drafts (the first decode after prefill, or every request at ``spec_k=0``)
reaches the rejection sampler with zero target rows. ``apply_top_k_only`` then calls
``k.max()`` on an empty tensor and raises, killing the engine for any request with ``top_k``.
The PyTorch path is the one CPU uses. The wrap returns the (empty) logits unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from specserve_vllm.compat.upstream import UpstreamFunction

logger = logging.getLogger(__name__)

_MARK = "_specserve_empty_top_k"

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: calls k.max() on the (possibly empty) k.
    UpstreamFunction("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_only",
                     "2d58824a27f72f0a9f8f70b2d80fc212604e4d6177694209efce7aca8d05d57b"),
)


def apply() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler

    original = topk_topp_sampler.apply_top_k_only
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def apply_top_k_only(logits: Any, k: Any) -> Any:
        if logits.shape[0] == 0:  # no rows to mask
            return logits
        return original(logits, k)

    setattr(apply_top_k_only, _MARK, True)
    topk_topp_sampler.apply_top_k_only = apply_top_k_only
    logger.debug("installed the empty top-k guard")
