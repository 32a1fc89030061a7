"""Forwarding a request to an engine replica: pick, send, retry before the first byte, stream back.

Streaming responses are passed through chunk by chunk as the engine writes them (aiohttp
``readany``; nothing is buffered). aiohttp rather than httpx here: its C HTTP parser and
connection pool cost a fraction of the CPU per chunk, which is the gateway's whole overhead. When the client goes away, the response generator is
closed, which closes the upstream connection, which makes vLLM abort the request and free its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.responses import Response

from specserve.errors import APIError
from specserve.gateway.goodput import SpecStats
from specserve.gateway.metrics import GatewayMetrics
from specserve.gateway.replicas import Replica, ReplicaPool
from specserve.gateway.spec_io import spec_stats
from specserve.gateway.streaming import PassthroughStream
from specserve.gateway.tools import Call, StreamedCalls, calls_in_response
from specserve.structured.engine_grammar import CHECKED_HEADER

log = logging.getLogger(__name__)

# Hop-by-hop and length headers are recomputed by each side.
_DROP_HEADERS = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
     "proxy-authorization", "authorization", "accept-encoding",
     CHECKED_HEADER}  # the gateway's own word to the engine, never a client's
)
_DROP_RESPONSE_HEADERS = frozenset(
    {"content-length", "connection", "keep-alive", "transfer-encoding", "date", "server", "content-encoding"}
)


@dataclass
class Outcome:
    """What the proxy learnt about one request, for metrics and logs."""

    status: int = 0
    replica: str = ""
    """The replica's address (for logs)."""
    replica_label: str = ""
    """The replica's public name (for metrics)."""
    first_chunk_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    spec: SpecStats | None = None
    """Per-request speculative acceptance, when the response carried it."""
    collect_tool_calls: bool = False
    """Set before forwarding: read the tool calls of the answer (only tool requests pay for it)."""
    tool_calls: list[list[Call]] | None = None
    """The calls of each choice (when collected and the answer arrived)."""
    prefer: str | None = None
    """Set before forwarding: the replica routing chose (tried first while it is eligible)."""


def sse_error_event(err: APIError) -> bytes:
    """An SSE event carrying an OpenAI error object, then the stream terminator.

    The ``openai`` client raises an ``APIError`` when a data event holds an ``error`` key.

    Example:
        >>> sse_error_event(APIError(502, "engine went away")).startswith(b'data: {"error"')
        True
    """
    return b"data: " + json.dumps(err.body()).encode() + b"\n\ndata: [DONE]\n\n"


def usage_event_from_sse_tail(tail: bytes) -> dict[str, Any] | None:
    """The last data event of a stream's tail that holds a usage object (and, if any, the metrics).

    Example:
        >>> usage_event_from_sse_tail(b'data: {"usage": {"prompt_tokens": 3}}\\n\\ndata: [DONE]\\n\\n')
        {'usage': {'prompt_tokens': 3}}
        >>> usage_event_from_sse_tail(b'data: {"usage": null}\\n\\n') is None
        True
    """
    for line in reversed(tail.split(b"\n")):
        if not line.startswith(b"data: {") or b'"usage":{' not in line.replace(b" ", b""):
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            continue
        if isinstance(event, dict):
            return event
    return None


def usage_from_sse_tail(tail: bytes) -> tuple[int | None, int | None]:
    """Prompt and completion token counts from the last usage object in a stream's tail.

    Example:
        >>> usage_from_sse_tail(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}\\n\\ndata: [DONE]\\n\\n')
        (3, 5)
        >>> usage_from_sse_tail(b'data: [DONE]\\n\\n')
        (None, None)
    """
    event = usage_event_from_sse_tail(tail)
    usage = (event or {}).get("usage") or {}
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


