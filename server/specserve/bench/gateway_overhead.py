"""Gateway overhead under load: the same streaming load sent to the engine directly and through the gateway.

Holds ``--concurrency`` streams open for ``--duration`` seconds against each target in turn (engine,
gateway, engine, gateway... ``--rounds`` times), then prints one JSON object and a summary line:
throughput (output tokens/s) per target and their ratio, and time to first token / end-to-end
latency percentiles with the added latency of the gateway (p50, p99 differences).

Example:
    specserve serve --engine-port 8001 &
    python -m specserve.bench.gateway_overhead --gateway http://127.0.0.1:8000 \\
        --engine http://127.0.0.1:8001 --model specserve-demo --concurrency 64 --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import httpx


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


async def _one(client: httpx.AsyncClient, url: str, body: dict, phase: Phase) -> None:
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                phase.errors += 1
                kind = f"status_{response.status_code}"
                phase.error_kinds[kind] = phase.error_kinds.get(kind, 0) + 1
                return
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    if first is None:
                        first = time.perf_counter() - started
                    chunks += 1
    except httpx.HTTPError as exc:
        phase.errors += 1
        kind = type(exc).__name__
        phase.error_kinds[kind] = phase.error_kinds.get(kind, 0) + 1
        return
    phase.requests += 1
    phase.chunks += chunks
    phase.e2e_s.append(time.perf_counter() - started)
    if first is not None:
        phase.ttft_s.append(first)


async def run_phase(url: str, body: dict, concurrency: int, duration_s: float) -> Phase:
    """``concurrency`` workers each send stream after stream to ``url`` until the time is up."""
    phase = Phase()
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        deadline = time.perf_counter() + duration_s
        started = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await _one(client, url, body, phase)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        phase.seconds = time.perf_counter() - started
    return phase


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", required=True, help="gateway base URL")
    parser.add_argument("--engine", required=True, help="the engine's base URL (behind the gateway)")
    parser.add_argument("--model", default="specserve-demo")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="engine/gateway phase pairs")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="import os\nimport sys\n")


def run(args: argparse.Namespace) -> int:
    body = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    direct: list[Phase] = []
    via: list[Phase] = []
    for _ in range(args.rounds):
        direct.append(asyncio.run(run_phase(args.engine, body, args.concurrency, args.duration)))
        via.append(asyncio.run(run_phase(args.gateway, body, args.concurrency, args.duration)))
    d, g = summarize(direct), summarize(via)
    d_tps, g_tps = float(d["tokens_per_s"]), float(g["tokens_per_s"])  # type: ignore[arg-type]
    result: dict[str, object] = {
        "benchmark": "gateway_overhead",
        "concurrency": args.concurrency, "duration_s": args.duration, "rounds": args.rounds,
        "max_tokens": args.max_tokens,
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
