"""Kill a real vLLM replica under load behind ``specserve gateway``, then bring it back.

Two vLLM engines (the demo model, CPU) run as their own process groups and ``specserve gateway``
runs in front of both as a subprocess, all on free 127.0.0.1 ports. The test sets the engines' pace
itself instead of racing them: both engine groups are frozen (SIGSTOP) before anything is routed, so
every request stays open where the gateway placed it, whatever the machine's speed. Then:

- the victim alone is resumed until both of its streams have received tokens, frozen again, and
  SIGKILLed with its streams and non-streaming requests open;
- non-streaming requests open at the victim, and those sent after the kill, succeed in full on the
  other replica (counted as retries);
- the victim's streams end with an OpenAI-shaped ``engine_failed`` error event, the others complete;
- ``/ready`` stays 200 with the victim marked down and its replica-health gauge at 0.

An engine restarted on the same port is marked up again and serves requests again (its own
``vllm:request_success`` counter, which starts at 0 in the new process, goes up).

Every wait is on a condition the test observes (the gateway's own per-replica open-request gauge,
tokens received per stream), bounded, and fails with what it saw. A client that disconnects
mid-stream freeing the engine's slot is proven in ``test_serve.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.engine.process import EngineError, EngineProcess, EngineSpec, free_port
from support.specserve_process import running_gateway

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_NAME = "specserve-demo"
ENGINE_START_TIMEOUT_S = 600.0  # two engines starting at once on a busy 2-core machine
PORT_ATTEMPTS = 3
# Long enough that no request at the victim can finish in the moment between its streams' first
# tokens and the victim's second freeze (checked, not assumed: the test fails saying so).
STREAM_TOKENS = 400
UNARY_TOKENS = 300
STREAMS, UNARIES, LATER_UNARIES = 4, 6, 2
# Every request open at one engine runs in the same batch (none waits for another to finish).
MAX_NUM_SEQS = STREAMS + UNARIES + LATER_UNARIES
# Generous bounds for a busy 2-core machine: a wait that reaches one has failed, whatever the speed.
WAIT_S = 120.0
FINISH_S = 600.0
FULL = {"ignore_eos": True}  # a fixed number of tokens whatever the model prefers
ERROR_KEYS = {"message", "type", "param", "code"}
IN_FLIGHT = "specserve_gateway_replica_in_flight_requests"


@dataclass
class Cluster:
    engines: dict[str, EngineProcess]
    gateway_url: str
    log_dir: Path

    def engine_url(self, name: str) -> str:
        return self.engines[name].spec.url


def _engine(model_dir: Path, port: int, log_dir: Path, name: str) -> EngineProcess:
    spec = EngineSpec(model=str(model_dir), port=port, served_model_name=MODEL_NAME, device="cpu",
                      max_model_len=512,
                      extra_args=("--max-num-seqs", str(MAX_NUM_SEQS), "--seed", "0"))
    return EngineProcess(spec, log_path=str(log_dir / f"engine-{name}-{port}.log"))


def _start_engines(engines: dict[str, EngineProcess], model_dir: Path, log_dir: Path,
                   new_port_if_taken: bool = True) -> None:
    """Start all engines at once, then wait for each (their start-ups overlap).

    A free port is only free when it is picked: on a shared machine another process may bind it
    before vLLM does. An engine that exits for that reason is started again on another port
    (``new_port_if_taken``; a restart on a given port fails instead).
    """
    for engine in engines.values():
        engine.start()
    for name in list(engines):
        for attempt in range(PORT_ATTEMPTS):
            engine = engines[name]
            try:
                engine.wait_ready(timeout_s=ENGINE_START_TIMEOUT_S)
                break
            except EngineError:
                taken = "Address already in use" in Path(str(engine.log_path)).read_text(errors="replace")
                if not (taken and new_port_if_taken) or attempt == PORT_ATTEMPTS - 1:
                    raise
                log.warning("engine port taken by another process; another port",
                            extra={"fields": {"engine": name, "port": engine.spec.port}})
                engine.stop(grace_s=5)  # whatever of its group is left
                engines[name] = _engine(model_dir, free_port(), log_dir, f"{name}{attempt + 1}")
                engines[name].start()


def _wait_until(check: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1,
                seen: Callable[[], object] | None = None) -> None:
    """Poll ``check`` until true; fail after ``timeout_s`` naming ``what`` and the last observation."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
            last = seen() if seen is not None else None
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s} s (last seen: {last})")


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
        _start_engines(engines, demo_model_dir, tmp_path)
        # A frozen engine accepts connections (the kernel does) but answers nothing: probes wait as
        # long as the test may freeze it, so it is not marked down before the test kills it.
        args = ["--request-timeout", str(FINISH_S), "--health-timeout", str(FINISH_S),
                "--drain-timeout", "5", "--expose-replica-addresses"]
        with running_gateway([e.spec.url for e in engines.values()], args, tmp_path) as url:
            result = Cluster(engines, url, tmp_path)
            _wait_until(lambda: all(_ready_replicas(url).values()), 60, "both replicas up",
                        seen=lambda: _ready_replicas(url))
            yield result
    finally:
        for engine in engines.values():
            if engine.proc is not None and engine.proc.poll() is None:
                os.killpg(engine.proc.pid, signal.SIGCONT)  # a frozen engine cannot stop gracefully
            engine.stop(grace_s=5)


