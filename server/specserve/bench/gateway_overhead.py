"""Gateway overhead under load: the same streaming load sent to the engine directly and through the gateway.

Holds ``--concurrency`` streams open for ``--duration`` seconds against each target in turn (engine,
gateway, engine, gateway... ``--rounds`` times), then prints one JSON object and a summary line:
throughput (output tokens/s) per target and their ratio, and time to first token / end-to-end
latency percentiles with the added latency of the gateway (p50, p99 differences).

With ``--fake-engine`` the benchmark starts its own targets as subprocesses on free 127.0.0.1
ports: a fake engine (:mod:`specserve.bench.fake_engine`, one token every ``--token-interval``
seconds, no model) and ``specserve gateway`` in front of it; the JSON then also holds the CPU
seconds the gateway process used per request. This measures the gateway alone, without an
engine's compute competing for the cores.

Example:
    specserve serve --engine-port 8001 &
    python -m specserve.bench.gateway_overhead --gateway http://127.0.0.1:8000 \\
        --engine http://127.0.0.1:8001 --model specserve-demo --concurrency 64 --duration 120
    specserve bench gateway --fake-engine --concurrency 64 --duration 30 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import aiohttp
import httpx

from specserve.bench.fake_engine import MODEL as FAKE_MODEL
from specserve.bench.fake_engine import new_loop
from specserve.engine.process import free_port


@dataclass
class Phase:
    """Results of one target over one load period."""

    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    seconds: float = 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5), percentile([1.0, 2.0, 3.0, 4.0], 0.99)
        (2.0, 4.0)
    """
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(q * len(ordered) + 0.999999)))
    return ordered[rank - 1]


def _count_error(phase: Phase, kind: str) -> None:
    phase.errors += 1
    phase.error_kinds[kind] = phase.error_kinds.get(kind, 0) + 1


async def _one(session: aiohttp.ClientSession, url: str, body: dict, phase: Phase) -> None:
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                _count_error(phase, f"status_{response.status}")
                return
            async for line in response.content:
                if line.startswith(b"data: {"):
                    if first is None:
                        first = time.perf_counter() - started
                    chunks += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        _count_error(phase, type(exc).__name__)
        return
    phase.requests += 1
    phase.chunks += chunks
    phase.e2e_s.append(time.perf_counter() - started)
    if first is not None:
        phase.ttft_s.append(first)


async def _load(url: str, body: dict, concurrency: int, duration_s: float) -> Phase:
    phase = Phase()
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        deadline = time.perf_counter() + duration_s
        started = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await _one(session, url, body, phase)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        phase.seconds = time.perf_counter() - started
    return phase


def run_phase(url: str, body: dict, concurrency: int, duration_s: float) -> Phase:
    """``concurrency`` workers each send stream after stream to ``url`` until the time is up.

    The load client is aiohttp on uvloop (when installed): it shares the cores with what it
    measures, so it should cost as little as possible.
    """
    loop = new_loop()
    try:
        return loop.run_until_complete(_load(url, body, concurrency, duration_s))
    finally:
        loop.close()


