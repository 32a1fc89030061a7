"""Limits on client connections, below the application: what uvicorn 0.54 leaves open.

uvicorn's httptools protocol has no limit on the size or number of headers (an 8 MB header and
20,000 headers were accepted), no time limit on sending a request's head or body (a slowloris
socket or a half-sent body stays open as long as the client likes) and no cap on open connections
(``limit_concurrency`` answers 503 per request but keeps every socket). :func:`guarded_protocol`
returns a subclass of that protocol which adds:

* **431** when the request head grows over ``max_header_bytes`` or holds over ``max_header_count``
  fields, counted as the bytes arrive (nothing larger is buffered);
* **408** when the head is not complete ``header_timeout_s`` after the connection opened (or after
  the previous response), or the body not complete ``body_timeout_s`` after the head; the clock
  stops while the gateway itself is not reading (flow control);
* **503** and close for a connection over ``max_connections`` open at once.

Each answer is an OpenAI-shaped error and closes the connection.

Example:
    >>> cls = guarded_protocol(ConnectionLimits(max_header_count=10))
    >>> cls.limits.max_header_count, cls.__name__
    (10, 'GuardedHttpToolsProtocol')
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from specserve.errors import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may do before it is answered with an error and closed."""

    max_connections: int = 2048
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the error is in ``protocol._refusal``."""


def error_response(err: APIError) -> bytes:
    """A complete HTTP/1.1 response carrying ``err``, closing the connection.

    Example:
        >>> error_response(APIError(431, "x")).split(b"\\r\\n")[0]
        b'HTTP/1.1 431 Request Header Fields Too Large'
    """
    body = json.dumps(err.body()).encode()
    head = [STATUS_LINE[err.status], b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n"]
    head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in err.headers.items()]
    return b"".join([*head, b"\r\n", body])


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ConnectionLimits` (set on the subclass)."""

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_fields = self._field_bytes = 0
        self._in_head = True  # between requests counts as waiting for a head
        self._in_body = False
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: APIError | None = None

    # -- timers --------------------------------------------------------------------------------
    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if what == "body" and self.flow is not None and self.flow.read_paused:
            self._arm(1.0, what)  # the gateway is not reading: not the client's time
            return
        if what == "body" and self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        limit = self.limits.header_timeout_s if what == "head" else self.limits.body_timeout_s
        self._refuse(APIError(408, f"The request {what} was not received within {limit:g} s.",
                              code="request_timeout"))

    def _refuse(self, err: APIError) -> None:
        log.warning("client connection refused", extra={"fields": {
            "status": err.status, "reason": err.message,
            "client": self.client[0] if self.client else None}})
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app (if running) sees the client gone
            self.cycle.message_event.set()
        self.transport.write(error_response(err))
        self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(APIError(503, "Too many open connections; try again shortly.",
                                  code="too_many_connections", headers={"Retry-After": "1"}))
            return
        self._arm(self.limits.header_timeout_s, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        if self._in_head and self._timer is None:
            self._arm(self.limits.header_timeout_s, "head")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except (httptools.HttpParserError, _Refused):
            if self._refusal is not None:
                self._refuse(self._refusal)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self._refuse(APIError(400, "Invalid HTTP request received.", code="invalid_http"))
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(self._too_large("The request head is larger than "
                                             f"{self.limits.max_header_bytes} bytes."))

    # -- parser callbacks ----------------------------------------------------------------------
    @staticmethod
    def _too_large(message: str) -> APIError:
        return APIError(431, message, type="invalid_request_error", code="request_header_fields_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_fields = self._field_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        self._field_bytes += len(name) + len(value) + 4
        if self._head_fields > self.limits.max_header_count:
            self._refusal = self._too_large(f"The request has more than {self.limits.max_header_count} "
                                            "header fields.")
            raise _Refused()
        if self._field_bytes > self.limits.max_header_bytes:  # a head that arrived in one read
            self._refusal = self._too_large("The request head is larger than "
                                            f"{self.limits.max_header_bytes} bytes.")
            raise _Refused()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()
        if not self.parser.should_upgrade():
            self._in_body = True
            self._arm(self.limits.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._in_body:  # answered before its body was in (e.g. 401): not waited for
            self._disarm()
            return
        if not self.pipeline:
            self._in_head = True
            self._arm(self.limits.header_timeout_s, "head")


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
