"""``specserve bench soak``: mixed traffic through ``specserve serve`` for a bounded time, checked.

First ``specserve serve --drafter none`` answers every greedy request of the mix once (the
reference without speculation) and is stopped. Then ``specserve serve --drafter hydra`` (the
speculation-length policy is ``serve``'s default) takes ``--concurrency`` clients for
``--duration`` seconds, each sending a seeded draw of: streaming and non-streaming chat and
completions at temperature 0 (compared with the reference), ``response_format`` json_schema chat
(validated), seeded sampling at temperature > 0 with ``n=2``, streams dropped by the client
mid-way, and malformed requests (an OpenAI-shaped 4xx expected). Gateway and engine RSS and open
file descriptors are sampled throughout; at the end the engine's running/waiting gauges and the
gateway's in-flight gauges must be back to 0.

Prints one JSON object on stdout and a summary line on stderr; exits 1 when a check fails.

Example:
    specserve bench soak --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from specserve.bench.soak_traffic import Outcome, Reference, Traffic, answer_text, reference_requests

log = logging.getLogger(__name__)

MODEL_NAME = "specserve-demo"
START_TIMEOUT_S = 900.0
PORT_TRIES = 3
IDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class SoakConfig:
    """What one soak run does; the CLI flags map one to one."""

    duration_s: float = 600.0
    concurrency: int = 6
    drafter: str = "hydra"
    num_speculative_tokens: int = 4
    max_num_seqs: int = 8
    dtype: str = "float32"
    """Engine dtype of both runs: greedy equality with the reference is an exact check (fp32)."""
    seed: int = 0
    health_timeout_s: float = 30.0
    """The gateway's ``--health-timeout``: how long a busy engine may take to answer a probe."""
    sample_every_s: float = 30.0
    max_rss_growth_mb: float = 100.0
    model: str | None = None
    log_dir: str | None = None


@dataclass
class Sample:
    """One resource reading: seconds since traffic started, RSS in MiB, open file descriptors."""

    t_s: float
    gateway_rss_mb: float
    engine_rss_mb: float
    gateway_fds: int
    engine_fds: int


