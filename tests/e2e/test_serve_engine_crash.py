"""``specserve serve`` when its engine is SIGKILLed while serving: the promise to a supervisor.

``serve`` runs one engine; when that engine dies the command exits non-zero so that a supervisor
(compose ``restart:``, Kubernetes) starts it again. Proven end to end with the real engine:

- requests in flight when the engine dies get OpenAI-shaped errors, well before the request
  timeout (streams that had started: an ``engine_failed`` error event; requests not yet
  answered: a 503 ``engine_unavailable``);
- the process exits non-zero within a bounded time;
- a new ``specserve serve`` on the same ports serves again.

The engine's pace is set by the test (its process group is frozen while requests are placed and
again once both streams have tokens), so nothing depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families

from support.specserve_process import MODEL_NAME, ServeProcess, running_specserve

STREAMS, UNARIES = 2, 2  # all four fit the engine's batch (--max-num-seqs 4): none waits for another
STREAM_TOKENS, UNARY_TOKENS = 400, 300
REQUEST_TIMEOUT_S = 300.0  # the gateway's; every error must come well before it
WAIT_S = 120.0
EXIT_S = 90.0  # engine death noticed (0.5 s) + drain (--drain-timeout 10) + engine group cleanup
ERROR_KEYS = {"message", "type", "param", "code"}
FULL = {"ignore_eos": True}


def _engine_group(server: ServeProcess) -> int:
    """The process group of ``serve``'s engine (its own session: group id = the engine's pid)."""
    for child in psutil.Process(server.proc.pid).children():
        if os.getpgid(child.pid) == child.pid:
            return child.pid
    raise AssertionError(f"no engine process group under serve: {server.descendants()}")


def _in_flight(server: ServeProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10, trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "specserve_gateway_replica_in_flight_requests" for s in f.samples)


def _wait_until(check: Callable[[], bool], what: str, seen: Callable[[], object]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {WAIT_S} s (last seen: {seen()})")


async def _stream(client: openai.AsyncOpenAI, i: int, chunks: list[int], on_chunk: Callable[[], None]) -> object:
    """A long streaming completion; its OpenAI error body, or ``"complete"``."""
    stream = await client.completions.create(model=MODEL_NAME, prompt=f"def f{i}(x):\n", stream=True,
                                             max_tokens=STREAM_TOKENS, temperature=0, extra_body=FULL)
    try:
        async for chunk in stream:
            if chunk.choices:
                chunks[i] += 1
                on_chunk()
    except openai.APIError as exc:
        return exc.body
    return "complete"


async def _unary(client: openai.AsyncOpenAI, i: int) -> object:
    """A non-streaming chat completion; ``(status, error body)``, or ``"complete"``."""
    try:
        await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": f"{i}"}],
                                             max_tokens=UNARY_TOKENS, temperature=0, extra_body=FULL)
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body
    return "complete"


async def _kill_engine_under_load(server: ServeProcess) -> tuple[list[object], list[object], float]:
    """Place streams and unary requests on the frozen engine, let the streams start, SIGKILL it.

    Returns the stream and unary outcomes and the seconds from the kill to the last outcome.
    """
    group = _engine_group(server)
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S)
    chunks = [0] * STREAMS
    refrozen = asyncio.Event()

    def on_chunk() -> None:
        if all(chunks) and not refrozen.is_set():
            os.killpg(group, signal.SIGSTOP)
            refrozen.set()

    try:
        os.killpg(group, signal.SIGSTOP)
        tasks: list[asyncio.Task[object]] = []
        for i in range(STREAMS + UNARIES):
            coro = _stream(client, i, chunks, on_chunk) if i < STREAMS else _unary(client, i)
            tasks.append(asyncio.create_task(coro))
            await asyncio.to_thread(_wait_until, lambda n=i + 1: _in_flight(server) == n,  # type: ignore[misc]
                                    f"request {i} open at the gateway", lambda: _in_flight(server))
        os.killpg(group, signal.SIGCONT)
        try:
            await asyncio.wait_for(refrozen.wait(), timeout=WAIT_S)
        except TimeoutError as exc:
            raise AssertionError(f"both streams did not get a chunk within {WAIT_S} s: {chunks}") from exc
        open_now = await asyncio.to_thread(_in_flight, server)
        assert open_now == STREAMS + UNARIES and not any(t.done() for t in tasks), (
            f"a request finished before the engine was frozen again (open {open_now}, chunks {chunks}): "
            "raise STREAM_TOKENS / UNARY_TOKENS for this machine's speed")
        os.killpg(group, signal.SIGKILL)
        killed_at = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S / 2)
        assert not pending, f"{len(pending)} requests still open {REQUEST_TIMEOUT_S / 2} s after the engine died"
        took = time.monotonic() - killed_at
        results = [t.result() for t in tasks]
        return results[:STREAMS], results[STREAMS:], took
    finally:
        try:
            os.killpg(group, signal.SIGCONT)
        except ProcessLookupError:
            pass
        await client.close()


def _assert_openai_error(body: object) -> dict[str, object]:
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, body
    return body


def test_engine_killed_while_serving_then_serve_restarts(demo_model_dir: Path, tmp_path: Path) -> None:
    args = ["--request-timeout", str(REQUEST_TIMEOUT_S), "--drain-timeout", "10"]
    with running_specserve(demo_model_dir, args, log_dir=tmp_path) as server:
        streams, unaries, took = asyncio.run(_kill_engine_under_load(server))
        # Started streams end with an error event in the OpenAI shape, not a hang or a cut stream.
        for body in streams:
            assert _assert_openai_error(body)["code"] == "engine_failed", body
        # Requests the engine had not answered: a 503 with an OpenAI error object (a client retries).
        for outcome in unaries:
            assert isinstance(outcome, tuple) and outcome[0] == 503, outcome
            assert _assert_openai_error(outcome[1])["code"] == "engine_unavailable", outcome
        assert took < REQUEST_TIMEOUT_S / 2
        # The command exits non-zero (a supervisor restarts it), within a bounded time.
        try:
            code = server.proc.wait(timeout=EXIT_S)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"serve still running {EXIT_S} s after its engine died:\n"
                                 f"{server.log_path.read_text(errors='replace')[-3000:]}") from exc
        assert code != 0, code
        assert "engine exited" in server.log_path.read_text(errors="replace")
        port, engine_port = server.port, server.engine_port
    # A new serve on the same ports (as a supervisor would start it) serves again.
    with running_specserve(demo_model_dir, log_dir=tmp_path, port=port, engine_port=engine_port) as again:
        client = openai.OpenAI(base_url=f"{again.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.completions.create(model=MODEL_NAME, prompt="def f(x):\n", max_tokens=8, temperature=0,
                                        extra_body=FULL)
        assert out.usage is not None and out.usage.completion_tokens == 8
