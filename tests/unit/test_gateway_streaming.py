"""SSE passthrough: chunks reach the client before the engine has finished; disconnects abort."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from specserve.gateway import GatewayConfig, create_app

from support.gateway_fake_engine import MODEL, FakeState, running_fake_engine

STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}


class RawClient:
    """Drives the ASGI app directly so each ``http.response.body`` message is observed."""

    def __init__(self, app: FastAPI, body: dict[str, Any]) -> None:
        self.app = app
        self.payload = json.dumps(body).encode()
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.disconnect = asyncio.Event()
        self._sent_body = False

    async def _receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self.payload, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        await self.messages.put(message)

    def start(self) -> asyncio.Task[None]:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
            "query_string": b"", "root_path": "", "server": ("gw", 80), "client": ("127.0.0.1", 5555),
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(self.payload)).encode())],
        }
        return asyncio.get_running_loop().create_task(self.app(scope, self._receive, self._send))

    async def next_body(self) -> bytes:
        while True:
            message = await asyncio.wait_for(self.messages.get(), timeout=10)
            if message["type"] == "http.response.body":
                return bytes(message.get("body", b""))


@asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[None]:
    async with app.router.lifespan_context(app):
        yield


def test_chunks_pass_through_before_the_engine_finishes() -> None:
    state = FakeState(chunks=3, gate=threading.Event())
    with running_fake_engine(state) as (url, _):
        app = create_app(GatewayConfig(replicas=[url]), registry=CollectorRegistry())

        async def main() -> list[bytes]:
            async with started(app):
                client = RawClient(app, STREAM)
                task = client.start()
                first = await client.next_body()
                # The engine is now blocked until the gate opens: a buffering proxy would never
                # have delivered this chunk.
                assert b"t0" in first and b"t1" not in first
                state.gate.set()
                rest = []
                while True:
                    chunk = await client.next_body()
                    rest.append(chunk)
                    if b"[DONE]" in chunk or chunk == b"":
                        break
                await asyncio.wait_for(task, 10)
                return [first, *rest]

        chunks = asyncio.run(main())
    text = b"".join(chunks)
    assert text.count(b"data: ") == 5 and text.endswith(b"data: [DONE]\n\n")


def test_client_disconnect_aborts_the_engine_request() -> None:
    state = FakeState(chunks=50, gate=threading.Event())
    with running_fake_engine(state) as (url, _):
        app = create_app(GatewayConfig(replicas=[url]), registry=CollectorRegistry())

        async def main() -> None:
            async with started(app):
                client = RawClient(app, STREAM)
                task = client.start()
                assert b"t0" in await client.next_body()
                assert state.running == 1
                client.disconnect.set()
                await asyncio.wait_for(task, 10)
                for _ in range(200):  # bounded: up to 10 s
                    if state.running == 0:
                        break
                    await asyncio.sleep(0.05)
                assert state.running == 0
                gw = app.state.gateway
                assert gw.pool.replicas[url].in_flight == 0
                assert gw.queue.active == 0

        asyncio.run(main())


def test_full_queue_answers_503_with_retry_after() -> None:
    state = FakeState(chunks=3, gate=threading.Event())
    with running_fake_engine(state) as (url, _):
        config = GatewayConfig(replicas=[url], max_in_flight=1, max_queue=0)
        app = create_app(config, registry=CollectorRegistry())

        async def main() -> None:
            async with started(app):
                holder = RawClient(app, STREAM)
                task = holder.start()
                assert b"t0" in await holder.next_body()
                transport = httpx.ASGITransport(app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                    r = await client.post("/v1/chat/completions", json={**STREAM, "stream": False})
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "queue_full"
                    assert r.headers["retry-after"] == "1"
                    state.gate.set()
                    await asyncio.wait_for(task, 10)
                    ok = await client.post("/v1/chat/completions", json={**STREAM, "stream": False})
                    assert ok.status_code == 200
                    metrics = (await client.get("/metrics")).text
                    assert 'specserve_gateway_rejected_requests_total{reason="queue_full"} 1.0' in metrics

        asyncio.run(main())


def test_a_streamed_call_is_counted_when_the_client_leaves_right_after_done() -> None:
    """The client has the whole answer at ``[DONE]`` and may hang up before the engine's response
    ends: the call it was sent is still counted (it was not when the count waited for the end)."""
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    state = FakeState(chunks=2, tool_call=call, hold_after_done=threading.Event())
    body = {**STREAM, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}
    with running_fake_engine(state) as (url, _):
        app = create_app(GatewayConfig(replicas=[url]), registry=CollectorRegistry())

        async def main() -> str:
            async with started(app):
                client = RawClient(app, body)
                task = client.start()
                seen = b""
                while b"[DONE]" not in seen:
                    seen += await client.next_body()
                assert b'"tool_calls"' in seen and state.running == 1  # the engine has not ended it
                client.disconnect.set()
                await asyncio.wait_for(task, 10)
                transport = httpx.ASGITransport(app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
                    return (await http.get("/metrics")).text

        metrics = asyncio.run(main())
        state.hold_after_done.set()
    calls = [line for line in metrics.splitlines() if line.startswith("specserve_gateway_tool_calls_total{")]
    assert calls == ['specserve_gateway_tool_calls_total{tool_choice="named"} 1.0'], calls
    assert "specserve_gateway_tool_call_failures_total{" not in metrics
