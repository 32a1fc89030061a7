"""``specserve bench trees``: τ and speed of a drafter's chains vs trees at equal node budgets.

For the ``--drafter`` (``recycling``, ``medusa`` or ``hydra``; heads: ``--heads``, default the
demo model's, whose number caps a chain's length and a tree's depth, not its nodes), each node
budget ``k`` (``--budgets``), draft shape (``--shapes``: ``chain``, ``static``, ``dynamic``; the
engine setting ``tree``) and engine speculation policy (``--policies``: ``fixed``, or ``goodput``
where the per-step controller spends the budget), an in-process engine (demo model by default,
fp32) runs held-out prompts (``--prompts`` of them per run; every repetition, temperature and
batch size gets its own, so Token Recycling never drafts a prompt from its own earlier output),
``--max-tokens`` new tokens, at each batch size and each of ``--temperatures`` (greedy by
default; seeded sampling otherwise). A chain
drafts up to ``k`` tokens, a tree up to ``k`` nodes, so every shape verifies at most ``1 + k``
rows per request and step. Every arm's engine is built first (in an order shuffled with
``--seed``, each warmed up the same way) and kept; then each of ``--reps`` repetitions runs, at
each temperature and batch size, every arm on each batch of prompts in turn, in an order
shuffled per batch (a slow spell of a shared machine falls on every arm alike). Reports per arm, batch and temperature: τ (mean
tokens per verification step, from the requests' own speculative metrics) and acceptance per
depth over all repetitions, tokens/s per repetition and its median, ratios to no speculation and
to the chain arm with the highest median paired by repetition (median, min, max), the share of looping outputs,
the tree counters (tree verifications, accepted side branches), the share of steps each
repetition ran without speculation (which τ leaves out) and, greedy, whether every
repetition's outputs equal the no-speculation run's of the same prompts token for token.
JSON on stdout, one summary line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from specserve.bench.drafters import held_out_prompts, per_position_rates, tau
from specserve.bench.stats import is_looping, paired
from specserve.engine.local import model_runner

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafter", default="recycling", choices=("recycling", "medusa", "hydra"))
    parser.add_argument("--heads", default=None, help="head checkpoint for medusa/hydra (default: the demo model's)")
    parser.add_argument("--shapes", default="chain,static,dynamic", help="draft shapes (comma-separated)")
    parser.add_argument("--budgets", default="4,8,16", help="nodes per request and step (comma-separated)")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts per repetition, temperature and batch size (each run its own)")
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="8")
    parser.add_argument("--dtype", default="float32", help="model dtype (trees are tested in float32)")
    parser.add_argument("--temperatures", default="0", help="sampling temperatures (comma-separated, e.g. 0,0.7)")
    parser.add_argument("--seed", type=int, default=0, help="arm order and sampling seeds")
    parser.add_argument("--reps", type=int, default=1,
                        help="repetitions; every arm runs once per repetition, in an order shuffled per repetition")
    parser.add_argument("--policies", default="fixed",
                        help="engine speculation policies per shape (comma-separated: fixed, goodput); "
                             "goodput = the per-step controller spends the budget")


def tree_counters(llm: Any) -> dict[str, int]:
    """The in-process engine's tree counters (``TreeCounters`` as a dict; empty before its first step)."""
    from specserve_vllm.compat.tree_steps import COUNTERS_ATTR

    runner = model_runner(llm)
    found = getattr(runner, COUNTERS_ATTR, None)
    return {} if found is None else dataclasses.asdict(found)


def _plan_steps(llm: Any) -> tuple[int, int]:
    """``(steps, steps without speculation)`` the engine's step planner has counted so far."""
    from specserve_vllm.compat.spec_length import PLANNER_ATTR

    planner = getattr(model_runner(llm), PLANNER_ATTR, None)
    snap = planner.snapshot() if planner is not None else {}
    return int(snap.get("steps", 0)), int(snap.get("no_spec_steps", 0))


