"""SIGTERM under load, as a rollout or a node drain delivers it: every started stream completes.

A real vLLM engine (the demo model, CPU) runs with the shutdown timeout the Helm chart and compose
pass (``--shutdown-timeout``) behind a real ``specserve gateway`` with its ``--drain-timeout``. Four
streams start through the gateway (official ``openai`` client); once each has its first token the
engine's process group is frozen (SIGSTOP) so that no stream can finish before the signals land;
SIGTERM goes to the engine's server process (the container's PID 1) and to the gateway, then the
engine resumes. With a drain, all four streams end with ``finish_reason == "length"`` and the full
token count, and both processes exit by themselves. With vLLM's default ``--shutdown-timeout 0``
(what the chart passed before) the same run cuts the streams: the check below fails on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai


from specserve.engine.process import EngineProcess, EngineSpec, free_port

log = logging.getLogger(__name__)

MODEL_NAME = "specserve-demo"
STREAMS = 4
STREAM_TOKENS = 300
DRAIN_S = 120  # engine --shutdown-timeout and gateway --drain-timeout of the draining run
EXIT_BOUND_S = DRAIN_S + 60


@dataclass
class Stack:
    engine: EngineProcess
    gateway: subprocess.Popen[bytes]
    gateway_url: str
    gateway_log: Path


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gateway exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            response = httpx.get(f"{url}/ready", timeout=2, trust_env=False)
            if response.status_code == 200:
                return
            last = f"status {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"gateway not ready after {timeout_s} s: {last}")


@contextmanager
def stack(model_dir: Path, tmp_path: Path, shutdown_timeout_s: int) -> Iterator[Stack]:
    spec = EngineSpec(model=str(model_dir), port=free_port(), served_model_name=MODEL_NAME, device="cpu",
                      max_model_len=512, extra_args=("--max-num-seqs", str(STREAMS), "--seed", "0",
                                                     "--shutdown-timeout", str(shutdown_timeout_s)))
    engine = EngineProcess(spec, log_path=str(tmp_path / f"engine-{spec.port}.log"))
    gateway: subprocess.Popen[bytes] | None = None
    try:
        engine.start()
        engine.wait_ready(timeout_s=900)
        port = free_port()
        gateway_log = tmp_path / f"gateway-{port}.log"
        with open(gateway_log, "wb") as out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "specserve.cli", "gateway", "--port", str(port), f"--replica={spec.url}",
                 "--request-timeout", "300", "--drain-timeout", str(max(shutdown_timeout_s, 5))],
                stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, gateway, gateway_log, 60)
        yield Stack(engine, gateway, url, gateway_log)
    finally:
        if engine.proc is not None and engine.proc.poll() is None:
            os.killpg(engine.proc.pid, signal.SIGCONT)
        if gateway is not None and gateway.poll() is None:
            gateway.kill()
            gateway.wait(timeout=10)
        engine.stop(grace_s=5)


async def _stream(client: openai.AsyncOpenAI, i: int, started: asyncio.Event) -> tuple[str, int]:
    """One streamed completion: ("complete" | "cut: <why>", completion tokens the usage reported)."""
    tokens, finish = 0, None
    try:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=f"def f{i}(x):\n", max_tokens=STREAM_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                started.set()
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except (openai.APIError, httpx.HTTPError) as exc:
        return f"cut: {type(exc).__name__}: {exc}", tokens
    if finish != "length" or tokens != STREAM_TOKENS:
        return f"cut: finish_reason={finish}", tokens
    return "complete", tokens


async def _terminate_under_load(s: Stack) -> tuple[list[tuple[str, int]], dict[str, float]]:
    """Start the streams, freeze the engine, SIGTERM engine and gateway, resume; the stream outcomes
    and how long each process took to exit after its SIGTERM."""
    assert s.engine.proc is not None
    client = openai.AsyncOpenAI(base_url=f"{s.gateway_url}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        events = [asyncio.Event() for _ in range(STREAMS)]
        tasks = [asyncio.create_task(_stream(client, i, ev)) for i, ev in enumerate(events)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), timeout=180)
        os.killpg(s.engine.proc.pid, signal.SIGSTOP)  # no stream can finish before the signals land
        unfinished = [t for t in tasks if not t.done()]
        assert len(unfinished) == STREAMS, "a stream finished before SIGTERM: raise STREAM_TOKENS"
        signalled = time.monotonic()
        s.engine.proc.send_signal(signal.SIGTERM)  # pending until the group resumes
        s.gateway.send_signal(signal.SIGTERM)
        os.killpg(s.engine.proc.pid, signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=EXIT_BOUND_S)
        exits: dict[str, float] = {}
        for name, proc in (("engine", s.engine.proc), ("gateway", s.gateway)):
            await asyncio.to_thread(proc.wait, EXIT_BOUND_S)
            exits[name] = round(time.monotonic() - signalled, 1)
        return list(results), exits
    finally:
        await client.close()


def test_sigterm_under_load_lets_every_started_stream_finish(demo_model_dir: Path, tmp_path: Path) -> None:
    with stack(demo_model_dir, tmp_path, DRAIN_S) as s:
        results, exits = asyncio.run(_terminate_under_load(s))
        log.info("drain results", extra={"fields": {"streams": results, "exit_after_s": exits}})
        assert results == [("complete", STREAM_TOKENS)] * STREAMS, results
        assert exits["engine"] < DRAIN_S and exits["gateway"] < DRAIN_S + 10, exits  # exited by themselves
        gateway_log = s.gateway_log.read_text()
        assert "Traceback" not in gateway_log, gateway_log[-3000:]


def test_without_a_shutdown_timeout_sigterm_cuts_the_streams(demo_model_dir: Path, tmp_path: Path) -> None:
    """The control: vLLM's default (abort on SIGTERM), as the chart and compose ran it before."""
    with stack(demo_model_dir, tmp_path, 0) as s:
        results, exits = asyncio.run(_terminate_under_load(s))
        log.info("abort results", extra={"fields": {"streams": results, "exit_after_s": exits}})
        assert all(outcome != "complete" for outcome, _ in results), results
        assert all(tokens < STREAM_TOKENS for _, tokens in results), results


