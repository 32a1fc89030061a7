"""``specserve bench chain-verify``: chains verified by the walk vs by vLLM's rejection sampler.

For the ``--drafter`` drafting chains of ``--k`` under the engine policy ``--policy``, three
in-process engines (demo model by default) run held-out prompts (every repetition, temperature
and batch size its own ``--prompts``, so Token Recycling never drafts a prompt it served): no
speculation, chains verified by walking the target's tokens (the engine setting ``chain_verify``
``walk``, the default) and by vLLM's rejection sampler (``rejection``). Each of ``--reps``
repetitions runs, at each temperature and batch size, every arm on each batch of prompts in
turn, in an order shuffled per batch. Reports per arm, batch and temperature: τ, tokens/s per
repetition, ratios paired by repetition (walk over rejection, each over no speculation, and walk
over rejection in verification steps a second, tokens/s over τ: at temperature > 0 the arms
draw different random streams, so τ differs between them by chance), the
steps each engine walked, the share of looping outputs and, greedy, whether every repetition's
outputs equal the no-speculation run's of the same prompts. JSON on stdout, one summary line on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

from specserve.bench.stats import paired

logger = logging.getLogger(__name__)

ARMS = ("none", "walk", "rejection")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafter", default="recycling", choices=("recycling", "medusa", "hydra"))
    parser.add_argument("--heads", default=None, help="head checkpoint for medusa/hydra (default: the demo model's)")
    parser.add_argument("--k", type=int, default=4, help="chain length")
    parser.add_argument("--policy", default="fixed", help="engine speculation policy (fixed, goodput)")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts per repetition, temperature and batch size (each run its own)")
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperatures", default="0,0.7", help="sampling temperatures (comma-separated)")
    parser.add_argument("--seed", type=int, default=0, help="arm order and sampling seeds")
    parser.add_argument("--reps", type=int, default=3)


def _engine(args: argparse.Namespace, model_dir: Path, heads: str | None, arm: str, prompt: list[int]) -> Any:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.speculative_config import speculative_config

    spec = None if arm == "none" else speculative_config(args.drafter, args.k)
    extra = {} if arm == "none" else {"spec_policy": args.policy, "chain_verify": arm}
    with settings.override(heads_dir=heads):
        llm = local_llm(model_dir, max_num_seqs=8, kv_cache_memory_bytes=256 << 20, dtype=args.dtype,
                        speculative_config=spec, per_request_spec_decode_metrics="detailed" if spec else "none",
                        additional_config={"specserve": extra})
    llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                 SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True), use_tqdm=False)
    return llm


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # counters read from the runner
    from specserve.bench.drafters import tau
    from specserve.bench.trees import _key, heads_for, run_prompts, sweep
    from specserve.demo import demo_model_dir

    model_dir = args.model or demo_model_dir()
    heads = heads_for(args.drafter, args.heads)
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    temperatures = [float(t) for t in str(args.temperatures).split(",") if t.strip()]
    cells, warm_prompt = run_prompts(model_dir, args.prompts, args.prompt_tokens, args.reps, temperatures,
                                     batch_sizes)
    build = list(ARMS)
    random.Random(args.seed).shuffle(build)
    engines = {arm: _engine(args, model_dir, heads, arm, warm_prompt) for arm in build}
    gc.collect()
    gc.freeze()  # the idle engines' objects stay out of the collector's walks during measured arms
    got: dict[str, dict[str, list[dict[str, Any]]]] = {arm: {} for arm in ARMS}
    for rep, temp, bs, (arm,), m in sweep({(arm,): engines[arm] for arm in ARMS}, cells, seed=args.seed,
                                          max_tokens=args.max_tokens):
        m["walked_steps"] = m["trees"].get("walked_chains", 0)  # the runner's counters, before and after
        got[arm].setdefault(_key(bs, temp), []).append(m)
        logger.info("bench chain-verify", extra={"fields": {
            "arm": arm, "rep": rep, "batch": bs, "temperature": temp,
            "tokens_per_s": m["tokens_per_s"], "walked_steps": m["walked_steps"]}})
    rows = []
    for temp in temperatures:
        for bs in batch_sizes:
            key = _key(bs, temp)
            speed = {arm: [r["tokens_per_s"] for r in got[arm][key]] for arm in ARMS}
            row: dict[str, Any] = {"batch": bs, "temperature": temp, "tokens_per_s": speed,
                                   "walk_vs_rejection": paired(speed["walk"], speed["rejection"]),
                                   "walk_vs_none": paired(speed["walk"], speed["none"]),
                                   "rejection_vs_none": paired(speed["rejection"], speed["none"]),
                                   # tokens/s over τ: verification steps a second, what the verifier's
                                   # cost changes (at temperature > 0 the arms' random streams differ,
                                   # and with them which outputs loop and τ)
                                   "walk_vs_rejection_per_step": paired(
                                       [r["tokens_per_s"] / r["tau"] for r in got["walk"][key]],
                                       [r["tokens_per_s"] / r["tau"] for r in got["rejection"][key]]),
                                   "looping_share": got["none"][key][0]["looping_share"]}
            for arm in ("walk", "rejection"):
                runs = got[arm][key]
                steps, accepted = sum(r["steps"] for r in runs), sum(r["accepted"] for r in runs)
                row[f"tau_{arm}"] = tau(steps, accepted)
                row[f"walked_steps_{arm}"] = sum(r["walked_steps"] for r in runs)
                row[f"equal_to_none_{arm}"] = (all(r["outputs"] == n["outputs"]
                                                   for r, n in zip(runs, got["none"][key], strict=True))
                                               if temp == 0 else None)
            rows.append(row)
    report = {"model": str(model_dir), "drafter": args.drafter, "k": args.k, "policy": args.policy,
              "dtype": args.dtype, "prompts": args.prompts,
              "distinct_prompts": sum(map(len, cells.values())), "max_tokens": args.max_tokens, "reps": args.reps,
              "build_order": build, "rows": rows}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    sys.stderr.write("; ".join(
        f"bs{r['batch']}/t{r['temperature']:g}: walk x{(r['walk_vs_rejection'] or {}).get('median')} rejection "
        f"(x{(r['walk_vs_rejection_per_step'] or {}).get('median')} per step), "
        f"x{(r['walk_vs_none'] or {}).get('median')} none (rejection x{(r['rejection_vs_none'] or {}).get('median')})"
        f"{'' if r['equal_to_none_walk'] is not False and r['equal_to_none_rejection'] is not False else ' DIFFERS'}"
        for r in rows) + "\n")
    return 0