def no_spec_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of planned steps that ran without speculation between two planner counts
    (``(steps, no_spec_steps)``); None when no step was planned. τ counts verification steps
    only, so this is what it leaves out.

    >>> no_spec_share((10, 2), (30, 7)), no_spec_share((5, 0), (5, 0))
    (0.25, None)
    """
    steps = after[0] - before[0]
    return round((after[1] - before[1]) / steps, 4) if steps > 0 else None


def _key(batch: int, temperature: float) -> str:
    return f"{batch}@{temperature:g}"


def spec_totals(metrics: list[dict[str, Any]]) -> tuple[int, int, list[int]]:
    """``(verification steps, accepted drafts, steps accepting a draft at depth d)`` summed over
    requests' per-request speculative metrics (``detailed`` level).

    >>> spec_totals([{"per_step_accepted": [2, 0, 1]}, {"per_step_accepted": [3]}, {}])
    (4, 6, [3, 2, 1])
    """
    steps, accepted, depth = 0, 0, []
    for m in metrics:
        for a in m.get("per_step_accepted") or []:
            steps, accepted = steps + 1, accepted + int(a)
            depth += [0] * (int(a) - len(depth))
            for d in range(int(a)):
                depth[d] += 1
    return steps, accepted, depth


def _measure(engines: dict[Arm, Any], prompts: list[list[int]], params: list[Any], bs: int,
             rng: random.Random) -> dict[Arm, dict[str, Any]]:
    """One batch size and temperature for every arm: the prompts in batches of ``bs``, the arms
    taking turns on each batch in an order shuffled per batch, so a slow spell of a shared
    machine falls on every arm alike. Per arm: τ from the requests' own speculative metrics,
    tokens/s over its own time, tree and planner counters before and after."""
    from vllm.inputs import TokensPrompt

    arms = list(engines)
    before = {arm: (tree_counters(llm), _plan_steps(llm)) for arm, llm in engines.items()}
    elapsed = dict.fromkeys(arms, 0.0)
    outputs: dict[Arm, list[list[int]]] = {arm: [] for arm in arms}
    metrics: dict[Arm, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for i in range(0, len(prompts), bs):
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts[i : i + bs]]
        order = arms[:]
        rng.shuffle(order)
        for arm in order:
            t0 = time.perf_counter()
            outs = engines[arm].generate(batch, params[i : i + bs], use_tqdm=False)
            elapsed[arm] += time.perf_counter() - t0
            outputs[arm].extend(list(o.outputs[0].token_ids) for o in outs)
            metrics[arm].extend(o.outputs[0].spec_decode_metrics.to_dict() for o in outs
                                if getattr(o.outputs[0], "spec_decode_metrics", None) is not None)
    out = {}
    for arm, llm in engines.items():
        trees_after, plan_after = tree_counters(llm), _plan_steps(llm)
        trees_before, plan_before = before[arm]
        steps, acc, per_depth = spec_totals(metrics[arm])
        out[arm] = {
            "steps": steps, "accepted": acc, "accepted_at_depth": per_depth,
            "tau": tau(steps, acc) if arm[0] != "none" else 1.0,
            "tokens_per_s": round(sum(len(o) for o in outputs[arm]) / elapsed[arm], 1),
            "looping_share": round(sum(is_looping(o) for o in outputs[arm]) / max(1, len(outputs[arm])), 3),
            "trees": {key: _delta(trees_after[key], trees_before.get(key)) for key in trees_after},
            "no_spec_share": no_spec_share(plan_before, plan_after),
            "outputs": outputs[arm],
        }
    return out


def prompt_cells(pool: Sequence[list[int]], per_cell: int, reps: int, temperatures: Sequence[float],
                 batch_sizes: Sequence[int]) -> dict[tuple[int, float, int], list[list[int]]]:
    """Each repetition, temperature and batch size gets its own ``per_cell`` prompts of ``pool``,
    in sweep order, so no engine serves a prompt twice (Token Recycling learns from what it
    serves: a repeated greedy prompt would be drafted from its own earlier output).

    >>> cells = prompt_cells([[1], [2], [3], [4], [5]], 2, 2, [0.0], [1])
    >>> cells[(0, 0.0, 1)], cells[(1, 0.0, 1)]
    ([[1], [2]], [[3], [4]])
    """
    keys = [(rep, temp, bs) for rep in range(reps) for temp in temperatures for bs in batch_sizes]
    if len(pool) < len(keys) * per_cell:
        raise ValueError(f"{len(keys)} runs of {per_cell} prompts need {len(keys) * per_cell} distinct prompts; "
                         f"the held-out files give {len(pool)} (lower --prompts, --reps or --prompt-tokens)")
    return {key: list(pool[i * per_cell : (i + 1) * per_cell]) for i, key in enumerate(keys)}


def run_prompts(model_dir: Path, per_run: int, n_tokens: int, reps: int, temperatures: Sequence[float],
                batch_sizes: Sequence[int]) -> tuple[dict[tuple[int, float, int], list[list[int]]], list[int]]:
    """:func:`prompt_cells` over the held-out files' windows, and one more window for the
    engines' warm-up, which no measured run serves."""
    n_runs = reps * len(temperatures) * len(batch_sizes)
    pool = held_out_prompts(model_dir, n_runs * per_run + 1, n_tokens, windows_per_file=16)
    return prompt_cells(pool[:-1], per_run, reps, temperatures, batch_sizes), pool[-1]


