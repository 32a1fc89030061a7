"""``specserve bench goodput``: the engine's goodput controller against every fixed policy (skeleton).

Arms:
- ``none``: an engine without a drafter;
- ``k1`` .. ``k4``: one speculative engine with the ``fixed`` policy, every request sending that
  ``spec_k``;
- ``goodput``: a speculative engine with ``--engine-spec-policy goodput``.

Each arm has its own in-process engine, all alive at once. Load is open loop: Poisson
arrivals at each ``--rates`` value (requests/s), precomputed from ``--seed``, so the client is a
loop that adds due requests and steps the engine (no HTTP, no threads). Every arm gets the same
prompts (held-out stdlib files), the same lognormal output lengths and the same warm-up. Arms
run in a new random order at every rate. Reports per arm and rate mean / p50 / p99 latency,
TTFT, TPOT and output tokens/s, as JSON on stdout and a one-line summary on stderr.

Runs on a machine shared with other work cannot give publishable figures: arrival-time
latencies absorb every pause of the machine. Use them to check the harness, and publish only
runs on a quiet machine with ``--reps`` > 1. Not yet covered: the gateway level, two replicas, a
closed loop, a step trace and plots.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafter", default="recycling", choices=("recycling", "hydra", "medusa"))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rates", default="0.5,1,2,4", help="Poisson arrival rates, requests/s")
    parser.add_argument("--requests", type=int, default=24, help="requests per rate and arm")
    parser.add_argument("--mean-output", type=int, default=48, help="mean output tokens (lognormal)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="none,k1,k2,k3,k4,goodput")


def arrivals(rate: float, n: int, seed: int) -> list[float]:
    """``n`` Poisson arrival times (s from the start) at ``rate`` per second.

    >>> a = arrivals(2.0, 1000, seed=1); round(len(a) / a[-1], 1)
    2.0
    """
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps).tolist()


def output_lengths(mean: int, n: int, seed: int, sigma: float = 0.6) -> list[int]:
    """Lognormal output lengths with the given mean, clipped to ``[4, 4 * mean]``.

    >>> ls = output_lengths(48, 2000, seed=0); 40 < sum(ls) / len(ls) < 56
    True
    """
    mu = np.log(mean) - sigma ** 2 / 2
    raw = np.random.default_rng(seed + 1).lognormal(mu, sigma, size=n)
    return np.clip(np.round(raw), 4, 4 * mean).astype(int).tolist()


def summarise(latency: list[float], ttft: list[float], tpot: list[float], tokens: int, span: float) -> dict[str, float]:
    """Mean / p50 / p99 latency (s), mean TTFT and TPOT (ms), output tokens/s."""
    q = np.quantile(latency, [0.5, 0.99]).tolist()
    return {"latency_mean_s": round(statistics.fmean(latency), 3), "latency_p50_s": round(q[0], 3),
            "latency_p99_s": round(q[1], 3), "ttft_mean_ms": round(1e3 * statistics.fmean(ttft), 1),
            "tpot_mean_ms": round(1e3 * statistics.fmean(tpot), 2) if tpot else 0.0,
            "tokens_per_s": round(tokens / span, 1) if span > 0 else 0.0}


def open_loop(engine: Any, prompts: list[list[int]], params: list[Any], times: list[float],
              tag: str) -> dict[str, float]:
    """Add each request at its arrival time, step the engine until all finish, and summarise."""
    pending = list(range(len(prompts)))
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and times[pending[0]] <= now:
            i = pending.pop(0)
            rid = f"{tag}-{i}"
            engine.add_request(rid, {"prompt_token_ids": prompts[i]}, params[i])
            sent[rid] = t0 + times[i]  # latency from the scheduled arrival: queueing counts
        if not engine.has_unfinished_requests():
            if pending:  # idle until the next arrival (at most 10 ms per turn)
                time.sleep(max(0.0, min(0.01, times[pending[0]] - now)))
            continue
        for out in engine.step():
            stamp = time.perf_counter()
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = stamp
            if out.finished:
                done[out.request_id] = (stamp, len(out.outputs[0].token_ids))
    latency = [done[r][0] - sent[r] for r in sent]
    ttft = [first[r] - sent[r] for r in sent]
    tpot = [(done[r][0] - first[r]) / (done[r][1] - 1) for r in sent if done[r][1] > 1]
    span = max(s for s, _ in done.values()) - t0
    return summarise(latency, ttft, tpot, sum(n for _, n in done.values()), span)


def _plan_stats(llm: Any) -> dict[str, Any]:
    """The in-process engine's planner statistics (``PlanStats.snapshot``)."""
    def snapshot(worker: Any) -> dict[str, Any]:
        runner = getattr(worker, "worker", worker).model_runner
        planner = getattr(runner, "_specserve_planner", None)
        return planner.snapshot() if planner is not None else {}

    return llm.collective_rpc(snapshot)[0]


