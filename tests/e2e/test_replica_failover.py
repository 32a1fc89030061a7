"""Kill a real vLLM replica under load behind ``specserve gateway``, then bring it back.

Two vLLM engines (the demo model, CPU) run as their own process groups and ``specserve gateway``
runs in front of both as a subprocess, all on free 127.0.0.1 ports. Under a mix of streaming and
non-streaming requests (official ``openai`` client) one engine's whole process group is frozen
(so the test does not race the engines, whatever the machine's speed), then SIGKILLed:

- requests that had not started streaming succeed (retried on the other replica);
- streams that were on the killed engine end with an OpenAI-shaped error event, the others complete;
- nothing hangs (every wait is bounded), ``/ready`` stays 200, the replica-health gauge reads 0.

An engine restarted on the same port is marked up again and serves requests again (its own
``vllm:request_success`` counter, which starts at 0 in the new process, goes up).

A client that disconnects mid-stream freeing the engine's slot is proven in ``test_serve.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.engine.process import EngineProcess, EngineSpec, free_port
from support.specserve_process import running_gateway

log = logging.getLogger(__name__)

MODEL_NAME = "specserve-demo"
ENGINE_START_TIMEOUT_S = 600.0  # two engines starting at once on a busy 2-core machine
STREAM_TOKENS = 400  # longer than it takes to start the four streams one after the other
UNARY_TOKENS = 300
FULL = {"ignore_eos": True}  # a fixed number of tokens whatever the model prefers
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Cluster:
    engines: dict[str, EngineProcess]
    gateway_url: str
    log_dir: Path

    def engine_url(self, name: str) -> str:
        return self.engines[name].spec.url


def _engine(model_dir: Path, port: int, log_dir: Path, name: str) -> EngineProcess:
    spec = EngineSpec(model=str(model_dir), port=port, served_model_name=MODEL_NAME, device="cpu",
                      max_model_len=512, extra_args=("--max-num-seqs", "4", "--seed", "0"))
    return EngineProcess(spec, log_path=str(log_dir / f"engine-{name}-{port}.log"))


def _start_engines(engines: list[EngineProcess]) -> None:
    """Start all engines at once, then wait for each (their start-ups overlap)."""
    for engine in engines:
        engine.start()
    for engine in engines:
        engine.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)


def _wait_until(check: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def _ready_replicas(gateway_url: str) -> dict[str, bool]:
    response = httpx.get(f"{gateway_url}/ready", timeout=5, trust_env=False)
    assert response.status_code == 200, response.text
    replicas: dict[str, bool] = response.json()["replicas"]
    return replicas


def _metric(url: str, family_name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a family's samples at ``url``/metrics (``_total`` counters included)."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return sum(
        s.value for f in text_string_to_metric_families(text) if f.name == family_name
        for s in f.samples if s.name in (family_name, f"{family_name}_total")
        and all(s.labels.get(k) == v for k, v in (labels or {}).items())
    )


@pytest.fixture()
def cluster(demo_model_dir: Path, tmp_path: Path) -> Iterator[Cluster]:
    engines = {name: _engine(demo_model_dir, free_port(), tmp_path, name) for name in ("a", "b")}
    try:
        _start_engines(list(engines.values()))
        args = ["--request-timeout", "120", "--drain-timeout", "5"]
        with running_gateway([e.spec.url for e in engines.values()], args, tmp_path) as url:
            result = Cluster(engines, url, tmp_path)
            _wait_until(lambda: all(_ready_replicas(url).values()), 60, "both replicas up")
            yield result
    finally:
        for engine in engines.values():
            if engine.proc is not None and engine.proc.poll() is None:
                os.killpg(engine.proc.pid, signal.SIGCONT)  # a frozen engine cannot stop gracefully
            engine.stop(grace_s=5)


# -- load -------------------------------------------------------------------------------------
async def _stream(client: openai.AsyncOpenAI, i: int, started: asyncio.Event) -> str:
    """One streaming completion: ``"complete"``, or ``"error"`` after an OpenAI-shaped error event."""
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=f"def f{i}(x):\n", max_tokens=STREAM_TOKENS, temperature=0,
        stream=True, extra_body=FULL)
    tokens, finish = 0, None
    try:
        async for chunk in stream:
            if chunk.choices:
                started.set()
                tokens += 1
                finish = chunk.choices[0].finish_reason or finish
    except openai.APIError as exc:
        assert isinstance(exc.body, dict) and set(exc.body) == ERROR_KEYS, exc.body
        assert exc.body["code"] == "engine_failed" and tokens > 0
        return "error"
    assert finish == "length", (tokens, finish)
    return "complete"


async def _unary(client: openai.AsyncOpenAI, i: int) -> int:
    """One non-streaming chat completion; its completion token count."""
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": f"Count to {i}."}],
        max_tokens=UNARY_TOKENS, temperature=0, extra_body=FULL)
    assert response.usage is not None
    return response.usage.completion_tokens


def _in_flight(cluster: Cluster) -> dict[str, float]:
    """The gateway's own open-request count at each engine, by engine name."""
    return {name: _metric(cluster.gateway_url, "specserve_gateway_replica_in_flight_requests",
                          {"replica": cluster.engine_url(name)}) for name in cluster.engines}


