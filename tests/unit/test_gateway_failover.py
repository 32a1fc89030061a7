"""Fault handling: an engine replica is SIGKILLed under load, then comes back.

The replicas are fake engines in their own processes (real HTTP servers on 127.0.0.1), so the
kill is a real crash: connections reset, the port refuses.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from specserve.gateway import GatewayConfig, create_app

from support.gateway_fake_engine import MODEL, free_port

FAKE = Path(__file__).parents[1] / "support" / "gateway_fake_engine.py"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def start_fake(port: int, name: str) -> subprocess.Popen[bytes]:
    # 40 chunks 50 ms apart: streams last ~2 s; unary answers take 0.3 s.
    proc = subprocess.Popen([sys.executable, str(FAKE), str(port), name, "40", "0.05", "0.3"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fake engine did not start")


@pytest.fixture()
def engines() -> Iterator[dict[str, subprocess.Popen[bytes] | int]]:
    procs: dict[str, subprocess.Popen[bytes] | int] = {}
    ports = {"a": free_port(), "b": free_port()}
    try:
        for name, port in ports.items():
            procs[name] = start_fake(port, name)
            procs[f"{name}_port"] = port
        yield procs
    finally:
        for value in list(procs.values()):
            if isinstance(value, subprocess.Popen) and value.poll() is None:
                value.kill()
                value.wait(timeout=10)


def test_kill_a_replica_mid_load_then_it_recovers(engines: dict) -> None:
    url_a = f"http://127.0.0.1:{engines['a_port']}"
    url_b = f"http://127.0.0.1:{engines['b_port']}"
    config = GatewayConfig(replicas=[url_a, url_b], health_interval_s=0.2, connect_timeout_s=1.0)
    app = create_app(config, registry=CollectorRegistry())

    async def stream(client: httpx.AsyncClient) -> tuple[str, str]:
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        return r.headers.get("x-fake-engine", ""), r.text

    async def unary(client: httpx.AsyncClient) -> tuple[int, str]:
        r = await client.post("/v1/chat/completions", json=CHAT)
        return r.status_code, r.headers.get("x-fake-engine", "")

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as client:
                streams = [asyncio.create_task(stream(client)) for _ in range(6)]
                await asyncio.sleep(0.5)  # streams are flowing on both replicas
                unaries = [asyncio.create_task(unary(client)) for _ in range(6)]
                await asyncio.sleep(0.1)  # some unary requests are now waiting at replica a
                engines["a"].kill()
                engines["a"].wait(timeout=10)
                later = [asyncio.create_task(unary(client)) for _ in range(6)]
                done = await asyncio.wait_for(asyncio.gather(*streams, *unaries, *later), timeout=60)

                stream_results, unary_results = done[:6], done[6:]
                # Requests not yet streaming all succeed (retried on b when a died under them).
                assert all(status == 200 for status, _ in unary_results), unary_results
                assert all(engine == "b" for _, engine in done[12:])
                # Streams: those on b complete; those on a end with an error event, then [DONE].
                by_engine: dict[str, list[str]] = {"a": [], "b": []}
                for engine, text in stream_results:
                    by_engine[engine].append(text)
                assert by_engine["a"] and by_engine["b"]
                for text in by_engine["b"]:
                    assert '"error"' not in text and text.endswith("data: [DONE]\n\n")
                for text in by_engine["a"]:
                    assert 'data: {"error"' in text and text.endswith("data: [DONE]\n\n")
                pool = app.state.gateway.pool
                assert not pool.replicas[url_a].healthy

                # The replica comes back on the same port and receives traffic again.
                engines["a"] = await asyncio.to_thread(start_fake, engines["a_port"], "a")
                for _ in range(100):  # bounded: up to 10 s
                    if pool.replicas[url_a].healthy:
                        break
                    await asyncio.sleep(0.1)
                assert pool.replicas[url_a].healthy
                again = await asyncio.gather(*(unary(client) for _ in range(6)))
                assert all(status == 200 for status, _ in again)
                assert {engine for _, engine in again} == {"a", "b"}

    asyncio.run(main())