def plan_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the controller did between two snapshots: plans, the share with no speculation, mean
    planned k per decode row, and the step-time model's MAPE over the steps it timed.

    >>> plan_delta({"steps": 10, "no_spec_steps": 2, "decode_rows": 10, "k_rows": {"0": 2, "4": 8},
    ...             "timed_steps": 10, "abs_pct_error_sum": 1.0},
    ...            {"steps": 20, "no_spec_steps": 7, "decode_rows": 30, "k_rows": {"0": 12, "4": 13, "2": 5},
    ...             "timed_steps": 20, "abs_pct_error_sum": 1.5})
    {'plans': 10, 'no_spec_share': 0.5, 'mean_k': 1.5, 'timed_steps': 10, 'mape': 0.05}
    """
    plans = after.get("steps", 0) - before.get("steps", 0)
    rows = after.get("decode_rows", 0) - before.get("decode_rows", 0)
    drafts = sum(int(k) * n for k, n in (after.get("k_rows") or {}).items()) - sum(
        int(k) * n for k, n in (before.get("k_rows") or {}).items())
    timed = after.get("timed_steps", 0) - before.get("timed_steps", 0)
    errors = after.get("abs_pct_error_sum", 0.0) - before.get("abs_pct_error_sum", 0.0)
    return {"plans": plans,
            "no_spec_share": round((after.get("no_spec_steps", 0) - before.get("no_spec_steps", 0)) / plans, 3)
            if plans else None,
            "mean_k": round(drafts / rows, 3) if rows else None,
            "timed_steps": timed, "mape": round(errors / timed, 4) if timed else None}


def run(args: argparse.Namespace) -> int:
    from vllm import SamplingParams

    from specserve.bench.drafters import _prompts
    from specserve.demo import demo_model_dir
    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.speculative_config import speculative_config
    from specserve.head_training import resolve_heads

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = args.model or demo_model_dir()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    rates = [float(r) for r in args.rates.split(",")]
    heads = resolve_heads(args.drafter, None, is_demo=args.model is None)
    spec = speculative_config(args.drafter, args.k)  # type: ignore[arg-type]
    common = {"max_num_seqs": args.max_num_seqs, "kv_cache_memory_bytes": 256 << 20}
    engines: dict[str, Any] = {}
    with settings.override(heads_dir=heads or settings.current().heads_dir):  # read as engines build
        if "none" in arms:
            engines["none"] = local_llm(model_dir, **common)
        if any(a.startswith("k") for a in arms):
            engines["fixed"] = local_llm(model_dir, speculative_config=spec, **common,
                                         additional_config={"specserve": {"spec_policy": "fixed"}})
        if "goodput" in arms:
            engines["goodput"] = local_llm(model_dir, speculative_config=spec, **common,
                                           additional_config={"specserve": {"spec_policy": "goodput"}})
    pool = _prompts(model_dir, 64, args.prompt_tokens)
    rng = random.Random(args.seed)
    report: dict[str, Any] = {"model": str(model_dir), "drafter": args.drafter, "k": args.k,
                              "requests": args.requests, "temperature": args.temperature,
                              "shared_machine": True, "rates": {}}
    try:
        for llm in engines.values():  # the same warm-up for every engine
            llm.generate([{"prompt_token_ids": pool[0]}], SamplingParams(max_tokens=8), use_tqdm=False)
        for ri, rate in enumerate(rates):
            times = arrivals(rate, args.requests, args.seed + ri)
            lengths = output_lengths(args.mean_output, args.requests, args.seed + ri)
            prompts = [pool[(ri * args.requests + i) % len(pool)] for i in range(args.requests)]
            order = arms[:]
            rng.shuffle(order)
            report["rates"][str(rate)] = {"order": order, "arms": {}}
            for arm in order:
                engine_name = "none" if arm == "none" else "goodput" if arm == "goodput" else "fixed"
                extra = {"spec_k": int(arm[1:])} if arm.startswith("k") else None
                params = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True,
                                         seed=args.seed + i, extra_args=extra) for i, n in enumerate(lengths)]
                before = _plan_stats(engines[engine_name]) if arm == "goodput" else None
                result = open_loop(engines[engine_name].llm_engine, prompts, params, times, f"{arm}-{rate}")
                if before is not None:
                    result["plan"] = plan_delta(before, _plan_stats(engines[engine_name]))
                report["rates"][str(rate)]["arms"][arm] = result
                logger.info("bench goodput", extra={"fields": {"rate": rate, "arm": arm, **result}})
    finally:
        engines.clear()
        gc.collect()
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = []
    for rate, per in report["rates"].items():
        best = min(per["arms"].items(), key=lambda kv: kv[1]["latency_mean_s"])
        plan = per["arms"].get("goodput", {}).get("plan")
        parts.append(f"{rate}/s best={best[0]} " + " ".join(
            f"{a}={v['latency_mean_s']}s" for a, v in sorted(per["arms"].items()))
            + (f" goodput mean_k={plan['mean_k']} no_spec={plan['no_spec_share']} mape={plan['mape']}"
               if plan else ""))
    sys.stderr.write("goodput (mean latency; shared machine, not publishable): " + "; ".join(parts) + "\n")
    return 0
