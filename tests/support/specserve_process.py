"""Start ``specserve serve`` as a real subprocess on free ports and stop it (used by e2e tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from specserve.engine.process import free_port

START_TIMEOUT_S = 900.0  # engine start on a busy 2-core machine can take minutes
MODEL_NAME = "specserve-demo"
FP32 = ("--dtype", "float32")
"""Engine arguments for tests that compare outputs token for token: they run in fp32."""
ENGINE_KEY = "e2e-engine-key"
"""The engine key ``specserve serve`` gives its engine here (and a separate gateway sends), so
tests can also call the engine directly."""


COMPILE_TIMEOUT_S = "300"
"""The engine's limit on one grammar compile in served tests. The product's 6 s guards against
pathological schemas; on a loaded 2-core test machine a fresh compile worker's first JSON schema
can pass it, which turned tool-call tests into 400s. No served test is about that limit (unit
tests cover it), so they wait for the compile instead."""


def _env() -> dict[str, str]:
    return {**os.environ, "SPECSERVE_ENGINE_API_KEY": ENGINE_KEY,
            "SPECSERVE_ENGINE_COMPILE_TIMEOUT_S": os.environ.get("SPECSERVE_ENGINE_COMPILE_TIMEOUT_S", COMPILE_TIMEOUT_S)}


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    engine_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def _wait_ready(
    proc: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout_s: float, interval_s: float
) -> None:
    """Until ``base_url/ready`` answers 200; fails at once if ``proc`` exits, with its log's tail."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"specserve {proc.args[3]} exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                if client.get(f"{base_url}/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(interval_s)
    raise RuntimeError(f"specserve {proc.args[3]} not ready after {timeout_s} s:\n{_tail(log_path)}")


def wait_ready(server: ServeProcess, timeout_s: float = 180.0) -> None:
    """Until the gateway of ``server`` says it is ready again (``/ready`` 200), bounded."""
    _wait_ready(server.proc, server.base_url, server.log_path, timeout_s, 0.5)


def _tail(log_path: Path, n: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop(server: ServeProcess, timeout_s: float = 60.0) -> int:
    """SIGTERM the serve process and wait; SIGKILL everything that is left if it hangs."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for child in server.descendants():
                child.kill()
            server.proc.kill()
            server.proc.wait(timeout=10)
    return int(server.proc.returncode)


def engine_metrics_when(server: ServeProcess, prefix: str, ready: Callable[[dict[str, float]], bool],
                        what: str) -> dict[str, float]:
    """The engine's ``/metrics`` samples whose family starts with ``prefix`` (keyed
    ``name[sorted labels]``), once ``ready`` holds for them. The engine core publishes specserve's
    counters within about half a second, so this polls (bounded) instead of sleeping."""
    from prometheus_client.parser import text_string_to_metric_families

    seen: dict[str, float] = {}
    for _ in range(120):
        text = httpx.get(f"{server.engine_url}/metrics", timeout=10).text
        seen = {f"{s.name}{sorted(s.labels.items()) if s.labels else ''}": s.value
                for f in text_string_to_metric_families(text) if f.name.startswith(prefix)
                for s in f.samples if not s.name.endswith("_created")}
        if ready(seen):
            return seen
        time.sleep(0.25)  # the next scrape
    raise AssertionError(f"the engine's metrics never showed {what}: {seen}")


@contextmanager
def running_specserve(model_dir: Path, args: Sequence[str] = (), log_dir: Path | None = None,
                      port: int = 0, engine_port: int = 0, engine_args: Sequence[str] = ()) -> Iterator[ServeProcess]:
    """``specserve serve --model model_dir`` with small CPU settings (on free ports unless given);
    ``engine_args`` go to the engine after ``--`` (``("--dtype", "float32")`` for tests that
    compare outputs); always stopped afterwards."""
    port, engine_port = port or free_port(), engine_port or free_port()
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    log_path = log_dir / f"specserve-e2e-{port}.log"
    cmd = [
        sys.executable, "-m", "specserve.cli", "serve",
        "--model", str(model_dir), "--served-model-name", MODEL_NAME,
        "--port", str(port), "--engine-port", str(engine_port),
        "--max-model-len", "512", *args,
        "--", "--max-num-seqs", "4", "--seed", "0", *engine_args,
    ]
    with open(log_path, "ab") as log_file:  # a restart on the same port appends
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_env())
    server = ServeProcess(proc, port, engine_port, log_path)
    try:
        _wait_ready(proc, server.base_url, log_path, START_TIMEOUT_S, 1.0)
        yield server
    finally:
        stop(server)


@contextmanager
def running_gateway(replicas: Sequence[str], args: Sequence[str] = (), log_dir: Path | None = None) -> Iterator[str]:
    """``specserve gateway`` in front of running engines; yields its base URL; always stopped afterwards."""
    port = free_port()
    log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"specserve-gateway-e2e-{port}.log"
    cmd = [sys.executable, "-m", "specserve.cli", "gateway", "--port", str(port),
           *(f"--replica={url}" for url in replicas), *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_env())
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base_url, log_path, 60.0, 0.2)
        yield base_url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
