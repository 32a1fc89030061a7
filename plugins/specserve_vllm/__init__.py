"""specserve's vLLM plugin (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts, sometimes more than once, so it is
idempotent. Everything that touches vLLM internals lives in :mod:`specserve_vllm.compat`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_STATE = {"registered": False}


def register() -> None:
    """Read the engine settings, install the compat patches and register specserve's model
    classes (idempotent)."""
    if _STATE["registered"]:
        return
    from specserve.engine import settings

    settings.read()  # once per process: every request sees the same engine settings
    from specserve_vllm import compat

    compat.apply_all()
    from specserve_vllm.heads import registry

    registry.register()
    from specserve_vllm.spec_control import export

    export.setup_api_server()  # the engine cores' plan stats on the API server's /metrics
    _STATE["registered"] = True
