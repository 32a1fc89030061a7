"""Drafter names (``specserve serve --drafter``) and the engine speculative config each maps to.

Imports neither torch nor vLLM: the gateway uses it to build the engine's
``--speculative-config`` JSON.

    >>> speculative_config("none", 4) is None
    True
    >>> speculative_config("ngram", 4)["method"]
    'ngram'
    >>> speculative_config("recycling", 4)["model"]
    'specserve_vllm.drafters.recycling_proposer.RecyclingProposer'
"""

from __future__ import annotations

from typing import Any, Literal, get_args

DrafterName = Literal["recycling", "ngram", "none"]
DRAFTERS: tuple[str, ...] = get_args(DrafterName)

RECYCLING_CLASS_PATH = "specserve_vllm.drafters.recycling_proposer.RecyclingProposer"
"""Token Recycling runs as vLLM's ``custom_class`` proposer (fed by specserve's plugin)."""

NGRAM_LOOKUP = (1, 3)
"""(min, max) n-gram sizes for vLLM's prompt-lookup drafter."""


def speculative_config(drafter: DrafterName, k: int) -> dict[str, Any] | None:
    """The engine's ``speculative_config`` for ``drafter`` drafting up to ``k`` tokens per step.

    ``None`` means no speculative decoding. ``k`` is the engine-wide maximum; a request can
    lower its own with ``vllm_xargs={"spec_k": n}``. Raises ``ValueError`` for an unknown
    drafter or ``k < 1`` with a drafter.
    """
    if drafter not in DRAFTERS:
        raise ValueError(f"unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}")
    if drafter == "none":
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
    if drafter == "ngram":
        lo, hi = NGRAM_LOOKUP
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}
    return {"method": "custom_class", "model": RECYCLING_CLASS_PATH, "num_speculative_tokens": k}
