"""``specserve bench trees``: τ and speed of a drafter's chains vs trees at equal node budgets.

For the ``--drafter`` (``recycling``, ``medusa`` or ``hydra``; heads: ``--heads``, default the
demo model's, whose depth caps the budget), each node budget ``k`` (``--budgets``) and draft
shape (``--shapes``: ``chain``, ``static``, ``dynamic``; the engine setting ``tree``) an
in-process engine (demo model by default, fp32)
runs the same held-out prompts as ``bench drafters``, greedy, ``--max-tokens`` new tokens, at
each batch size. A chain drafts up to ``k`` tokens, a tree up to ``k`` nodes, so every shape
verifies at most ``1 + k`` rows per request and step. Reports per shape, budget and batch: τ
(mean tokens per verification step), acceptance per depth, tokens/s, the tree counters (tree
verifications, accepted side branches) and whether the outputs equal the no-speculation run's
token for token. JSON on stdout, one summary line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from specserve.bench.drafters import _counters, _prompts, per_position_rates, tau

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafter", default="recycling", choices=("recycling", "medusa", "hydra"))
    parser.add_argument("--heads", default=None, help="head checkpoint for medusa/hydra (default: the demo model's)")
    parser.add_argument("--shapes", default="chain,static,dynamic", help="draft shapes (comma-separated)")
    parser.add_argument("--budgets", default="4,8,16", help="nodes per request and step (comma-separated)")
    parser.add_argument("--prompts", type=int, default=8, help="number of held-out prompts")
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="8")
    parser.add_argument("--dtype", default="float32", help="model dtype (trees are tested in float32)")


def _tree_counters(llm: Any) -> dict[str, int]:
    from specserve_vllm.compat.tree_steps import COUNTERS_ATTR

    runner = llm.collective_rpc(lambda worker: getattr(worker, "worker", worker).model_runner)[0]
    found = getattr(runner, COUNTERS_ATTR, None)
    return {} if found is None else dataclasses.asdict(found)


def _run_one(model_dir: Path, drafter: str, heads: str | None, shape: str, budget: int,
             prompts: list[list[int]], max_tokens: int, batch_sizes: list[int], dtype: str) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.speculative_config import speculative_config

    spec = None if shape == "none" else speculative_config(drafter, budget)  # type: ignore[arg-type]
    with settings.override(tree="chain" if shape == "none" else shape, heads_dir=heads):
        llm = local_llm(model_dir, max_num_seqs=8, kv_cache_memory_bytes=256 << 20, dtype=dtype,
                        speculative_config=spec, disable_log_stats=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    result: dict[str, Any] = {}
    try:
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
        for bs in batch_sizes:
            before, trees_before = _counters(llm), _tree_counters(llm)
            outputs: list[list[int]] = []
            t0 = time.perf_counter()
            for i in range(0, len(prompts), bs):
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i : i + bs]], params,
                                    use_tqdm=False)
                outputs.extend(list(o.outputs[0].token_ids) for o in outs)
            elapsed = time.perf_counter() - t0
            after, trees_after = _counters(llm), _tree_counters(llm)
            steps = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
            acc = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get(
                "vllm:spec_decode_num_accepted_tokens", 0)
            name = "vllm:spec_decode_num_accepted_tokens_per_pos"
            now, was = after.get(name, []), before.get(name, [])
            per_depth = [a - (was[i] if i < len(was) else 0.0) for i, a in enumerate(now)]
            result[str(bs)] = {
                "tau": tau(int(steps), int(acc)) if spec else 1.0,
                "accepted_per_depth": per_position_rates(steps, per_depth),
                "tokens_per_s": round(sum(len(o) for o in outputs) / elapsed, 1),
                "trees": {key: trees_after[key] - trees_before.get(key, 0) for key in trees_after},
                "outputs": outputs,
            }
            logger.info("bench trees", extra={"fields": {"shape": shape, "budget": budget, "batch": bs,
                                                         "tau": result[str(bs)]["tau"]}})
    finally:
        del llm
        gc.collect()
    return result


def run(args: argparse.Namespace) -> int:
    from specserve.demo import demo_model_dir

    model_dir = args.model or demo_model_dir()
    prompts = _prompts(model_dir, args.prompts, args.prompt_tokens)
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    shapes = [s.strip() for s in str(args.shapes).split(",") if s.strip()]
    budgets = [int(b) for b in str(args.budgets).split(",") if b.strip()]
    heads = args.heads
    if args.drafter != "recycling" and heads is None:
        from specserve.head_training import demo_heads_dir

        heads = str(demo_heads_dir(args.drafter))
    base = _run_one(model_dir, args.drafter, heads, "none", 0, prompts, args.max_tokens, batch_sizes, args.dtype)
    rows = []
    for budget in budgets:
        for shape in shapes:
            got = _run_one(model_dir, args.drafter, heads, shape, budget, prompts, args.max_tokens, batch_sizes,
                           args.dtype)
            for bs in batch_sizes:
                r = got[str(bs)]
                rows.append({"shape": shape, "budget": budget, "batch": bs, "tau": r["tau"],
                             "accepted_per_depth": r["accepted_per_depth"], "tokens_per_s": r["tokens_per_s"],
                             "trees": r["trees"], "equal_to_none": r["outputs"] == base[str(bs)]["outputs"]})
    report = {"model": str(model_dir), "drafter": args.drafter, "dtype": args.dtype, "prompts": len(prompts),
              "max_tokens": args.max_tokens,
              "none_tokens_per_s": {bs: base[bs]["tokens_per_s"] for bs in base}, "rows": rows}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"{r['shape']}@{r['budget']}/bs{r['batch']}: tau={r['tau']}{'' if r['equal_to_none'] else ' DIFFERS'}"
             for r in rows]
    sys.stderr.write("; ".join(parts) + "\n")
    return 0