def _signal_engine(cluster: Cluster, name: str, sig: signal.Signals) -> None:
    engine = cluster.engines[name]
    assert engine.proc is not None
    os.killpg(engine.proc.pid, sig)


async def _kill_under_load(cluster: Cluster) -> tuple[str, list[str], list[int], float]:
    """Streams on both engines, unary requests in flight at one of them, then SIGKILL its group.

    Nothing here depends on how fast the engines are. Streams start one at a time, each after the
    previous one's first token, so least-loaded routing puts two on each engine. The victim is then
    frozen (SIGSTOP): its streams stall mid-way and nothing it holds can finish. Unary requests
    follow; routing sends some of them to the frozen victim (its load is no higher than the
    other's), and the test waits until the gateway counts one open there. Only then is the frozen
    group SIGKILLed. Returns ``(victim, stream outcomes, unary completion token counts,
    unary requests open at the victim when it died)``.
    """
    client = openai.AsyncOpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused", max_retries=0,
                                timeout=120)
    try:
        streams: list[asyncio.Task[str]] = []
        for i in range(4):
            started = asyncio.Event()
            streams.append(asyncio.create_task(_stream(client, i, started)))
            await asyncio.wait_for(started.wait(), timeout=120)
        victim = "a"
        _signal_engine(cluster, victim, signal.SIGSTOP)
        streams_at = await asyncio.to_thread(_in_flight, cluster)
        assert streams_at[victim] == 2, f"streams per engine: {streams_at}"
        unaries = [asyncio.create_task(_unary(client, i)) for i in range(6)]
        at_victim: list[float] = []

        def unary_open_at_victim() -> bool:
            at_victim[:] = [_in_flight(cluster)[victim] - streams_at[victim]]
            return at_victim[0] >= 1

        # Bounded: the victim is frozen, so a unary request routed to it stays open until killed.
        await asyncio.to_thread(_wait_until, unary_open_at_victim, 30,
                                "a unary request is open at the frozen engine", 0.05)
        _signal_engine(cluster, victim, signal.SIGKILL)
        engine = cluster.engines[victim]
        assert engine.proc is not None
        await asyncio.to_thread(engine.proc.wait, 10)
        log.info("engine killed", extra={"fields": {"replica": cluster.engine_url(victim),
                                                    "unary_open": at_victim[0]}})
        later = [asyncio.create_task(_unary(client, 10 + i)) for i in range(2)]
        stream_results = await asyncio.wait_for(asyncio.gather(*streams), timeout=150)
        unary_results = await asyncio.wait_for(asyncio.gather(*unaries, *later), timeout=300)
        return victim, list(stream_results), list(unary_results), at_victim[0]
    finally:
        await client.close()


def _assert_replica_down(cluster: Cluster, victim: str) -> None:
    url = cluster.engine_url(victim)
    replicas = _ready_replicas(cluster.gateway_url)  # still 200: the other replica serves
    assert replicas[url] is False and replicas[cluster.engine_url("b" if victim == "a" else "a")] is True
    up = _metric(cluster.gateway_url, "specserve_gateway_replica_up_ratio", {"replica": url})
    assert up == 0.0


def _assert_restarted_engine_serves(cluster: Cluster, victim: str, model_dir: Path) -> None:
    url = cluster.engine_url(victim)
    engine = _engine(model_dir, cluster.engines[victim].spec.port, cluster.log_dir, f"{victim}2")
    cluster.engines[victim] = engine
    _start_engines([engine])
    _wait_until(lambda: _ready_replicas(cluster.gateway_url)[url], 30, "restarted replica marked up")
    _wait_until(lambda: _metric(cluster.gateway_url, "specserve_gateway_replica_up_ratio",
                                {"replica": url}) == 1.0, 10, "replica-health gauge back to 1")

    async def burst() -> list[int]:
        client = openai.AsyncOpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused",
                                    max_retries=0, timeout=120)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(_unary(client, 20 + i) for i in range(4))), timeout=150)
        finally:
            await client.close()

    assert asyncio.run(burst()) == [UNARY_TOKENS] * 4
    assert _metric(url, "vllm:request_success") >= 1  # the new engine process served some of them


def test_kill_a_replica_under_load_then_restart_it(cluster: Cluster, demo_model_dir: Path) -> None:
    retries_before = _metric(cluster.gateway_url, "specserve_gateway_retries")
    victim, streams, unaries, open_at_victim = asyncio.run(_kill_under_load(cluster))
    log.info("load results", extra={"fields": {"streams": streams, "unaries": unaries}})
    # Every non-streaming request succeeded in full, those open at the killed engine on the other.
    assert unaries == [UNARY_TOKENS] * len(unaries)
    # The two streams on the killed engine ended with an error event; the two others completed.
    assert sorted(streams) == ["complete", "complete", "error", "error"], streams
    assert _metric(cluster.gateway_url, "specserve_gateway_retries") - retries_before >= open_at_victim
    _assert_replica_down(cluster, victim)
    _assert_restarted_engine_serves(cluster, victim, demo_model_dir)