def summarize(phases: list[Phase]) -> dict[str, object]:
    kinds: dict[str, int] = {}
    for p in phases:
        for kind, count in p.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
    ttft = [v for p in phases for v in p.ttft_s]
    e2e = [v for p in phases for v in p.e2e_s]
    seconds = sum(p.seconds for p in phases)
    return {
        "requests": sum(p.requests for p in phases),
        "errors": sum(p.errors for p in phases),
        "error_kinds": kinds,
        "tokens_per_s": round(sum(p.chunks for p in phases) / seconds, 2) if seconds else 0.0,
        "ttft_p50_ms": round(percentile(ttft, 0.5) * 1000, 3),
        "ttft_p99_ms": round(percentile(ttft, 0.99) * 1000, 3),
        "e2e_p50_ms": round(percentile(e2e, 0.5) * 1000, 3),
        "e2e_p99_ms": round(percentile(e2e, 0.99) * 1000, 3),
    }


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``url`` until it answers 200 (raises ``RuntimeError`` after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready in {timeout_s} s")


@contextmanager
def subprocess_server(
    argv: list[str], ready_url: str, cpus: frozenset[int] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` (its output discarded) until the block ends; waits for ``ready_url`` first.

    ``cpus``: the CPUs the process may run on (all of this process's when ``None``).
    """
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)
    try:
        wait_ready(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as ``taskset -c`` writes it.

    Example:
        >>> sorted(parse_cpus("0,2-4"))
        [0, 2, 3, 4]
    """
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return frozenset(cpus)


def split_cpus(available: frozenset[int], gateway: frozenset[int]) -> frozenset[int]:
    """The CPUs left to the load client and the fake engine once the gateway has its own.

    Example:
        >>> sorted(split_cpus(frozenset({0, 1}), frozenset({1})))
        [0]
        >>> split_cpus(frozenset({0, 1}), frozenset({0, 1}))
        Traceback (most recent call last):
        ...
        ValueError: --gateway-cpus must leave at least one CPU to the load client and the engine
    """
    if not gateway <= available:
        raise ValueError(f"--gateway-cpus {sorted(gateway)} is not within this process's CPUs {sorted(available)}")
    rest = available - gateway
    if not rest:
        raise ValueError("--gateway-cpus must leave at least one CPU to the load client and the engine")
    return rest


@contextmanager
def fake_targets(
    token_interval_s: float, gateway_cpus: frozenset[int] | None = None
) -> Iterator[tuple[str, str, int]]:
    """A fake engine and a gateway in front of it: yields (gateway URL, engine URL, gateway pid).

    With ``gateway_cpus`` the gateway runs on those CPUs only, and the fake engine and this process
    (the load client) on the others, as a gateway in a pod of its own would.
    """
    rest = None
    own = frozenset(os.sched_getaffinity(0))
    if gateway_cpus is not None:
        rest = split_cpus(own, gateway_cpus)
    engine_port, gateway_port = free_port(), free_port()
    engine = f"http://127.0.0.1:{engine_port}"
    gateway = f"http://127.0.0.1:{gateway_port}"
    with ExitStack() as stack:
        stack.enter_context(subprocess_server(
            [sys.executable, "-m", "specserve.bench.fake_engine", "--port", str(engine_port),
             "--token-interval", str(token_interval_s)], f"{engine}/health", rest))
        proc = stack.enter_context(subprocess_server(
            [sys.executable, "-m", "specserve.cli", "gateway", "--replica", engine,
             "--port", str(gateway_port)], f"{gateway}/ready", gateway_cpus))
        if rest is not None:
            os.sched_setaffinity(0, rest)
            stack.callback(os.sched_setaffinity, 0, own)
        yield gateway, engine, proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", help="gateway base URL (required without --fake-engine)")
    parser.add_argument("--engine", help="the engine's base URL behind the gateway (required without "
                                         "--fake-engine)")
    parser.add_argument("--fake-engine", action="store_true",
                        help="start a fake engine and a gateway in front of it as subprocesses")
    parser.add_argument("--token-interval", type=float, default=0.02,
                        help="with --fake-engine: seconds between a stream's tokens")
    parser.add_argument("--gateway-cpus", type=parse_cpus, default=None, metavar="LIST",
                        help="with --fake-engine: run the gateway on these CPUs only (e.g. '1') and the "
                             "load client and fake engine on the rest, as a gateway with a core of its "
                             "own would run")
    parser.add_argument("--model", default=None,
                        help="model name (default: specserve-demo, or the fake engine's model)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="engine/gateway phase pairs")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="import os\nimport sys\n")


def run(args: argparse.Namespace) -> int:
    if not args.fake_engine and not (args.gateway and args.engine):
        raise SystemExit("give --gateway and --engine, or --fake-engine")
    if args.gateway_cpus is not None and not args.fake_engine:
        raise SystemExit("--gateway-cpus needs --fake-engine (pin your own servers with taskset)")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if not args.fake_engine:
        return measure(args, None)
    if args.gateway_cpus is not None:
        try:
            split_cpus(frozenset(os.sched_getaffinity(0)), args.gateway_cpus)
        except ValueError as exc:  # leaves nothing to the load, or names CPUs not ours
            raise SystemExit(str(exc)) from None
    with fake_targets(args.token_interval, args.gateway_cpus) as (args.gateway, args.engine, gateway_pid):
        return measure(args, gateway_pid)


def measure(args: argparse.Namespace, gateway_pid: int | None) -> int:
    """Alternate engine and gateway phases; print the JSON result and the summary line."""
    model = args.model or (FAKE_MODEL if args.fake_engine else "specserve-demo")
    body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    direct: list[Phase] = []
    via: list[Phase] = []
    gateway_cpu_s = 0.0
    for _ in range(args.rounds):
        direct.append(run_phase(args.engine, body, args.concurrency, args.duration))
        cpu_before = cpu_seconds(gateway_pid) if gateway_pid is not None else 0.0
        via.append(run_phase(args.gateway, body, args.concurrency, args.duration))
        if gateway_pid is not None:
            gateway_cpu_s += cpu_seconds(gateway_pid) - cpu_before
    d, g = summarize(direct), summarize(via)
    if gateway_pid is not None:
        answered = max(1, sum(p.requests for p in via))
        g["cpu_ms_per_request"] = round(1000 * gateway_cpu_s / answered, 3)
    d_tps, g_tps = float(d["tokens_per_s"]), float(g["tokens_per_s"])  # type: ignore[arg-type]
    result: dict[str, object] = {
        "benchmark": "gateway_overhead",
        "concurrency": args.concurrency, "duration_s": args.duration, "rounds": args.rounds,
        "max_tokens": args.max_tokens, "fake_engine": args.fake_engine,
        "token_interval_s": args.token_interval if args.fake_engine else None,
        "gateway_cpus": sorted(args.gateway_cpus) if args.gateway_cpus is not None else None,
        "client_cpus": sorted(os.sched_getaffinity(0)),
        "direct": d, "gateway": g,
        "throughput_ratio": round(g_tps / d_tps, 4) if d_tps else None,
        **{f"added_{k}": round(float(g[k]) - float(d[k]), 3)  # type: ignore[arg-type]
           for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")},
    }
    print(json.dumps(result))
    print(
        f"gateway_overhead: throughput ratio {result['throughput_ratio']}, added p50 TTFT "
        f"{result['added_ttft_p50_ms']} ms, added p50 e2e {result['added_e2e_p50_ms']} ms "
        f"({args.concurrency} streams, errors {d['errors']}/{g['errors']})"
    )
    return 0 if d["errors"] == 0 and g["errors"] == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="gateway_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