# -- load -------------------------------------------------------------------------------------
@dataclass
class StreamProgress:
    """Chunks (of one or more tokens) each stream has received so far; ``on_token(i, n)`` runs in the
    event loop per chunk."""

    tokens: list[int] = field(default_factory=lambda: [0] * STREAMS)
    on_token: Callable[[int, int], None] = lambda i, n: None

    def started(self) -> set[int]:
        return {i for i, n in enumerate(self.tokens) if n > 0}


async def _stream(client: openai.AsyncOpenAI, i: int, progress: StreamProgress) -> str:
    """One streaming completion: ``"complete"``, or ``"error"`` after an OpenAI-shaped error event."""
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=f"def f{i}(x):\n", max_tokens=STREAM_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=FULL)
    finish, generated = None, None
    try:
        async for chunk in stream:
            if chunk.choices:  # one chunk may carry several tokens
                progress.tokens[i] += 1
                progress.on_token(i, progress.tokens[i])
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                generated = chunk.usage.completion_tokens
    except openai.APIError as exc:
        assert isinstance(exc.body, dict) and set(exc.body) == ERROR_KEYS, exc.body
        assert exc.body["code"] == "engine_failed", exc.body
        return "error"
    assert finish == "length" and generated == STREAM_TOKENS, (generated, finish)
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
    text = httpx.get(f"{cluster.gateway_url}/metrics", timeout=10, trust_env=False).text
    by_url = {s.labels.get("replica"): s.value for f in text_string_to_metric_families(text)
              if f.name == IN_FLIGHT for s in f.samples}
    return {name: by_url.get(cluster.engine_url(name), -1.0) for name in cluster.engines}


async def _wait_in_flight(cluster: Cluster, total: int, what: str) -> dict[str, float]:
    """Poll the gateway's per-engine open-request gauge until it sums to ``total``; return it."""
    seen: dict[str, float] = {}

    def check() -> bool:
        seen.update(_in_flight(cluster))
        return sum(seen.values()) == total

    await asyncio.to_thread(_wait_until, check, WAIT_S, f"{what}: {total} requests open at the gateway",
                            0.05, lambda: dict(seen))
    return dict(seen)


def _signal_engine(cluster: Cluster, name: str, sig: signal.Signals) -> None:
    engine = cluster.engines[name]
    assert engine.proc is not None
    os.killpg(engine.proc.pid, sig)


