"""Everything that patches or reaches into vLLM internals, pinned to vLLM 0.32.0.

Each patch is one module with an ``apply()`` function (idempotent) and
``UPSTREAM: tuple[UpstreamFunction, ...]``, the upstream functions it replaces or relies on with
the digest of their source in the supported release. :func:`apply_all` warns for each one that
drifted; ``tests/unit/test_compat_drift.py`` fails on it.
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
    "draft_handoff",
    "jump_forward",
    "logits_feed",
    "hidden_feed",
    "empty_top_k",
    "xgrammar_strict_json",
    "grammar_validation",
    "tree_attention",
    "tree_grammar",  # after jump_forward: its validate_tokens wrap is the outer one
    "chain_walk",  # installs nothing: tree_steps' _sample wrap calls it
    "tree_steps",  # last: its _prepare_inputs and _sample wraps are the outermost
)


def apply_all() -> None:
    """Warn about upstream drift under any patch, then apply every patch in order."""
    from specserve_vllm.compat.upstream import warn_if_drifted, warn_if_unsupported_vllm

    warn_if_unsupported_vllm()
    for name in PATCHES:
        mod = importlib.import_module(f"{__name__}.{name}")
        warn_if_drifted(mod.__name__, mod.UPSTREAM)
        mod.apply()
