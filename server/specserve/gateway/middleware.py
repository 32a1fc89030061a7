"""ASGI middleware: request id, body size limit, request metrics and the access log line.

It is also the one place that counts rejections: an :class:`~specserve.errors.APIError` with a
``reason`` that answered the request (raised here, or left in ``state["error"]`` by the exception
handler) counts once under that reason.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) so streaming responses pass untouched.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specserve.errors import APIError
from specserve.gateway.error_mapping import render_error
from specserve.gateway.limits import KeyGuard
from specserve.gateway.metrics import GatewayMetrics

log = logging.getLogger("specserve.gateway.access")

REQUEST_ID_HEADER = "x-request-id"
# Route label values are bounded: anything else is "other".
KNOWN_ROUTES = frozenset(
    {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/ready", "/metrics"}
)
# Routes answered without a key; every other path needs one when keys are configured.
PUBLIC_ROUTES = frozenset({"/health", "/ready", "/metrics"})


def route_label(path: str) -> str:
    """Metric label for a request path.

    Example:
        >>> route_label("/v1/completions"), route_label("/admin/../etc")
        ('/v1/completions', 'other')
    """
    return path if path in KNOWN_ROUTES else "other"


def clean_request_id(value: str | None) -> str:
    """The client's request id if it is short and printable, else a fresh one.

    Example:
        >>> clean_request_id("abc-1")
        'abc-1'
        >>> len(clean_request_id("bad\\nid"))
        32
    """
    if value and len(value) <= 128 and value.isprintable() and value.isascii():
        return value
    return uuid.uuid4().hex


class GatewayMiddleware:
    """Wraps every HTTP request of the gateway app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: GatewayMetrics,
        max_body_bytes: int,
        guard: KeyGuard | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.guard = guard or KeyGuard(())
        self.max_body_bytes = max_body_bytes

    async def _reject(self, send: Send, err: APIError, request_id: str) -> None:
        status, headers, body = render_error(err)
        headers = [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = clean_request_id(headers.get(b"x-request-id", b"").decode("latin-1") or None)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status_box = {"status": 500}
        path = scope.get("path", "")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                message["headers"] = [
                    *message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())
                ]
            await send(message)

        try:
            # The key first: a request without one is refused before its body is read.
            state["client_key"] = self._authenticate(scope, path, headers)
            receive = await self._limit_body(scope, receive, headers)
        except APIError as err:
            status_box["status"] = err.status
            state["error"] = err
            await self._reject(send, err, request_id)
        else:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            status = str(status_box["status"])
            route = route_label(path)
            model = str(state.get("model", ""))
            error = state.get("error")
            if isinstance(error, APIError) and error.reason is not None:
                self.metrics.rejected.labels(reason=error.reason).inc()
            self.metrics.child(self.metrics.requests, route, status, model).inc()
            self.metrics.child(self.metrics.latency, route, status).observe(elapsed)
            if route not in ("/health", "/ready", "/metrics"):
                log.info("request", extra={"fields": {
                    "request_id": request_id, "method": scope.get("method"), "path": path,
                    "status": status_box["status"], "duration_ms": round(elapsed * 1000, 2),
                    "model": model, "replica": state.get("replica", ""),
                }})

    def _authenticate(self, scope: Scope, path: str, headers: dict[bytes, bytes]) -> str:
        """The rate-limit key (API key, or client address without auth); 401/429 from the guard."""
        client = scope.get("client")
        address = str(client[0]) if client else "anonymous"
        if path in PUBLIC_ROUTES or not self.guard.enabled:
            return address
        authorization = headers.get(b"authorization")
        return self.guard.check(authorization.decode("latin-1") if authorization else None, address)

    async def _limit_body(self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]) -> Receive:
        """Refuse bodies over the limit: at once by Content-Length, else while reading them."""
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        too_large = APIError(413, f"Request body too large: the limit is {self.max_body_bytes} bytes.",
                             code="request_too_large", reason="body_too_large")
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise APIError(400, "Invalid Content-Length header.") from None
            if size > self.max_body_bytes:
                raise too_large
            return receive
        # Chunked upload: read it all here (bounded), then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        return replayed