class Tail:
    """The last ``size`` bytes of a stream, kept without copying them on every chunk.

    Example:
        >>> t = Tail(size=4)
        >>> t.add(b"abc"); t.add(b"def"); t.value()
        b'cdef'
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._parts: list[bytes] = []
        self._length = 0

    def add(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._length += len(chunk)
        if self._length > 2 * self.size:
            self._parts = [self.value()]
            self._length = len(self._parts[0])

    def value(self) -> bytes:
        return b"".join(self._parts)[-self.size:]


# vLLM's ``param`` when a prompt does not fit the context (``--max-model-len``).
_PROMPT_LENGTH_PARAMS = frozenset({"input_tokens", "input_text"})
_PROMPT_PARAMS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}


def upstream_error(status: int, content: bytes, path: str = "") -> Response:
    """Re-shape an engine's error reply into the OpenAI error object, keeping its status.

    A prompt longer than the engine's context is reported as OpenAI does: ``param`` is the
    route's prompt field (``messages`` or ``prompt``), ``code`` is ``context_length_exceeded``.

    Example:
        >>> r = upstream_error(400, b'{"error": {"message": "bad", "type": "BadRequestError", "param": "n", "code": 400}}')
        >>> json.loads(r.body)["error"] == {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
        True
        >>> long = b'{"error": {"message": "too long", "param": "input_tokens", "code": 400}}'
        >>> json.loads(upstream_error(400, long, "/v1/chat/completions").body)["error"]["param"]
        'messages'
    """
    message, param, code = f"The engine answered with status {status}.", None, None
    try:
        data = json.loads(content)
        error = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or message)
            param = error.get("param") if isinstance(error.get("param"), str) else None
    except ValueError:
        pass
    if status == 400 and param in _PROMPT_LENGTH_PARAMS and path in _PROMPT_PARAMS:
        param, code = _PROMPT_PARAMS[path], "context_length_exceeded"
    err = APIError(status, message, param=param, code=code)
    return Response(json.dumps(err.body()), status_code=status, media_type="application/json")


def engine_auth_headers(key: str | None) -> dict[str, str]:
    """The header that authenticates the gateway to the engines (none without a key).

    Example:
        >>> engine_auth_headers("k"), engine_auth_headers(None)
        ({'Authorization': 'Bearer k'}, {})
    """
    return {"Authorization": f"Bearer {key}"} if key else {}


class Proxy:
    """Sends requests to the replicas of a :class:`ReplicaPool` (call :meth:`start` in the loop)."""

    def __init__(
        self,
        pool: ReplicaPool,
        metrics: GatewayMetrics,
        *,
        max_attempts: int = 3,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 2.0,
        engine_api_key: str | None = None,
    ) -> None:
        self.pool = pool
        self.engine_headers = engine_auth_headers(engine_api_key)
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=request_timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, auto_decompress=False, trust_env=False,
                skip_auto_headers=("Accept-Encoding",), headers=self.engine_headers,
            )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _open(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], model: str | None,
        prefer: str | None = None,
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        """Send to the best replica; on connection failure mark it down and try the next one."""
        if self.session is None:
            raise APIError(503, "The gateway is not started.", code="not_started")
        tried: set[str] = set()
        last_error = "no engine replica is ready"
        for attempt in range(self.max_attempts):
            replica = self.pool.pick(exclude=tried, model=model, prefer=prefer)
            if replica is None:
                break
            if attempt:
                self.metrics.retries.inc()
            tried.add(replica.url)
            self.pool.acquire(replica)
            try:
                response = await self.session.request(method, replica.url + path, data=body, headers=headers)
            except asyncio.CancelledError:  # the client went away: nothing is left open
                self.pool.release(replica)
                raise
            except aiohttp.ConnectionTimeoutError:
                self.pool.release(replica)
                self.pool.mark_down(replica, "connect timeout")
                last_error = f"engine {replica.url} did not accept the connection"
                continue
            except asyncio.TimeoutError as exc:
                self.pool.release(replica)
                raise APIError(504, "The engine did not answer in time.", code="upstream_timeout") from exc
            except aiohttp.ClientConnectorError as exc:  # refused, unreachable: the engine is gone
                self.pool.release(replica)
                self.pool.mark_down(replica, f"{type(exc).__name__}: {exc}")
                last_error = f"engine {replica.url} failed: {type(exc).__name__}"
                continue
            except aiohttp.ClientError as exc:
                # Reset or closed mid-request (e.g. a stale keep-alive connection): not proof the
                # engine is down; try elsewhere, or the same replica again if it is the only one.
                self.pool.release(replica)
                last_error = f"engine {replica.url} failed: {type(exc).__name__}"
                if len(self.pool.replicas) == 1:
                    tried.discard(replica.url)
                continue
            return replica, response
        raise APIError(503, f"No engine available: {last_error}.", code="engine_unavailable",
                       headers={"Retry-After": "1"})

    @staticmethod
    def forward_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
        """The request headers to send on (ASGI ``scope["headers"]``): the first value of each name,
        hop-by-hop and credential headers dropped.

        Example:
            >>> Proxy.forward_headers([(b"host", b"gw"), (b"x-a", b"1"), (b"X-A", b"2")])
            {'x-a': '1'}
        """
        out: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin-1").lower()
            if key not in _DROP_HEADERS and key not in out:
                out[key] = value.decode("latin-1")
        return out

    @staticmethod
    def _response_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
        return {k: v for k, v in response.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}

    async def unary(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str],
        outcome: Outcome, model: str | None = None,
    ) -> Response:
        """Forward a non-streaming request; a failure while reading the body is retried too."""
        for _ in range(self.max_attempts):
            replica, response = await self._open(method, path, body, headers, model, outcome.prefer)
            outcome.replica, outcome.replica_label = replica.url, replica.label
            try:
                content = await response.read()
            except asyncio.CancelledError:
                response.close()  # the client went away: dropping the connection makes vLLM abort
                raise
            except asyncio.TimeoutError as exc:
                raise APIError(504, "The engine did not answer in time.", code="upstream_timeout") from exc
            except aiohttp.ClientError as exc:
                log.warning("engine failed while answering; retrying", extra={"fields": {
                    "replica": replica.url, "error": type(exc).__name__}})
                self.metrics.retries.inc()
                continue
            finally:
                response.release()
                self.pool.release(replica)
            outcome.status = response.status
            if response.status == 200 and content[:1] == b"{":
                try:
                    data = json.loads(content)
                    usage = data.get("usage") or {}
                    outcome.prompt_tokens = usage.get("prompt_tokens")
                    outcome.completion_tokens = usage.get("completion_tokens")
                    outcome.spec = spec_stats(data)
                    if outcome.collect_tool_calls:
                        outcome.tool_calls = calls_in_response(data)
                except (ValueError, AttributeError):
                    pass
            if response.status >= 400:
                return upstream_error(response.status, content, path)
            return Response(content, status_code=response.status, headers=self._response_headers(response))
        raise APIError(503, "No engine available: every replica tried failed.", code="engine_unavailable",
                       headers={"Retry-After": "1"})

    async def stream(
        self, path: str, body: bytes, headers: dict[str, str], outcome: Outcome, started: float,
        model: str | None = None, on_close: Callable[[bool], Awaitable[None]] | None = None,
    ) -> Response:
        """Forward a streaming request; SSE bytes flow through as they arrive."""
        replica, response = await self._open("POST", path, body, headers, model, outcome.prefer)
        outcome.replica, outcome.replica_label = replica.url, replica.label
        outcome.status = response.status
        if response.status != 200:
            try:
                content = await response.read()
            except (asyncio.TimeoutError, aiohttp.ClientError):
                content = b""
            finally:
                response.release()
                self.pool.release(replica)
                if on_close is not None:
                    await on_close(False)
            return upstream_error(response.status, content, path)

        async def chunks() -> AsyncIterator[bytes]:
            tail = Tail()
            finished = False
            content = response.content
            calls = StreamedCalls() if outcome.collect_tool_calls else None
            try:
                chunk = await content.readany()
                if chunk:
                    outcome.first_chunk_s = time.perf_counter() - started
                while chunk:  # b"" is the end of the response
                    tail.add(chunk)
                    if calls is not None:
                        calls.feed(chunk)
                    yield chunk
                    chunk = await content.readany()
                finished = True
            except asyncio.TimeoutError:
                outcome.status = 504
                yield sse_error_event(APIError(504, "The engine stopped answering.", code="upstream_timeout"))
            except aiohttp.ClientError as exc:
                outcome.status = 502
                log.warning("engine failed while streaming", extra={"fields": {
                    "replica": replica.url, "error": type(exc).__name__}})
                last = tail.value()
                prefix = b"" if last.endswith(b"\n\n") or not last else b"\n\n"
                yield prefix + sse_error_event(
                    APIError(502, "The engine failed while streaming; the response is incomplete.",
                             code="engine_failed"))
            finally:
                # Closing (not releasing) an unfinished response drops the connection: vLLM aborts.
                if finished:
                    response.release()
                else:
                    response.close()
                self.pool.release(replica)
                # A whole answer's calls are counted even when the client, holding [DONE], leaves
                # before the response's end is read (the pump is then cancelled here).
                if calls is not None and (finished or calls.done):
                    outcome.tool_calls = calls.by_choice()
                event = usage_event_from_sse_tail(tail.value())
                if event is not None:
                    usage = event.get("usage") or {}
                    outcome.prompt_tokens = usage.get("prompt_tokens")
                    outcome.completion_tokens = usage.get("completion_tokens")
                    outcome.spec = spec_stats(event)

        return PassthroughStream(chunks(), status_code=200, headers=self._response_headers(response),
                                 on_close=on_close)
