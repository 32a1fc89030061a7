"""Everything that patches or reaches into vLLM internals, pinned to vLLM 0.32.0.

Each patch is one module with an ``apply()`` function (idempotent) and a drift test in
``tests/`` that fails if the upstream code it replaces changes.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"

# Modules (relative to this package) whose apply() runs at plugin registration, in order.
PATCHES: tuple[str, ...] = (
    "dispatcher_rebind",
    "cpu_expand_kernel",
    "spec_length",
    "no_spec_step",
    "step_timer",
    "jump_forward",
    "logits_feed",
    "hidden_feed",
    "empty_top_k",
    "xgrammar_strict_json",
    "grammar_validation",
)


def apply_all() -> None:
    from specserve_vllm.compat.upstream import warn_if_unsupported_vllm

    warn_if_unsupported_vllm()
    for name in PATCHES:
        mod = importlib.import_module(f"{__name__}.{name}")
        mod.apply()
