"""Drafter names (``specserve serve --drafter``) and the engine speculative config each maps to.

Imports neither torch nor vLLM: the gateway uses it to build the engine's
``--speculative-config`` JSON.

    >>> speculative_config("none", 4) is None
    True
    >>> speculative_config("ngram", 4)["method"]
    'ngram'
    >>> speculative_config("recycling", 4)["model"]
    'specserve_vllm.drafters.recycling_proposer.RecyclingProposer'
    >>> speculative_config("hydra", 3)["model"]
    'specserve_vllm.heads.proposer.HydraProposer'
    >>> speculative_config("vllm-medusa", 4, heads="/h/vllm")["model"]
    '/h/vllm'
    >>> draft_budget(4, "dynamic", 16)
    16
"""

from __future__ import annotations

from typing import Any, Literal, get_args

DrafterName = Literal["recycling", "medusa", "hydra", "ngram", "vllm-medusa", "none"]
DRAFTERS: tuple[str, ...] = get_args(DrafterName)
HEAD_DRAFTERS: tuple[str, ...] = ("medusa", "hydra")
"""Drafters that need a head checkpoint (``--heads DIR``; the demo model has defaults)."""

RECYCLING_CLASS_PATH = "specserve_vllm.drafters.recycling_proposer.RecyclingProposer"
"""Token Recycling runs as vLLM's ``custom_class`` proposer (fed by specserve's plugin)."""

HEAD_CLASS_PATHS: dict[str, str] = {
    "medusa": "specserve_vllm.heads.proposer.MedusaProposer",
    "hydra": "specserve_vllm.heads.proposer.HydraProposer",
}
"""specserve's Medusa / Hydra heads, also ``custom_class`` proposers (checkpoint: the engine setting ``heads_dir``)."""

NGRAM_LOOKUP = (1, 3)
"""(min, max) n-gram sizes for vLLM's prompt-lookup drafter."""


def speculative_config(drafter: DrafterName, k: int, heads: str | None = None) -> dict[str, Any] | None:
    """The engine's ``speculative_config`` for ``drafter`` drafting up to ``k`` tokens per step.

    ``None`` means no speculative decoding. ``k`` is the engine-wide maximum; a request can
    lower its own with ``vllm_xargs={"spec_k": n}``. ``vllm-medusa`` (vLLM's own Medusa
    proposer) needs ``heads``: a checkpoint converted with ``specserve heads convert``; it drafts
    exactly as many tokens as it has heads. Raises ``ValueError`` for an unknown drafter,
    ``k < 1`` with a drafter, or ``vllm-medusa`` without ``heads``.
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
    if drafter == "vllm-medusa":
        if not heads:
            raise ValueError("vllm-medusa needs a converted head checkpoint (heads=DIR)")
        return {"method": "medusa", "model": heads, "num_speculative_tokens": k}
    path = HEAD_CLASS_PATHS.get(drafter, RECYCLING_CLASS_PATH)
    return {"method": "custom_class", "model": path, "num_speculative_tokens": k}


def draft_budget(k: int, tree: str, tree_budget: int | None) -> int:
    """The engine's ``num_speculative_tokens`` for ``--num-speculative-tokens k``, ``--tree tree``
    and ``--tree-budget tree_budget``.

    A chain drafts up to ``k`` tokens per request and step; a tree (``static`` or ``dynamic``)
    holds up to ``tree_budget`` nodes (default ``k``), and vLLM sizes its draft slots, block
    reservation and per-position statistics from this one number. Raises ``ValueError`` for a
    budget with chains or a budget below 1.

        >>> draft_budget(4, "chain", None), draft_budget(4, "static", None), draft_budget(4, "static", 8)
        (4, 4, 8)
        >>> draft_budget(4, "chain", 8)
        Traceback (most recent call last):
        ...
        ValueError: --tree-budget needs --tree static or dynamic (chains draft --num-speculative-tokens tokens)
    """
    if tree_budget is None:
        return k
    if tree == "chain":
        raise ValueError("--tree-budget needs --tree static or dynamic (chains draft --num-speculative-tokens tokens)")
    if isinstance(tree_budget, bool) or not isinstance(tree_budget, int) or tree_budget < 1:
        raise ValueError(f"--tree-budget must be an integer >= 1, got {tree_budget!r}")
    return tree_budget
