"""The gateway application: ``create_app(config)`` wires config, replicas, proxy, limits and metrics.

The long-lived parts live in :class:`~specserve.gateway.state.Gateway`; every error leaves through
one handler (:func:`~specserve.gateway.error_mapping.handle_error`) in the OpenAI shape.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> app = create_app(GatewayConfig(replicas=["http://127.0.0.1:9"]), registry=CollectorRegistry())
    >>> sorted(r.path for r in app.routes if r.path.startswith("/v1"))
    ['/v1/chat/completions', '/v1/completions', '/v1/models']
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import REGISTRY, CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve.errors import APIError
from specserve.gateway.config import GatewayConfig
from specserve.gateway.error_mapping import handle_error
from specserve.gateway.limits import KeyGuard
from specserve.gateway.metrics import GatewayMetrics
from specserve.gateway.middleware import GatewayMiddleware
from specserve.gateway.routes import router
from specserve.gateway.state import Gateway

__all__ = ["Gateway", "create_app"]


def create_app(
    config: GatewayConfig,
    *,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the gateway ASGI app (metrics on ``registry``, the process-wide one by default)."""
    metrics = GatewayMetrics(registry if registry is not None else REGISTRY)
    gateway = Gateway(config, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="specserve gateway", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    app.include_router(router)
    for exc_type in (APIError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    app.add_middleware(GatewayMiddleware, metrics=metrics, max_body_bytes=config.max_body_bytes,
                       guard=KeyGuard(config.api_keys, bad_key_limit=config.bad_key_limit))
    return app