def sweep(engines: dict[Any, Any], cells: dict[tuple[int, float, int], list[list[int]]], *, seed: int,
          max_tokens: int) -> Iterator[tuple[int, float, int, Any, dict[str, Any]]]:
    """Every repetition, temperature and batch size of ``cells`` (see :func:`prompt_cells`) in
    turn, every arm measured by :func:`_measure` on that cell's prompts (seeded sampling at
    temperature > 0, request ``i`` with seed ``seed * 1000 + i``); yields ``(rep, temperature,
    batch size, arm, measurement)``."""
    from vllm import SamplingParams

    for n, ((rep, temp, bs), prompts) in enumerate(cells.items()):
        rng = random.Random(seed * 1000 + n)
        params = [SamplingParams(temperature=temp, max_tokens=max_tokens, ignore_eos=True,
                                 seed=None if temp == 0 else seed * 1000 + i) for i in range(len(prompts))]
        for arm, m in _measure(engines, prompts, params, bs, rng).items():
            yield rep, temp, bs, arm, m


def heads_for(drafter: str, heads: str | None) -> str | None:
    """The head checkpoint a benchmark's drafter uses: ``heads``, or the demo model's for Medusa
    and Hydra (Token Recycling has none)."""
    if drafter == "recycling" or heads is not None:
        return heads
    from specserve.head_training import demo_heads_dir

    return str(demo_heads_dir(drafter))


def summed(counters: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters added key by key (lists per depth element-wise).

    >>> summed([{"steps": 2, "depth": [3, 1]}, {"steps": 1, "depth": [1, 1, 1]}])
    {'steps': 3, 'depth': [4, 2, 1]}
    """
    out: dict[str, Any] = {}
    for counter in counters:
        for key, value in counter.items():
            if isinstance(value, list):
                was = list(out.get(key) or [])
                out[key] = [v + (was[i] if i < len(was) else 0) for i, v in enumerate(value)] + was[len(value):]
            else:
                out[key] = out.get(key, 0) + value
    return out


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


def chain_length(budget: int, heads: str | None) -> int:
    """A chain's draft length at a node budget: the budget, or the number of heads when the
    drafter's heads (checkpoint ``heads``) are fewer (a head drafts one chain token; a tree may
    hold more nodes than there are heads)."""
    if heads is None:
        return budget
    from specserve_vllm.heads.config import read_config

    return min(budget, int(read_config(heads).num_heads))


def _engine(model_dir: Path, drafter: str, heads: str | None, arm: Arm, prompt: list[int], max_tokens: int,
            dtype: str) -> Any:
    """An in-process engine for ``arm``, warmed up on one prompt."""
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
                        speculative_config=spec, per_request_spec_decode_metrics="detailed" if spec else "none",
                        additional_config={"specserve": {"spec_policy": policy}})
    warm = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], warm, use_tqdm=False)
    return llm


def _summary(arm: Arm, runs: list[dict[str, Any]], none: list[dict[str, Any]],
             chains: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One arm at one batch size and temperature over repetitions: τ and per-depth acceptance
    from all its steps, tokens/s per repetition, and ratios paired by repetition to no
    speculation and to the chain arm with the highest median tokens/s."""
    steps, accepted = sum(r["steps"] for r in runs), sum(r["accepted"] for r in runs)
    depth = [sum(r["accepted_at_depth"][d] if d < len(r["accepted_at_depth"]) else 0 for r in runs)
             for d in range(max((len(r["accepted_at_depth"]) for r in runs), default=0))]
    speeds = [r["tokens_per_s"] for r in runs]
    # The fastest chain arm by median (one arm, so the ratio is not biased up by taking each
    # repetition's maximum of noisy arms).
    best = max(chains, key=lambda c: statistics.median(r["tokens_per_s"] for r in c)) if chains else []
    best_chain = [r["tokens_per_s"] for r in best]
    trees = summed([r["trees"] for r in runs])
    return {"shape": arm[0], "budget": arm[1], "policy": arm[2],
            "tau": tau(steps, accepted) if arm[0] != "none" else 1.0,
            "tau_runs": [r["tau"] for r in runs],  # one per repetition, each on its own prompts
            "accepted_per_depth": per_position_rates(steps, depth),
            "tokens_per_s": statistics.median(speeds), "tokens_per_s_runs": speeds,
            "vs_none": paired(speeds, [r["tokens_per_s"] for r in none]),
            "vs_best_chain": paired(speeds, best_chain),
            "looping_share": runs[0]["looping_share"], "trees": trees,
            "no_spec_share_runs": [r.get("no_spec_share") for r in runs]}


