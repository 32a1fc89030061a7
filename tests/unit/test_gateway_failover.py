"""Fault handling: an engine replica is SIGKILLed under load, then comes back.

The replicas are fake engines in their own processes (real HTTP servers on 127.0.0.1), so the
kill is a real crash: connections reset, the port refuses.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from specserve.gateway import GatewayConfig, create_app

from support.gateway_fake_engine import MODEL, free_port

FAKE = Path(__file__).parents[1] / "support" / "gateway_fake_engine.py"
STREAM_CHUNKS = 200
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def start_fake(port: int, name: str) -> subprocess.Popen[bytes]:
    # 200 chunks 50 ms apart: streams last ~10 s; unary answers take 0.3 s.
    proc = subprocess.Popen([sys.executable, str(FAKE), str(port), name, str(STREAM_CHUNKS), "0.05", "0.3"])
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

    @dataclass
    class Stream:
        engine: str = ""
        text: str = ""
        done: bool = False
        started: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(client: httpx.AsyncClient, out: Stream) -> None:
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            out.engine = r.headers.get("x-fake-engine", "")
            async for chunk in r.aiter_text():
                out.text += chunk
                if '"choices"' in out.text:
                    out.started.set()
        out.done = True
        out.started.set()

    async def unary(client: httpx.AsyncClient) -> tuple[int, str]:
        r = await client.post("/v1/chat/completions", json=CHAT)
        return r.status_code, r.headers.get("x-fake-engine", "")

    async def until(check: Callable[[], bool], what: str, seen: Callable[[], object]) -> None:
        """Wait (bounded) for ``check``; fail saying what was last seen."""
        deadline = time.monotonic() + 30
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within 30 s; saw {seen()}")
            await asyncio.sleep(0.02)

    async def main() -> None:
        # A real HTTP server for the gateway: the in-process transport would hold each response
        # until it is complete, and this test watches streams while they flow.
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        try:
            await until(lambda: server.started, "gateway started", lambda: serving)
            await scenario(f"http://127.0.0.1:{port}")
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, timeout=30)

    async def scenario(base_url: str) -> None:
        pool = app.state.gateway.pool
        in_flight = lambda: {u: r.in_flight for u, r in pool.replicas.items()}  # noqa: E731
        await until(lambda: all(r.healthy for r in pool.replicas.values()), "both replicas up",
                    lambda: {u: r.healthy for u, r in pool.replicas.items()})
        async with httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as client:
            outs = [Stream() for _ in range(6)]
            streams = [asyncio.create_task(stream(client, out)) for out in outs]
            # Every stream has its first chunk: least-loaded routing split them over both.
            await asyncio.wait_for(asyncio.gather(*(o.started.wait() for o in outs)), timeout=30)
            at_a = [o for o in outs if o.engine == "a"]
            assert at_a and len(at_a) < 6, [o.engine for o in outs]
            streams_at_a = in_flight()[url_a]
            unaries = [asyncio.create_task(unary(client)) for _ in range(6)]
            # Some unary requests are open at replica a (its load is no higher than b's).
            await until(lambda: in_flight()[url_a] > streams_at_a, "a unary request open at a",
                        in_flight)
            open_at_a = [o for o in at_a if not o.done]
            assert open_at_a, "every stream at a ended before the kill: make STREAM_CHUNKS larger"
            engines["a"].kill()
            engines["a"].wait(timeout=10)
            later = [asyncio.create_task(unary(client)) for _ in range(6)]
            done = await asyncio.wait_for(asyncio.gather(*streams, *unaries, *later), timeout=60)

            unary_results = done[6:]
            # Requests not yet streaming all succeed (retried on b when a died under them).
            assert all(status == 200 for status, _ in unary_results), unary_results
            assert all(engine == "b" for _, engine in done[12:])
            # Streams: those on b complete; those open on a end with an error event, then [DONE].
            for out in outs:
                assert out.text.endswith("data: [DONE]\n\n"), out.text[-200:]
                if out in open_at_a:
                    assert 'data: {"error"' in out.text
                else:
                    assert '"error"' not in out.text
            await until(lambda: not pool.replicas[url_a].healthy, "replica a marked down",
                        lambda: pool.replicas[url_a])

            # The replica comes back on the same port and receives traffic again.
            engines["a"] = await asyncio.to_thread(start_fake, engines["a_port"], "a")
            await until(lambda: pool.replicas[url_a].healthy, "replica a marked up again",
                        lambda: pool.replicas[url_a])
            again = await asyncio.gather(*(unary(client) for _ in range(6)))
            assert all(status == 200 for status, _ in again)
            assert {engine for _, engine in again} == {"a", "b"}

    asyncio.run(main())