@dataclass
class Tally:
    """Outcomes so far, by request kind and label, with the first few failures kept verbatim."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    server_errors: int = 0
    requests: int = 0

    def add(self, kind: str, outcome: Outcome) -> None:
        self.requests += 1
        self.by_kind.setdefault(kind, Counter())[outcome.label] += 1
        self.server_errors += int(outcome.server_error)
        if outcome.label != "ok" and len(self.failures) < 20:
            self.failures.append({"kind": kind, **asdict(outcome)})

    def count(self, label: str) -> int:
        return sum(c[label] for c in self.by_kind.values())


# -- processes --------------------------------------------------------------------------------
@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    port: int
    engine_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"


def _wait_ready(serve: Serve, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serve.proc.poll() is not None:
            raise RuntimeError(f"specserve serve exited with {serve.proc.returncode}; see {serve.log_path}")
        try:
            if httpx.get(f"{serve.url}/ready", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"specserve serve not ready within {timeout_s} s; see {serve.log_path}")


@contextmanager
def running_serve(config: SoakConfig, drafter: str, log_dir: Path) -> Iterator[Serve]:
    """``specserve serve`` with ``drafter`` on free ports (``serve``'s own speculation policy).

    A picked port can be taken by another process before ``serve`` binds it; ``serve`` then exits
    before it is ready, and is started again on other ports (at most :data:`PORT_TRIES` times)."""
    from specserve.engine.process import port_in_use

    for attempt in range(1, PORT_TRIES + 1):
        serve = _start_serve(config, drafter, log_dir)
        try:
            _wait_ready(serve, START_TIMEOUT_S)
            break
        except RuntimeError:
            exited = serve.proc.poll() is not None  # by itself, not stopped for being slow
            _stop_serve(serve.proc)
            taken = [p for p in (serve.port, serve.engine_port) if port_in_use(p)]
            if attempt == PORT_TRIES or not exited or not taken:
                raise
            log.warning("a picked port was taken before serve bound it; trying others",
                        extra={"fields": {"ports": taken, "attempt": attempt}})
    try:
        yield serve
    finally:
        _stop_serve(serve.proc)


def _start_serve(config: SoakConfig, drafter: str, log_dir: Path) -> Serve:
    from specserve.engine.process import free_port

    port, engine_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "specserve.cli", "serve", "--served-model-name", MODEL_NAME,
           "--port", str(port), "--engine-port", str(engine_port), "--max-model-len", "512",
           "--drafter", drafter, "--num-speculative-tokens", str(config.num_speculative_tokens),
           # A 2-core machine running engine, gateway and clients can leave a probe unanswered for
           # longer than the default 5 s; the soak checks answers, not probe latency.
           "--health-timeout", str(config.health_timeout_s)]
    if config.model:
        cmd += ["--model", config.model]
    cmd += ["--", "--max-num-seqs", str(config.max_num_seqs), "--seed", str(config.seed), "--dtype", config.dtype]
    log_path = log_dir / f"serve-{drafter}-{port}.log"
    log.info("starting specserve serve", extra={"fields": {"drafter": drafter, "port": port, "log": str(log_path)}})
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return Serve(proc, port, engine_port, log_path)


def _stop_serve(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(timeout=10)


def serve_default_policy() -> str:
    """The speculation-length policy ``specserve serve`` uses when none is given (env included)."""
    from specserve.commands.gateway import add_gateway_arguments

    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser)
    return str(parser.parse_args([]).spec_policy)


def split_processes(serve: Serve) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """``(gateway, engine)`` processes: the engine is vLLM's API server child of ``serve`` and all
    its descendants; the gateway is the ``serve`` process and its other descendants (its grammar
    compile workers)."""
    root = psutil.Process(serve.proc.pid)
    engine: list[psutil.Process] = []
    for child in root.children():
        try:
            if any("vllm" in part for part in child.cmdline()):
                engine = [child, *child.children(recursive=True)]
                break
        except psutil.Error:
            continue
    engine_pids = {p.pid for p in engine}
    gateway = [root, *(p for p in root.children(recursive=True) if p.pid not in engine_pids)]
    return gateway, engine


def compile_workers(processes: list[psutil.Process]) -> int:
    """How many of ``processes`` are grammar compile workers (or their fork server)."""
    count = 0
    for proc in processes:
        try:
            count += any("multiprocessing.forkserver" in part for part in proc.cmdline())
        except psutil.Error:
            continue
    return count


def sample_resources(serve: Serve, t_s: float) -> Sample:
    """RSS and fds of the gateway (the ``serve`` process and its compile workers) and of the engine
    (vLLM's server and all its descendants)."""
    gateway_procs, engine = split_processes(serve)
    mib = 1024 * 1024

    def safe(proc: psutil.Process) -> tuple[int, int]:
        try:
            return proc.memory_info().rss, proc.num_fds()
        except psutil.Error:
            return 0, 0

    g = [safe(p) for p in gateway_procs]
    e = [safe(p) for p in engine]
    return Sample(round(t_s, 1), round(sum(r for r, _ in g) / mib, 1), round(sum(r for r, _ in e) / mib, 1),
                  sum(f for _, f in g), sum(f for _, f in e))


def _gauges(serve: Serve) -> dict[str, float]:
    """The engine's running/waiting requests and the gateway's in-flight requests (all replicas)."""
    engine = httpx.get(f"{serve.engine_url}/metrics", timeout=10, trust_env=False).text
    gateway = httpx.get(f"{serve.url}/metrics", timeout=10, trust_env=False).text
    out = {"engine_running": 0.0, "engine_waiting": 0.0, "gateway_in_flight": 0.0}
    names = {"vllm:num_requests_running": "engine_running", "vllm:num_requests_waiting": "engine_waiting"}
    for family in text_string_to_metric_families(engine):
        if family.name in names:
            out[names[family.name]] = sum(s.value for s in family.samples)
    for family in text_string_to_metric_families(gateway):
        if family.name == "specserve_gateway_replica_in_flight_requests":
            out["gateway_in_flight"] = sum(s.value for s in family.samples)
    return out


def wait_idle(serve: Serve, timeout_s: float = IDLE_TIMEOUT_S) -> tuple[bool, dict[str, float]]:
    """Until every gauge of :func:`_gauges` reads 0 (bounded); ``(idle, last reading)``."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = _gauges(serve)
        if not any(seen.values()):
            return True, seen
        time.sleep(0.5)
    return False, seen


# -- traffic ----------------------------------------------------------------------------------
async def take_reference(url: str) -> Reference:
    """Every greedy request of the mix, answered once by an engine without speculation."""
    reference: Reference = {}
    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as client:
        for key, path, body in reference_requests(MODEL_NAME):
            response = await client.post(path, json=body)
            response.raise_for_status()
            reference[key] = answer_text(path, response.json())
    return reference


async def soak_traffic(serve: Serve, config: SoakConfig, reference: Reference, tally: Tally,
                       samples: list[Sample]) -> None:
    """``config.concurrency`` closed-loop clients for ``config.duration_s``; samples resources."""
    traffic = Traffic(MODEL_NAME, reference, random.Random(config.seed))
    started = time.monotonic()
    stop_at = started + config.duration_s
    limits = httpx.Limits(max_connections=config.concurrency * 2)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            kind = traffic.draw()
            try:
                outcome = await traffic.kinds[kind][1](client)
            except httpx.HTTPError as exc:
                outcome = Outcome("transport_error", 0, f"{type(exc).__name__}: {exc}"[:300])
            tally.add(kind, outcome)

    async def sampler() -> None:
        next_at = started + config.sample_every_s
        while time.monotonic() < stop_at:
            await asyncio.sleep(max(0.0, min(next_at, stop_at) - time.monotonic()))
            if time.monotonic() >= stop_at:
                return
            sample = sample_resources(serve, time.monotonic() - started)
            samples.append(sample)
            next_at += config.sample_every_s
            log.info("soak progress", extra={"fields": {
                "elapsed_s": sample.t_s, "requests": tally.requests, "server_errors": tally.server_errors,
                "not_ok": tally.requests - tally.count("ok"), **asdict(sample)}})

    async with httpx.AsyncClient(base_url=serve.url, timeout=300, trust_env=False, limits=limits) as client:
        await asyncio.gather(sampler(), *(client_loop(client) for _ in range(config.concurrency)))


def _growth(samples: list[Sample], key: str) -> dict[str, float]:
    start, end = getattr(samples[0], key), getattr(samples[-1], key)
    middle = getattr(samples[len(samples) // 2], key)
    return {"start": start, "middle": middle, "end": end, "growth_middle_to_end": round(end - middle, 1)}


def run_soak(config: SoakConfig) -> dict[str, Any]:
    """The whole soak; returns the report (``report["ok"]`` says whether every check passed)."""
    log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="specserve-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with running_serve(config, "none", log_dir) as plain:
        reference = asyncio.run(take_reference(plain.url))
    log.info("reference taken", extra={"fields": {"requests": len(reference)}})
    tally, samples = Tally(), []
    with running_serve(config, config.drafter, log_dir) as serve:
        samples.append(sample_resources(serve, 0.0))
        t0 = time.monotonic()
        asyncio.run(soak_traffic(serve, config, reference, tally, samples))
        elapsed = time.monotonic() - t0
        idle, gauges = wait_idle(serve)
        samples.append(sample_resources(serve, time.monotonic() - t0))
        engine_compilers = compile_workers(split_processes(serve)[1])
    kinds = {kind: dict(counter) for kind, counter in sorted(tally.by_kind.items())}
    rss = {"gateway_mb": _growth(samples, "gateway_rss_mb"), "engine_mb": _growth(samples, "engine_rss_mb")}
    checks = {
        "no_server_errors": tally.server_errors == 0,
        "structured_outputs_valid": tally.count("invalid_structured_output") == 0,
        "greedy_equal_to_reference": tally.count("greedy_mismatch") == 0,
        "every_request_ok": tally.count("ok") == tally.requests,
        "gauges_back_to_zero": idle,
        "rss_growth_within_bound": all(r["growth_middle_to_end"] <= config.max_rss_growth_mb for r in rss.values()),
    }
    return {
        "config": {**asdict(config), "spec_policy": serve_default_policy()},
        "elapsed_s": round(elapsed, 1),
        "requests": tally.requests,
        "requests_per_s": round(tally.requests / elapsed, 2) if elapsed else 0.0,
        "outcomes": kinds,
        "server_errors": tally.server_errors,
        "invalid_structured_outputs": tally.count("invalid_structured_output"),
        "greedy_mismatches": tally.count("greedy_mismatch"),
        "gauges_at_end": gauges,
        # Constraints reach the engine compiled by the gateway: it starts no compile workers.
        "engine_compile_workers": engine_compilers,
        "rss": rss,
        "fds": {"gateway": {"start": samples[0].gateway_fds, "end": samples[-1].gateway_fds},
                "engine": {"start": samples[0].engine_fds, "end": samples[-1].engine_fds}},
        "samples": [asdict(s) for s in samples],
        "failures": tally.failures,
        "checks": checks,
        "ok": all(checks.values()),
        "log_dir": str(log_dir),
    }


def summary_line(report: dict[str, Any]) -> str:
    """One line for humans: outcome counts, checks and resource figures."""
    rss = report["rss"]
    return (f"soak: {report['requests']} requests in {report['elapsed_s']} s, "
            f"5xx {report['server_errors']}, invalid structured {report['invalid_structured_outputs']}, "
            f"greedy mismatches {report['greedy_mismatches']}, gauges at end {report['gauges_at_end']}, "
            f"RSS MiB gateway {rss['gateway_mb']['start']}->{rss['gateway_mb']['end']}, "
            f"engine {rss['engine_mb']['start']}->{rss['engine_mb']['end']}, "
            f"fds gateway {report['fds']['gateway']['start']}->{report['fds']['gateway']['end']}, "
            f"engine {report['fds']['engine']['start']}->{report['fds']['engine']['end']}: "
            f"{'PASS' if report['ok'] else 'FAIL ' + ','.join(k for k, v in report['checks'].items() if not v)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    parser.add_argument("--duration", type=float, default=d.duration_s, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="clients at once")
    parser.add_argument("--drafter", default=d.drafter, help="serve's --drafter for the soak")
    parser.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens)
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--dtype", default=d.dtype, help="engine dtype (greedy equality is exact in float32)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the request mix and the engine")
    parser.add_argument("--health-timeout", type=float, default=d.health_timeout_s,
                        help="seconds the gateway's probes wait for the busy engine")
    parser.add_argument("--sample-every", type=float, default=d.sample_every_s,
                        help="seconds between RSS/fd samples (and progress lines)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=d.max_rss_growth_mb,
                        help="largest RSS growth from the middle sample to the end, per process group")
    parser.add_argument("--model", default=None, help="model dir (default: the demo model)")
    parser.add_argument("--log-dir", default=None, help="where the serve logs go (default: a temp dir)")


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(duration_s=args.duration, concurrency=args.concurrency, drafter=args.drafter,
                      num_speculative_tokens=args.num_speculative_tokens, max_num_seqs=args.max_num_seqs,
                      dtype=args.dtype, seed=args.seed, health_timeout_s=args.health_timeout, sample_every_s=args.sample_every, max_rss_growth_mb=args.max_rss_growth_mb,
                      model=args.model, log_dir=args.log_dir)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    report = run_soak(config_from_args(args))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    sys.stderr.write(summary_line(report) + "\n")
    return 0 if report["ok"] else 1