async def _finish(tasks: list[asyncio.Task[T]], what: str, detail: Callable[[], object]) -> list[T]:
    """Await all ``tasks`` within ``FINISH_S``; on timeout fail naming how many were still open."""
    done, pending = await asyncio.wait(tasks, timeout=FINISH_S)
    for task in pending:
        task.cancel()
    failed = [task.exception() for task in done if task.exception() is not None]
    if failed:
        raise failed[0]  # type: ignore[misc]
    if pending:
        raise AssertionError(f"{what}: {len(pending)} of {len(tasks)} not finished within {FINISH_S} s "
                             f"({detail()})")
    return [task.result() for task in tasks]


@dataclass
class LoadResult:
    victim: str
    streams: list[str]
    victim_streams: set[int]
    unaries: list[int]
    unary_open_at_victim: int


async def _kill_under_load(cluster: Cluster, victim: str, survivor: str) -> LoadResult:
    """Streams and non-streaming requests placed on two frozen engines, then SIGKILL of one.

    With both engines frozen, nothing the gateway routes can finish, so the gateway's open-request
    gauge counts every request where it was placed: least-loaded routing by open requests (ties
    round-robin) puts half of each kind on each engine. The victim alone is then resumed until its
    two streams have received tokens (the survivor is frozen, so they can only be the victim's),
    frozen again at once, checked to have finished nothing, and SIGKILLed.
    """
    client = openai.AsyncOpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused", max_retries=0,
                                timeout=FINISH_S)
    progress = StreamProgress()
    try:
        for name in cluster.engines:
            _signal_engine(cluster, name, signal.SIGSTOP)
        streams: list[asyncio.Task[str]] = []
        for i in range(STREAMS):
            streams.append(asyncio.create_task(_stream(client, i, progress)))
            streams_at = await _wait_in_flight(cluster, i + 1, f"stream {i} routed")
        assert streams_at == {victim: STREAMS / 2, survivor: STREAMS / 2}, f"streams per engine: {streams_at}"
        unaries: list[asyncio.Task[int]] = []
        for i in range(UNARIES):
            unaries.append(asyncio.create_task(_unary(client, i)))
            open_at = await _wait_in_flight(cluster, STREAMS + i + 1, f"unary request {i} routed")
        unaries_at = {name: open_at[name] - streams_at[name] for name in open_at}
        assert unaries_at == {victim: UNARIES / 2, survivor: UNARIES / 2}, f"unary requests per engine: {unaries_at}"

        # Resume the victim alone; freeze it again as soon as both of its streams have a token.
        refrozen = asyncio.Event()

        def on_token(i: int, n: int) -> None:
            if n == 1 and len(progress.started()) == STREAMS // 2 and not refrozen.is_set():
                _signal_engine(cluster, victim, signal.SIGSTOP)
                refrozen.set()

        progress.on_token = on_token
        _signal_engine(cluster, victim, signal.SIGCONT)
        try:
            await asyncio.wait_for(refrozen.wait(), timeout=WAIT_S)
        except TimeoutError as exc:
            raise AssertionError(f"the resumed victim's two streams did not both get a token within "
                                 f"{WAIT_S} s (chunks per stream: {progress.tokens})") from exc
        victim_streams = progress.started()
        frozen_at = await asyncio.to_thread(_in_flight, cluster)
        finished = [t for t in streams + unaries if t.done()]
        assert frozen_at == open_at and not finished, (
            f"a request at the victim finished before it was frozen again (open per engine {frozen_at}, "
            f"before {open_at}; chunks per stream {progress.tokens}): raise STREAM_TOKENS / UNARY_TOKENS "
            "for this machine's speed")

        _signal_engine(cluster, victim, signal.SIGKILL)
        engine = cluster.engines[victim]
        assert engine.proc is not None
        await asyncio.to_thread(engine.proc.wait, WAIT_S)
        log.info("engine killed", extra={"fields": {"replica": cluster.engine_url(victim), "open": frozen_at,
                                                    "stream_chunks": list(progress.tokens)}})
        progress.on_token = lambda i, n: None
        _signal_engine(cluster, survivor, signal.SIGCONT)
        later = [asyncio.create_task(_unary(client, 10 + i)) for i in range(LATER_UNARIES)]
        stream_results = await _finish(streams, "streams", lambda: f"chunks per stream {progress.tokens}")
        unary_results = await _finish(unaries + later, "unary requests",
                                      lambda: f"open per engine {_in_flight(cluster)}")
        return LoadResult(victim, stream_results, victim_streams, unary_results, int(unaries_at[victim]))
    finally:
        await client.close()


