"""``specserve bench trees``: τ and speed of a drafter's chains vs trees at equal node budgets.

For the ``--drafter`` (``recycling``, ``medusa`` or ``hydra``; heads: ``--heads``, default the
demo model's, whose number caps a chain's length and a tree's depth, not its nodes), each node
budget ``k`` (``--budgets``), draft shape (``--shapes``: ``chain``, ``static``, ``dynamic``; the
engine setting ``tree``) and engine speculation policy (``--policies``: ``fixed``, or ``goodput``
where the per-step controller spends the budget), an in-process engine (demo model by default,
fp32) runs the same held-out prompts as ``bench drafters``, ``--max-tokens`` new tokens, at each
batch size and each of ``--temperatures`` (greedy by default; seeded sampling otherwise). A chain
drafts up to ``k`` tokens, a tree up to ``k`` nodes, so every shape verifies at most ``1 + k``
rows per request and step. The arms (no speculation, then every shape, budget and policy) run in
an order shuffled with ``--seed``, each with the same warm-up. Reports per arm, batch and
temperature: τ (mean tokens per verification step), acceptance per depth, tokens/s and its ratio
to no speculation and to the fastest chain arm, the share of looping outputs, the tree counters
(tree verifications, accepted side branches) and, greedy, whether the outputs equal the
no-speculation run's token for token.
JSON on stdout, one summary line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from specserve.bench.drafters import _counters, _prompts, per_position_rates, tau
from specserve.bench.stats import is_looping
from specserve.engine.local import model_runner

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
    parser.add_argument("--temperatures", default="0", help="sampling temperatures (comma-separated, e.g. 0,0.7)")
    parser.add_argument("--seed", type=int, default=0, help="arm order and sampling seeds")
    parser.add_argument("--policies", default="fixed",
                        help="engine speculation policies per shape (comma-separated: fixed, goodput); "
                             "goodput = the per-step controller spends the budget")


def _tree_counters(llm: Any) -> dict[str, int]:
    from specserve_vllm.compat.tree_steps import COUNTERS_ATTR

    runner = model_runner(llm)
    found = getattr(runner, COUNTERS_ATTR, None)
    return {} if found is None else dataclasses.asdict(found)


def _key(batch: int, temperature: float) -> str:
    return f"{batch}@{temperature:g}"


def _measure(llm: Any, prompts: list[list[int]], params: list[Any], bs: int, speculative: bool) -> dict[str, Any]:
    """One batch size and temperature: the prompts in batches of ``bs``, counters before and after."""
    from vllm.inputs import TokensPrompt

    before, trees_before = _counters(llm), _tree_counters(llm)
    outputs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), bs):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i : i + bs]], params[i : i + bs],
                            use_tqdm=False)
        outputs.extend(list(o.outputs[0].token_ids) for o in outs)
    elapsed = time.perf_counter() - t0
    after, trees_after = _counters(llm), _tree_counters(llm)
    steps = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
    acc = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get("vllm:spec_decode_num_accepted_tokens", 0)
    name = "vllm:spec_decode_num_accepted_tokens_per_pos"
    now, was = after.get(name, []), before.get(name, [])
    per_depth = [a - (was[i] if i < len(was) else 0.0) for i, a in enumerate(now)]
    return {
        "tau": tau(int(steps), int(acc)) if speculative else 1.0,
        "accepted_per_depth": per_position_rates(steps, per_depth),
        "tokens_per_s": round(sum(len(o) for o in outputs) / elapsed, 1),
        "looping_share": round(sum(is_looping(o) for o in outputs) / max(1, len(outputs)), 3),
        "trees": {key: _delta(trees_after[key], trees_before.get(key)) for key in trees_after},
        "outputs": outputs,
    }


def _delta(after: Any, before: Any) -> Any:
    """Counter difference (lists per depth element-wise).

    >>> _delta([3, 2], [1]), _delta(5, None)
    ([2, 2], 5)
    """
    if isinstance(after, list):
        was = list(before or [])
        return [a - (was[i] if i < len(was) else 0) for i, a in enumerate(after)]
    return after - (before or 0)


Arm = tuple[str, int, str]
"""(shape, node budget, engine speculation policy); ``("none", 0, "fixed")`` is no speculation."""


def vs_best_chain(row: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """``row``'s tokens/s over the fastest chain arm's (any budget and policy) at its batch size and
    temperature; ``None`` without chain arms.

    >>> rows = [{"shape": "chain", "batch": 1, "temperature": 0, "tokens_per_s": 400.0},
    ...         {"shape": "chain", "batch": 1, "temperature": 0, "tokens_per_s": 500.0},
    ...         {"shape": "dynamic", "batch": 1, "temperature": 0, "tokens_per_s": 450.0}]
    >>> vs_best_chain(rows[2], rows)
    0.9
    """
    chains = [r["tokens_per_s"] for r in rows if r["shape"] == "chain" and r["batch"] == row["batch"]
              and r["temperature"] == row["temperature"]]
    return round(row["tokens_per_s"] / max(chains), 3) if chains else None


def chain_length(budget: int, heads: str | None) -> int:
    """A chain's draft length at a node budget: the budget, or the number of heads when the
    drafter's heads (checkpoint ``heads``) are fewer (a head drafts one chain token; a tree may
    hold more nodes than there are heads)."""
    if heads is None:
        return budget
    from specserve_vllm.heads.config import read_config

    return min(budget, int(read_config(heads).num_heads))


def _run_one(model_dir: Path, drafter: str, heads: str | None, arm: Arm,
             prompts: list[list[int]], max_tokens: int, batch_sizes: list[int], dtype: str,
             temperatures: list[float], seed: int) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.speculative_config import speculative_config

    shape, budget, policy = arm
    k = chain_length(budget, heads) if shape == "chain" else budget
    spec = None if shape == "none" else speculative_config(drafter, k)  # type: ignore[arg-type]
    with settings.override(tree="chain" if shape == "none" else shape, heads_dir=heads):
        llm = local_llm(model_dir, max_num_seqs=8, kv_cache_memory_bytes=256 << 20, dtype=dtype,
                        speculative_config=spec, disable_log_stats=False,
                        additional_config={"specserve": {"spec_policy": policy}})
    result: dict[str, Any] = {}
    try:
        warm = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], warm, use_tqdm=False)  # warm-up
        for temp in temperatures:
            params = [SamplingParams(temperature=temp, max_tokens=max_tokens, ignore_eos=True,
                                     seed=None if temp == 0 else seed * 1000 + i) for i in range(len(prompts))]
            for bs in batch_sizes:
                result[_key(bs, temp)] = _measure(llm, prompts, params, bs, spec is not None)
                logger.info("bench trees", extra={"fields": {"shape": shape, "budget": budget, "policy": policy,
                                                             "batch": bs,
                                                             "temperature": temp,
                                                             "tau": result[_key(bs, temp)]["tau"]}})
    finally:
        del llm
        gc.collect()
    return result


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # tree counters read from the runner
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
    temperatures = [float(t) for t in str(args.temperatures).split(",") if t.strip()]
    policies = [p.strip() for p in str(args.policies).split(",") if p.strip()]
    none: Arm = ("none", 0, "fixed")
    arms = [none] + [(shape, budget, policy) for budget in budgets for shape in shapes for policy in policies]
    random.Random(args.seed).shuffle(arms)
    got = {arm: _run_one(model_dir, args.drafter, heads, arm, prompts, args.max_tokens, batch_sizes,
                         args.dtype, temperatures, args.seed) for arm in arms}
    base = got[none]
    ordered = [(shape, budget, policy) for budget in budgets for shape in shapes for policy in policies]
    rows = []
    for shape, budget, policy in ordered:
        for temp in temperatures:
            for bs in batch_sizes:
                r, b = got[(shape, budget, policy)][_key(bs, temp)], base[_key(bs, temp)]
                rows.append({"shape": shape, "budget": budget, "policy": policy, "batch": bs, "temperature": temp,
                             "tau": r["tau"], "accepted_per_depth": r["accepted_per_depth"],
                             "tokens_per_s": r["tokens_per_s"],
                             "vs_none": round(r["tokens_per_s"] / b["tokens_per_s"], 3),
                             "looping_share": r["looping_share"], "trees": r["trees"],
                             "equal_to_none": r["outputs"] == b["outputs"] if temp == 0 else None})
    for row in rows:
        row["vs_best_chain"] = vs_best_chain(row, rows)
    report = {"model": str(model_dir), "drafter": args.drafter, "dtype": args.dtype, "prompts": len(prompts),
              "max_tokens": args.max_tokens, "arm_order": [f"{shape}@{budget}/{policy}" for shape, budget, policy in arms],
              "none_tokens_per_s": {key: base[key]["tokens_per_s"] for key in base},
              "none_looping_share": {key: base[key]["looping_share"] for key in base}, "rows": rows}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"{r['shape']}@{r['budget']}/{r['policy']}/bs{r['batch']}/t{r['temperature']:g}: tau={r['tau']} "
             f"x{r['vs_none']} none, x{r['vs_best_chain']} best chain"
             f"{' DIFFERS' if r['equal_to_none'] is False else ''}" for r in rows]
    sys.stderr.write("; ".join(parts) + "\n")
    return 0
