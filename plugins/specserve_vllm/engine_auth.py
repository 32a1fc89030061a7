"""The engine's own key: every route but ``/health`` and ``/metrics`` needs it.

vLLM 0.32's ``--api-key`` guards only the ``/v1``, ``/v2``, ``/inference`` and ``/cohere``
prefixes: ``/tokenize``, ``/detokenize``, ``/docs``, ``/invocations``, ``/pooling`` and the admin
routes stay open. This ASGI middleware, given to vLLM's server as
``--middleware specserve_vllm.engine_auth.EngineKeyMiddleware`` (vLLM's documented way to add one),
guards all of them: without ``Authorization: Bearer <key>`` a request gets 401 before vLLM sees it.
``/health`` (liveness probes) and ``/metrics`` (Prometheus scrapes; load figures, no addresses, no
request content) stay open.

A keyed request may also say that its constraints were already compiled, as served, by the
gateway (header ``x-specserve-constraints-checked``); :func:`checked_reading` gives the reading it
names to the engine's own check, which then skips a second compile. Without an engine key the
header is ignored: anyone could send it.

The key is ``$SPECSERVE_ENGINE_API_KEY``, or the first line of the file
``$SPECSERVE_ENGINE_API_KEY_FILE``; the gateway holds the same key. With neither, the middleware
logs a warning and lets everything through (a development engine).

Example:
    >>> import asyncio
    >>> async def app(scope, receive, send):
    ...     await send({"type": "http.response.start", "status": 200, "headers": []})
    >>> sent = []
    >>> async def send(message):
    ...     sent.append(message)
    >>> guard = EngineKeyMiddleware(app, key="k")
    >>> asyncio.run(guard({"type": "http", "path": "/tokenize", "headers": []}, None, send))
    >>> sent[0]["status"]
    401
    >>> asyncio.run(guard({"type": "http", "path": "/tokenize",
    ...                    "headers": [(b"authorization", b"Bearer k")]}, None, send))
    >>> sent[-1]["status"]
    200
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger(__name__)

KEY_ENV = "SPECSERVE_ENGINE_API_KEY"
KEY_FILE_ENV = "SPECSERVE_ENGINE_API_KEY_FILE"
OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Answered without the key: liveness and load, nothing a client could use."""
CHECKED_HEADER = b"x-specserve-constraints-checked"
"""Same name as :data:`specserve.structured.engine_grammar.CHECKED_HEADER` (kept free of imports)."""

_CHECKED: ContextVar[str | None] = ContextVar("specserve_constraints_checked", default=None)


def checked_reading() -> str | None:
    """The reading under which the keyed caller of the current request compiled its constraints
    (``None``: not said, or said without the engine key)."""
    return _CHECKED.get()


def configured_key() -> str | None:
    """The engine key from the environment (the variable, else the file it names)."""
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key
    path = os.environ.get(KEY_FILE_ENV, "").strip()
    if path:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.split("#", 1)[0].strip()
                if line:
                    return line
        raise ValueError(f"{KEY_FILE_ENV}={path} holds no key")
    return None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class EngineKeyMiddleware:
    """ASGI middleware: 401 for any HTTP or WebSocket request outside :data:`OPEN_PATHS` that does
    not carry the engine key."""

    def __init__(self, app: Any, key: str | None = None) -> None:
        self.app = app
        key = key if key is not None else configured_key()
        self._digest = _digest(key) if key else None
        if key:
            logger.info("engine routes need the engine key (all but /health and /metrics)")
        else:
            logger.warning("no engine key (%s): every engine route is open to whoever reaches "
                           "this port", KEY_ENV)

    def _allowed(self, scope: dict[str, Any]) -> bool:
        if self._digest is None:
            return True
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path.rstrip("/") in OPEN_PATHS or path in OPEN_PATHS:
            return True
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._digest)
        return False

    def _checked(self, scope: dict[str, Any]) -> str | None:
        if self._digest is None:
            return None
        for name, value in scope.get("headers") or []:
            if name.lower() == CHECKED_HEADER:
                return value.decode("latin-1")
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._allowed(scope):
            reading = self._checked(scope)
            if reading is None:
                await self.app(scope, receive, send)
                return
            token = _CHECKED.set(reading)  # seen by the handler's task and the tasks it starts
            try:
                await self.app(scope, receive, send)
            finally:
                _CHECKED.reset(token)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": "Missing or wrong engine key.", "type": "authentication_error",
                                     "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