def _up_gauge(cluster: Cluster, name: str) -> float:
    return _metric(cluster.gateway_url, "specserve_gateway_replica_up_ratio", {"replica": cluster.engine_url(name)})


def _wait_replica_state(cluster: Cluster, name: str, up: bool) -> None:
    """Until ``/ready`` (200 throughout: the other replica serves) and the health gauge show ``name`` up/down."""
    url = cluster.engine_url(name)

    def seen() -> object:
        return {"ready": _ready_replicas(cluster.gateway_url), "up_gauge": _up_gauge(cluster, name)}

    _wait_until(lambda: _ready_replicas(cluster.gateway_url)[url] is up and _up_gauge(cluster, name) == float(up),
                WAIT_S, f"replica {url} marked {'up' if up else 'down'}", 0.2, seen)


def _assert_restarted_engine_serves(cluster: Cluster, victim: str, model_dir: Path) -> None:
    url = cluster.engine_url(victim)
    engine = _engine(model_dir, cluster.engines[victim].spec.port, cluster.log_dir, f"{victim}-restart")
    cluster.engines[victim] = engine
    _start_engines({victim: engine}, model_dir, cluster.log_dir, new_port_if_taken=False)
    _wait_replica_state(cluster, victim, up=True)

    async def burst() -> list[int]:
        client = openai.AsyncOpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused",
                                    max_retries=0, timeout=FINISH_S)
        try:
            tasks = [asyncio.create_task(_unary(client, 20 + i)) for i in range(4)]
            return await _finish(tasks, "requests after the restart", lambda: _in_flight(cluster))
        finally:
            await client.close()

    assert asyncio.run(burst()) == [UNARY_TOKENS] * 4
    served = _metric(url, "vllm:request_success")
    assert served >= 1, f"the restarted engine served none of 4 requests (vllm:request_success {served})"


def test_kill_a_replica_under_load_then_restart_it(cluster: Cluster, demo_model_dir: Path) -> None:
    victim, survivor = "a", "b"
    retries_before = _metric(cluster.gateway_url, "specserve_gateway_retries")
    result = asyncio.run(_kill_under_load(cluster, victim, survivor))
    log.info("load results", extra={"fields": {"streams": result.streams, "unaries": result.unaries}})
    # Every non-streaming request succeeded in full: those open at the killed engine, and those sent
    # after it died, on the other replica.
    assert result.unaries == [UNARY_TOKENS] * (UNARIES + LATER_UNARIES), result.unaries
    # Exactly the streams that were streaming from the killed engine ended with an error event.
    errored = {i for i, outcome in enumerate(result.streams) if outcome == "error"}
    assert errored == result.victim_streams and len(errored) == STREAMS // 2, result.streams
    retries = _metric(cluster.gateway_url, "specserve_gateway_retries") - retries_before
    assert retries >= result.unary_open_at_victim, (retries, result.unary_open_at_victim)
    _wait_replica_state(cluster, victim, up=False)
    assert _ready_replicas(cluster.gateway_url)[cluster.engine_url(survivor)] is True
    _assert_restarted_engine_serves(cluster, victim, demo_model_dir)
