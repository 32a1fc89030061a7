"""``specserve bench spec-off``: the cost of a drafter whose requests all run at k = 0.

A speculative engine whose every request sets ``spec_k = 0`` should run as fast as an engine
without a drafter (its steps take vLLM's non-speculative path: no drafting, no rejection
sampler). This benchmark keeps one in-process engine per arm alive — ``none`` and, for each
drafter, that drafter with every request at ``spec_k = 0`` — and interleaves them finely: each
batch of prompts (the demo model's held-out stdlib files, greedy, ``--max-tokens`` new tokens)
is run by every arm back to back, in a new random order, so the arms share the machine's load
of that moment. On a machine shared with other work, absolute tokens/s drift; the paired ratio
arm / ``none`` within one repetition is the figure to read (median and range over repetitions).
Tokens per second of this process's CPU time are reported too: less sensitive to other work,
though not immune (caches, memory bandwidth). Engines run in this process unless
``VLLM_ENABLE_V1_MULTIPROCESSING=1`` is set (then each arm has its own engine-core and worker
processes, as a served engine does).

JSON on stdout; one summary line on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from specserve.bench.stats import paired

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafters", default="recycling,hydra", help="drafters run with every request at k=0")
    parser.add_argument("--k", type=int, default=4, help="the drafters' engine-wide k")
    parser.add_argument("--medusa-heads", default=None, help="Medusa head checkpoint (default: the demo model's)")
    parser.add_argument("--hydra-heads", default=None, help="Hydra head checkpoint (default: the demo model's)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every arm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arm order")


def paired_ratios(runs: list[dict[str, float]], arm: str, base: str = "none") -> dict[str, float]:
    """Median, min and max over repetitions of ``run[arm] / run[base]``.

    >>> paired_ratios([{"none": 100.0, "a": 95.0}, {"none": 80.0, "a": 80.0}], "a")
    {'median': 0.975, 'min': 0.95, 'max': 1.0}
    """
    ratios = paired([r[arm] for r in runs], [r.get(base, 0.0) for r in runs])
    assert ratios is not None, f"no repetition has a {base} run"
    return ratios


def _timed(llm: Any, batch: list[list[int]], params: Any) -> tuple[float, float, list[list[int]]]:
    """``(wall s, process CPU s, outputs)`` of one ``generate`` over ``batch``."""
    from vllm.inputs import TokensPrompt

    w0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
    return time.perf_counter() - w0, time.process_time() - c0, [list(o.outputs[0].token_ids) for o in outs]


def run(args: argparse.Namespace) -> int:
    from vllm import SamplingParams

    from specserve.bench.drafters import _heads, held_out_prompts
    from specserve.demo import demo_model_dir
    from specserve.engine import settings
    from specserve.speculative_config import HEAD_DRAFTERS, speculative_config
    from specserve.engine.local import local_llm

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # In-process engines: with one engine-core and one worker process per arm, every arm's worker
    # is bound to the same core and the idle arms' processes share it with the running one.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = args.model or demo_model_dir()
    prompts = held_out_prompts(model_dir, args.prompts, args.prompt_tokens)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    drafters = [d.strip() for d in args.drafters.split(",") if d.strip() and d.strip() != "none"]
    args.vllm_medusa_heads = None
    heads = _heads(args, drafters, is_demo=args.model is None) if any(d in HEAD_DRAFTERS for d in drafters) else {}
    arms = ["none"] + [f"{d}@k0" for d in drafters]
    engines: dict[str, Any] = {}
    plain = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    off = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, extra_args={"spec_k": 0})
    params = {arm: plain if arm == "none" else off for arm in arms}
    for arm, drafter in zip(arms, ["none", *drafters]):
        heads_dir = heads.get(drafter) or settings.current().heads_dir
        with settings.override(heads_dir=heads_dir):  # the proposer reads it as the engine builds it
            engines[arm] = local_llm(model_dir, max_num_seqs=max(batch_sizes), kv_cache_memory_bytes=256 << 20,
                                     speculative_config=speculative_config(drafter, args.k))  # type: ignore[arg-type]
        _timed(engines[arm], prompts[:1], params[arm])  # warm-up
    rng = random.Random(args.seed)
    wall: dict[int, list[dict[str, float]]] = {bs: [] for bs in batch_sizes}
    cpu: dict[int, list[dict[str, float]]] = {bs: [] for bs in batch_sizes}
    outputs: dict[str, list[list[int]]] = {}
    try:
        for rep in range(args.reps):
            for bs in batch_sizes:
                tokens = {arm: 0 for arm in arms}
                w = {arm: 0.0 for arm in arms}
                c = {arm: 0.0 for arm in arms}
                for i in range(0, len(prompts), bs):
                    # Every arm runs this batch back to back, in a new random order: paired in time.
                    order = arms[:]
                    rng.shuffle(order)
                    for arm in order:
                        dw, dc, outs = _timed(engines[arm], prompts[i : i + bs], params[arm])
                        tokens[arm] += sum(len(o) for o in outs)
                        w[arm] += dw
                        c[arm] += dc
                        if rep == 0:
                            outputs.setdefault(f"{arm}@bs{bs}", []).extend(outs)
                wall[bs].append({arm: tokens[arm] / w[arm] for arm in arms})
                cpu[bs].append({arm: tokens[arm] / c[arm] for arm in arms if c[arm] > 0})
                logger.info("bench spec-off", extra={"fields": {"rep": rep, "batch": bs, **{
                    arm: round(v, 1) for arm, v in wall[bs][-1].items()}}})
    finally:
        engines.clear()
        gc.collect()
    report: dict[str, Any] = {
        "model": str(model_dir), "k": args.k, "prompts": len(prompts), "max_tokens": args.max_tokens,
        "reps": args.reps, "shared_machine": True, "batches": {},
    }
    for bs in batch_sizes:
        report["batches"][str(bs)] = {
            "tokens_per_s": {arm: [round(r[arm], 1) for r in wall[bs]] for arm in arms},
            "ratio_vs_none": {arm: paired_ratios(wall[bs], arm) for arm in arms if arm != "none"},
            "tokens_per_cpu_s": {arm: [round(r.get(arm, 0.0), 1) for r in cpu[bs]] for arm in arms},
            "cpu_ratio_vs_none": {arm: paired_ratios(cpu[bs], arm) for arm in arms if arm != "none"},
            "identical_to_none": {arm: outputs[f"{arm}@bs{bs}"] == outputs[f"none@bs{bs}"]
                                  for arm in arms if arm != "none"},
        }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"{arm}@bs{bs}: x{v['median']} [{v['min']}, {v['max']}] (cpu x{per['cpu_ratio_vs_none'][arm]['median']})"
             for bs, per in report["batches"].items() for arm, v in per["ratio_vs_none"].items()]
    sys.stderr.write("spec-off vs none, tokens/s (median [min, max] of paired ratios): " + "; ".join(parts) + "\n")
    return 0
