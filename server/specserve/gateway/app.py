"""The gateway application: ``create_app(config)`` wires config, replicas, proxy, limits and metrics.

Every error leaves through one handler (:func:`handle_error`) in the OpenAI shape.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> app = create_app(GatewayConfig(replicas=["http://127.0.0.1:9"]), registry=CollectorRegistry())
    >>> sorted(r.path for r in app.routes if r.path.startswith("/v1"))
    ['/v1/chat/completions', '/v1/completions', '/v1/models']
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import REGISTRY, CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from specserve import structured
from specserve.errors import APIError
from specserve.gateway.config import GatewayConfig
from specserve.gateway.limits import AdmissionQueue, KeyGuard, RateLimiter
from specserve.gateway.metrics import GatewayMetrics
from specserve.gateway.middleware import GatewayMiddleware
from specserve.gateway.prompt_tokens import TOKENIZE_TIMEOUT_S, EngineTokenizer
from specserve.gateway.proxy import Proxy, engine_auth_headers
from specserve.gateway.replicas import ReplicaPool
from specserve.gateway.routes import router
from specserve.gateway.speculation import SpecLength

log = logging.getLogger(__name__)


class Gateway:
    """The long-lived parts of one gateway app (``app.state.gateway``)."""

    def __init__(
        self, config: GatewayConfig, metrics: GatewayMetrics
    ) -> None:
        self.config = config
        self.metrics = metrics
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=config.max_in_flight)
        self.client = httpx.AsyncClient(limits=limits, trust_env=False,  # health checks
                                        headers=engine_auth_headers(config.engine_api_key))
        self.pool = ReplicaPool(
            config.replicas, client=self.client, metrics=metrics, dns=config.replicas_dns,
            interval_s=config.health_interval_s, timeout_s=config.connect_timeout_s,
            expose_addresses=config.expose_replica_addresses,
            probe_timeout_s=config.health_timeout_s,
        )
        self.proxy = Proxy(
            self.pool, metrics, max_attempts=config.max_attempts,
            request_timeout_s=config.request_timeout_s, connect_timeout_s=config.connect_timeout_s,
            engine_api_key=config.engine_api_key,
        )
        self.tokenizer = EngineTokenizer(self.pool, lambda: self.proxy.session,
                                         timeout_s=min(config.request_timeout_s, TOKENIZE_TIMEOUT_S))
        self.spec = SpecLength(config.spec_policy, config.goodput_settings(), self.pool, metrics)
        self.limiter = RateLimiter(config.key_limits)
        self.queue = AdmissionQueue(config.max_in_flight, config.max_queue, config.queue_timeout_s)

    async def start(self) -> None:
        await self.proxy.start()
        await self.pool.check_all()
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        await self.proxy.close()
        await self.client.aclose()


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Union branches add type names (e.g. "str", "list[...]") that mean nothing to a client.
    parts = [p for p in parts if not p.startswith(("list[", "function-", "tagged-union["))]
    return ".".join(parts) or None


_JSON_KINDS: dict[type, str] = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
                                float: "a number"}


def body_error(first: dict[str, Any]) -> APIError | None:
    """The error for a body that is not a JSON object at all (``None`` when the error is a field's).

    Bodies that do not parse (or are empty, or not sent as JSON) get ``invalid_json``; JSON that is
    not an object gets ``invalid_type``.

    Example:
        >>> body_error({"type": "json_invalid", "loc": ("body", 3)}).code
        'invalid_json'
        >>> body_error({"type": "model_attributes_type", "loc": ("body",), "input": [1]}).message
        'The request body must be a JSON object, not an array.'
        >>> body_error({"type": "missing", "loc": ("body", "messages")}) is None
        True
    """
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    if tuple(first.get("loc", ())) != ("body",):
        return None
    value = first.get("input")
    if first.get("type") == "missing":
        return APIError(400, "The request body is empty or null: a JSON object is expected.", code="invalid_json")
    if isinstance(value, bytes | bytearray):  # no JSON content type: FastAPI left the bytes unparsed
        return APIError(400, "The request body is not JSON: send a JSON object with "
                             "'Content-Type: application/json'.", code="invalid_json")
    kind = _JSON_KINDS.get(type(value), "a JSON value of another type")
    return APIError(400, f"The request body must be a JSON object, not {kind}.", code="invalid_type")


def to_api_error(exc: Exception) -> APIError:
    """Map any exception leaving a route to the OpenAI-shaped error a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        whole_body = body_error(first)
        if whole_body is not None:
            return whole_body
        param = _param_of(tuple(first.get("loc", ())))
        detail = first.get("msg", "invalid request")
        message = f"Invalid value for '{param}': {detail}." if param else f"Invalid request: {detail}."
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400:
            # FastAPI's only 400: reading the body as JSON failed (not UTF-8, nested too deep).
            return APIError(400, "The request body could not be parsed as JSON.", code="invalid_json")
        if exc.status_code == 404:
            return APIError(404, "Unknown route.", code="unknown_url")
        if exc.status_code == 405:
            return APIError(405, "Method not allowed.", type="invalid_request_error",
                            code="method_not_allowed")
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "Internal error in the gateway.", code="internal_error")


def render_error(err: APIError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    return err.status, headers, body


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler of the gateway."""
    err = to_api_error(exc)
    if err.status >= 500:
        log.warning("request failed", extra={"fields": {
            "request_id": request.state.request_id if hasattr(request.state, "request_id") else None,
            "status": err.status, "error": err.message}})
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


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
        structured.warm_up()  # import xgrammar in the background, off the first request's path
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
                       render_error=render_error,
                       guard=KeyGuard(config.api_keys, bad_key_limit=config.bad_key_limit))
    return app
