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
    "spec_length",
    "logits_feed",
)


def apply_all() -> None:
    for name in PATCHES:
        mod = importlib.import_module(f"{__name__}.{name}")
        mod.apply()
