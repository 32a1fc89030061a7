"""``specserve bench routing``: goodput-aware routing against least-loaded, over two replicas.

Starts one ``specserve serve`` per ``--replicas`` drafter (default ``hydra,medusa``: one replica
that drafts well and one that drafts less well), each with the engine's per-step goodput policy
(so it exports its cost model) and its engine worker bound to its own core, then two
``specserve gateway`` processes in front of both engines: ``--routing least-loaded`` and
``--routing goodput`` (both ``--spec-policy goodput``). The baseline arm ``plain`` is as many
replicas without a drafter, bound the same way, behind a least-loaded gateway (``--no-plain``
leaves it out). After a warm-up through each gateway, every repetition sends closed-loop greedy
completions through each gateway in turn (the order shuffled per repetition and concurrency) for
``--duration`` seconds at each ``--concurrency``. Reports per concurrency: output tokens/s and p50
latency per arm, the ratios paired by repetition (goodput/least-loaded, each against plain), and
the share of requests each arm sent to its first replica (from the engines' own request
counters). JSON on stdout, one summary line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import secrets
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from specserve.bench.spec_policy import _stop, _wait_ready, closed_loop
from specserve.bench.stats import paired

logger = logging.getLogger(__name__)

ARMS = ("least-loaded", "goodput", "plain")
"""Gateways: least-loaded and goodput routing over the drafting replicas; least-loaded over as many
replicas without a drafter."""
RATIOS = (("goodput", "least-loaded"), ("goodput", "plain"), ("least-loaded", "plain"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--replicas", default="hydra,medusa", help="one replica per drafter (comma-separated)")
    parser.add_argument("--k", type=int, default=4, help="each engine's num_speculative_tokens")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per arm, concurrency and repetition")
    parser.add_argument("--reps", type=int, default=2, help="repetitions (arm order alternates)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="the baseline arm: as many replicas without a drafter (least-loaded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arm order")


def routing_of(arm: str) -> str:
    """The gateway's ``--routing`` for an arm (the plain replicas sit behind least-loaded).

    >>> [routing_of(a) for a in ARMS]
    ['least-loaded', 'goodput', 'least-loaded']
    """
    return "least-loaded" if arm == "plain" else arm


def share(counts: list[float]) -> float | None:
    """The first replica's share of ``counts`` (requests per replica).

    >>> share([3.0, 1.0]), share([0.0, 0.0])
    (0.75, None)
    """
    total = sum(counts)
    return round(counts[0] / total, 3) if total else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: each arm's tokens/s and p50 latency per repetition (and medians), the
    first replica's share of its requests, and the :data:`RATIOS` paired by repetition (None
    where an arm did not run).

    >>> runs = [{"arm": a, "concurrency": 2, "rep": r, "tokens_per_s": t, "p50_latency_s": 0.5,
    ...          "first_share": 0.5} for r, (a, t) in enumerate([("least-loaded", 100.0), ("goodput", 104.0)])]
    >>> runs += [{**runs[0], "rep": 1, "tokens_per_s": 90.0}, {**runs[1], "rep": 1, "tokens_per_s": 99.0}]
    >>> summarize(runs)["2"]["goodput_vs_least_loaded"]
    {'median': 1.07, 'min': 1.04, 'max': 1.1}
    """
    out: dict[str, Any] = {}
    for conc in sorted({r["concurrency"] for r in runs}):
        at = [r for r in runs if r["concurrency"] == conc]
        per_arm: dict[str, Any] = {}
        for arm in sorted({r["arm"] for r in at}, key=ARMS.index):
            mine = sorted((r for r in at if r["arm"] == arm), key=lambda r: r["rep"])
            speeds = [r["tokens_per_s"] for r in mine]
            per_arm[arm] = {"tokens_per_s": speeds, "median_tokens_per_s": statistics.median(speeds) if speeds else None,
                            "p50_latency_s": statistics.median(r["p50_latency_s"] for r in mine) if mine else None,
                            "first_replica_share": [r["first_share"] for r in mine]}
        ratios = {f"{a}_vs_{b}".replace("-", "_"): paired(per_arm[a]["tokens_per_s"], per_arm[b]["tokens_per_s"])
                  if a in per_arm and b in per_arm else None for a, b in RATIOS}
        out[str(conc)] = {**per_arm, **ratios}
    return out


