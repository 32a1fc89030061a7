"""The specserve gateway: an OpenAI-compatible front for one or many vLLM engine replicas."""

from __future__ import annotations

from specserve.gateway.app import create_app
from specserve.gateway.config import GatewayConfig, KeyLimits

__all__ = ["GatewayConfig", "KeyLimits", "create_app"]
