"""``specserve bench spec-policy``: the goodput speculation-length policy against a fixed one.

Starts ``specserve serve`` (one engine with ``--drafter``, gateway policy ``fixed``: requests go
through without a budget) and a second ``specserve gateway --spec-policy goodput`` in front of the
same engine, then per repetition and ``--concurrency`` sends closed-loop greedy completions
through each gateway in a shuffled order for ``--duration`` seconds. Reports output tokens/s, p50
latency, the ``spec_k`` the goodput gateway chose (``x-specserve-spec-k``) and per concurrency the
paired goodput / fixed ratio over repetitions, as JSON on stdout and one summary line on stderr.
Both sides share the engine, so the comparison is within one run. The engine runs the served
default per-step policy (``goodput``), so ``fixed`` here is the engine level alone and ``goodput``
both levels.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROMPT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
          "fibonacci(n - 2)\n\n# the same for")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafter", default="recycling")
    parser.add_argument("--k", type=int, default=4, help="engine num_speculative_tokens")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds per policy and concurrency")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--goodput-args", default="", help="extra flags for the goodput gateway")
    parser.add_argument("--reps", type=int, default=1, help="repetitions; the two gateways' order is shuffled per point")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order")


def paired_ratios(runs: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per concurrency: median, min and max over repetitions of goodput / fixed tokens/s.

    >>> rows = [{"policy": p, "concurrency": 4, "rep": r, "tokens_per_s": t}
    ...         for p, r, t in (("fixed", 0, 100), ("goodput", 0, 110), ("fixed", 1, 100), ("goodput", 1, 90))]
    >>> paired_ratios(rows)
    {4: {'median': 1.0, 'min': 0.9, 'max': 1.1}}
    """
    by: dict[tuple[int, int], dict[str, float]] = {}
    for row in runs:
        by.setdefault((row["concurrency"], row["rep"]), {})[row["policy"]] = row["tokens_per_s"]
    ratios: dict[int, list[float]] = {}
    for (conc, _), pair in sorted(by.items()):
        if pair.get("fixed") and "goodput" in pair:
            ratios.setdefault(conc, []).append(pair["goodput"] / pair["fixed"])
    return {c: {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}
            for c, r in ratios.items()}


def p50(values: list[float]) -> float:
    """Median (upper) of ``values``.

    >>> p50([3.0, 1.0, 2.0, 4.0])
    3.0
    """
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


async def closed_loop(base: str, model: str, concurrency: int, duration: float, max_tokens: int) -> dict[str, Any]:
    """``concurrency`` clients each sending the next request when the last one returns."""
    import httpx

    tokens, latencies, chosen = 0, [], {}  # type: ignore[var-annotated]
    stop = time.monotonic() + duration
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        async def client_loop() -> None:
            nonlocal tokens
            while time.monotonic() < stop:
                t0 = time.monotonic()
                r = await client.post(f"{base}/v1/completions", json=body)
                r.raise_for_status()
                latencies.append(time.monotonic() - t0)
                tokens += int(r.json()["usage"]["completion_tokens"])
                k = r.headers.get("x-specserve-spec-k", "engine")
                chosen[k] = chosen.get(k, 0) + 1

        t0 = time.monotonic()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {"tokens_per_s": round(tokens / elapsed, 1), "requests": len(latencies),
            "p50_latency_s": round(p50(latencies), 3), "spec_k": chosen}


def _wait_ready(base: str, timeout_s: float = 900.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``base/ready`` answers 200; raises after ``timeout_s`` or as soon as ``proc`` (the
    server's process, when given) has exited."""
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{base}: the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/ready", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{base} not ready within {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace) -> int:
    from specserve.demo import demo_model_dir
    from specserve.engine.process import ENGINE_KEY_ENV, free_port

    model_dir = args.model or demo_model_dir()
    env = {**os.environ, ENGINE_KEY_ENV: secrets.token_urlsafe(16)}  # the engine port needs its key
    name = "bench-model"
    fixed_port, goodput_port, engine_port = free_port(), free_port(), free_port()
    cli = [sys.executable, "-m", "specserve.cli"]
    serve = gateway = None
    try:
        serve = subprocess.Popen(
            [*cli, "serve", "--model", str(model_dir), "--served-model-name", name, "--port", str(fixed_port),
             "--engine-port", str(engine_port), "--drafter", args.drafter, "--num-speculative-tokens",
             str(args.k), "--spec-policy", "fixed", "--", "--max-num-seqs", str(args.max_num_seqs), "--seed", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _wait_ready(f"http://127.0.0.1:{fixed_port}", proc=serve)
        gateway = subprocess.Popen(
            [*cli, "gateway", "--replica", f"http://127.0.0.1:{engine_port}", "--port", str(goodput_port),
             "--spec-policy", "goodput", *args.goodput_args.split()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _wait_ready(f"http://127.0.0.1:{goodput_port}", proc=gateway)
        # Warm-up: the goodput gateway learns acceptance from its first responses.
        asyncio.run(closed_loop(f"http://127.0.0.1:{goodput_port}", name, 1, 5.0, args.max_tokens))
        report: dict[str, Any] = {"drafter": args.drafter, "k": args.k, "duration_s": args.duration,
                                  "reps": args.reps, "seed": args.seed, "runs": []}
        ports = {"fixed": fixed_port, "goodput": goodput_port}
        rng = random.Random(args.seed)
        for rep in range(args.reps):
            for conc in (int(c) for c in args.concurrency.split(",")):
                for policy in rng.sample(sorted(ports), 2):
                    result = asyncio.run(closed_loop(f"http://127.0.0.1:{ports[policy]}", name, conc, args.duration,
                                                     args.max_tokens))
                    report["runs"].append({"policy": policy, "concurrency": conc, "rep": rep, **result})
                    logger.info("bench spec-policy", extra={"fields": {"policy": policy, "concurrency": conc,
                                                                       "rep": rep, **result}})
        report["goodput_over_fixed"] = paired_ratios(report["runs"])
    finally:
        _stop(gateway)
        _stop(serve)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"c{c}: goodput/fixed x{r['median']} [{r['min']}, {r['max']}]"
             for c, r in report["goodput_over_fixed"].items()]
    sys.stderr.write("spec-policy: " + "; ".join(parts) + "\n")
    return 0