def _start_replica(cli: list[str], model_dir: Path, name: str, drafter: str, core: int, key: str,
                   args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """One ``specserve serve`` (drafter ``none``: a plain engine) with its engine worker on ``core``;
    returns it and its engine's URL once it answers."""
    from specserve.engine.process import ENGINE_KEY_ENV, free_port

    port, engine_port = free_port(), free_port()
    env = {**os.environ, ENGINE_KEY_ENV: key, "VLLM_CPU_OMP_THREADS_BIND": str(core)}
    spec = ["--drafter", drafter]
    if drafter != "none":
        spec += ["--num-speculative-tokens", str(args.k), "--engine-spec-policy", "goodput"]
    proc = subprocess.Popen(
        [*cli, "serve", "--model", str(model_dir), "--served-model-name", name, "--port", str(port),
         "--engine-port", str(engine_port), *spec, "--", "--max-num-seqs", str(args.max_num_seqs), "--seed", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait_ready(f"http://127.0.0.1:{port}", proc=proc)
    return proc, f"http://127.0.0.1:{engine_port}"


def _finished_requests(engine: str) -> float:
    """The engine's finished requests (vLLM's ``request_success`` counters, all reasons)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{engine}/metrics", timeout=10, trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "vllm:request_success"
               for s in f.samples if s.name.endswith("_total"))


def run(args: argparse.Namespace) -> int:
    from specserve.demo import demo_model_dir
    from specserve.engine.process import ENGINE_KEY_ENV, free_port

    model_dir = args.model or demo_model_dir()
    name = "bench-model"
    drafters = [d.strip() for d in str(args.replicas).split(",") if d.strip()]
    concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    cli = [sys.executable, "-m", "specserve.cli"]
    key = secrets.token_urlsafe(16)
    cores = os.cpu_count() or 1
    arms = ARMS if args.plain else ARMS[:2]
    rng = random.Random(args.seed)
    replicas: list[subprocess.Popen[bytes]] = []
    gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    pools: dict[str, list[str]] = {"drafting": [], "plain": []}
    runs: list[dict[str, Any]] = []
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        for pool, names in (("drafting", drafters), ("plain", ["none"] * len(drafters) if args.plain else [])):
            for i, drafter in enumerate(names):
                proc, engine = _start_replica(cli, model_dir, name, drafter, i % cores, key, args)
                replicas.append(proc)
                pools[pool].append(engine)
        for arm in arms:
            port = free_port()
            flags = [f"--replica={e}" for e in pools["plain" if arm == "plain" else "drafting"]]
            proc = subprocess.Popen([*cli, "gateway", *flags, "--port", str(port), "--spec-policy", "goodput",
                                     "--routing", routing_of(arm)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, ENGINE_KEY_ENV: key})
            gateways[arm] = (proc, f"http://127.0.0.1:{port}")
            _wait_ready(gateways[arm][1], proc=proc)
        for arm in arms:  # the same warm-up through each gateway
            asyncio.run(closed_loop(gateways[arm][1], name, 2, 5.0, args.max_tokens))
        for rep in range(args.reps):
            for conc in concurrency:
                order = rng.sample(arms, len(arms))
                for arm in order:
                    engines = pools["plain" if arm == "plain" else "drafting"]
                    before = [_finished_requests(e) for e in engines]
                    result = asyncio.run(closed_loop(gateways[arm][1], name, conc, args.duration, args.max_tokens))
                    counts = [_finished_requests(e) - b for e, b in zip(engines, before)]
                    row = {"arm": arm, "concurrency": conc, "rep": rep, **result, "first_share": share(counts)}
                    runs.append(row)
                    logger.info("bench routing", extra={"fields": row})
    finally:
        for proc, _ in gateways.values():
            _stop(proc)
        for proc in replicas:
            _stop(proc)
    report = {"replicas": drafters, "plain": args.plain, "k": args.k, "duration_s": args.duration, "reps": args.reps,
              "max_tokens": args.max_tokens, "runs": runs, "summary": summarize(runs)}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"c{c}: goodput/least-loaded x{(s['goodput_vs_least_loaded'] or {}).get('median')}, "
             f"goodput/plain x{(s['goodput_vs_plain'] or {}).get('median')}, "
             f"least-loaded/plain x{(s['least_loaded_vs_plain'] or {}).get('median')} "
             f"(first replica {s['least-loaded']['first_replica_share']} vs {s['goodput']['first_replica_share']})"
             for c, s in report["summary"].items()]
    sys.stderr.write("routing: " + "; ".join(parts) + "\n")
    return 0