def run(args: argparse.Namespace) -> int:
    import gc
    import os

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # tree counters read from the runner
    from specserve.demo import demo_model_dir

    model_dir = args.model or demo_model_dir()
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    shapes = [s.strip() for s in str(args.shapes).split(",") if s.strip()]
    budgets = [int(b) for b in str(args.budgets).split(",") if b.strip()]
    heads = heads_for(args.drafter, args.heads)
    temperatures = [float(t) for t in str(args.temperatures).split(",") if t.strip()]
    policies = [p.strip() for p in str(args.policies).split(",") if p.strip()]
    cells, warm_prompt = run_prompts(model_dir, args.prompts, args.prompt_tokens, args.reps, temperatures,
                                     batch_sizes)
    none: Arm = ("none", 0, "fixed")
    arms = [none] + [(shape, budget, policy) for budget in budgets for shape in shapes for policy in policies]
    build = arms[:]
    random.Random(args.seed).shuffle(build)
    engines = {arm: _engine(model_dir, args.drafter, heads, arm, warm_prompt, args.max_tokens, args.dtype)
               for arm in build}
    # Every arm's engine lives in this process. Freezing what building them left keeps the cyclic
    # collector from walking the idle engines' objects during each measured arm, so an arm's speed
    # does not depend on how many other engines were built (or how many objects its steps make).
    gc.collect()
    gc.freeze()
    got: dict[Arm, dict[str, list[dict[str, Any]]]] = {arm: {} for arm in arms}
    for rep, temp, bs, arm, m in sweep({arm: engines[arm] for arm in arms}, cells, seed=args.seed,
                                       max_tokens=args.max_tokens):
        got[arm].setdefault(_key(bs, temp), []).append(m)
        logger.info("bench trees", extra={"fields": {"arm": "/".join(map(str, arm)), "rep": rep, "batch": bs,
                                                     "temperature": temp, "tau": m["tau"],
                                                     "tokens_per_s": m["tokens_per_s"]}})
    rows = []
    chain_arms = [a for a in arms if a[0] == "chain"]
    for arm in arms[1:]:
        for temp in temperatures:
            for bs in batch_sizes:
                key = _key(bs, temp)
                row = {**_summary(arm, got[arm][key], got[none][key], [got[c][key] for c in chain_arms]),
                       "batch": bs, "temperature": temp}
                # each repetition against no speculation's run of the same prompts
                row["equal_to_none"] = (all(r["outputs"] == n["outputs"] for r, n in zip(got[arm][key], got[none][key],
                                                                                        strict=True))
                                        if temp == 0 else None)
                rows.append(row)
    report = {"model": str(model_dir), "drafter": args.drafter, "dtype": args.dtype, "prompts": args.prompts,
              "distinct_prompts": sum(map(len, cells.values())),
              "max_tokens": args.max_tokens, "reps": args.reps,
              "build_order": ["/".join(map(str, a)) for a in build],
              "none_tokens_per_s": {key: [r["tokens_per_s"] for r in runs] for key, runs in got[none].items()},
              "none_looping_share": {key: runs[0]["looping_share"] for key, runs in got[none].items()}, "rows": rows}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"{r['shape']}@{r['budget']}/{r['policy']}/bs{r['batch']}/t{r['temperature']:g}: tau={r['tau']} "
             f"x{(r['vs_none'] or {}).get('median')} none, x{(r['vs_best_chain'] or {}).get('median')} best chain"
             f"{' DIFFERS' if r['equal_to_none'] is False else ''}" for r in rows]
    sys.stderr.write("; ".join(parts) + "\n")
    return 0
