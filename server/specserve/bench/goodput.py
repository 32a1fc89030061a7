"""``specserve bench goodput``: the engine's goodput controller against every fixed policy.

Arms:
- ``none``: an engine without a drafter;
- ``k1`` .. ``k4`` (and ``k0``): a speculative engine with the ``fixed`` policy, every request
  sending that ``spec_k``;
- ``goodput``: a speculative engine with the engine's per-step ``goodput`` policy;
- ``goodput-pooled``: the same with one engine-wide acceptance for every request instead of one
  per sampling class (the ``sampling_classes`` setting off);
- ``goodput-every-step``: the same deciding at every step (``recheck_on`` 1: no speculating plan
  reused), which shows what reusing plans buys;
- ``goodput-no-hindsight``: the same learning only from verified drafts (the ``hindsight``
  setting off: steps without drafts teach it nothing);
- ``goodput-last-prefill``: the same pricing the next step with the last step's prefill tokens
  (engine setting ``prefill_estimate`` ``last``, the earlier behaviour) instead of the prompt
  tokens chunked prefills still have to schedule;
- ``goodput-twin``: a second engine built as ``goodput`` is, judged against it (an A/A control:
  the run's noise floor, engine instances included);
- ``goodput-NAME``: the goodput engine with engine settings given as ``--variant NAME=JSON``
  (a setting's or a calibration file's trial beside the default, judged as the variants above);
- ``goodput-tree``: the goodput controller spending a node budget (``--tree-budget``) on draft
  trees (``--tree-shape``, DySpec ``dynamic`` by default) instead of chains; judged apart, against
  the best chain arm (``none``, ``k1`` .. ``k4``, ``goodput``) at each point.

Each arm has its own in-process engine, all alive at once, with the same warm-up, so a drafter
that learns as it serves (Token Recycling's matrix) has seen the same requests in every arm: with
one engine shared by the fixed arms, a fixed arm drafted greedy text another arm had just produced
for the same prompts (docs/speculation-control.md, "One engine per arm"). Every arm gets
the same prompts, output lengths (lognormal) and seeds, and the arms run in a new random order
at every point. Prompts are windows of the held-out stdlib files, handed out in turn
(:class:`PromptFeed`), so no engine serves a prompt twice until every window has been served
(the report's ``prompts``: distinct windows, requests per arm, and how many came round again). Parts (``--parts``):
- ``open``: open-loop Poisson arrivals at each ``--rates`` value (precomputed from the seed);
- ``closed``: ``--concurrency`` clients, each sending its next request when the last finishes;
  besides the run's tokens/s, tokens/s while every client was busy (``tokens_per_s_full_load``,
  with its share of the run and a paired verdict): a short run at many clients spends a third
  of its time draining at ever fewer rows;
- ``trace``: a load step (low, high, low) on every arm, recording each step's decode batch and
  drafts per row (the goodput arm's k over time).

Each point runs ``--reps`` times (new arrival times and prompts each repetition) at each
``--temperatures`` value (``0+0.7``: a mixed workload, requests alternating between the two);
reports give mean, p50, p99 latency, TTFT, TPOT, tokens/s, and the
share of looping outputs, with 95% confidence intervals over repetitions, and per point the best
arm and whether ``goodput`` is within 3% (or the CI) of it. Each run also reports output tokens
per CPU second of this process (the engines run in it), a view blind to time the machine gave
to other work; closed-loop points judge goodput on it too (``paired_cpu_throughput``). Every arm
also reports its engine steps by the number of requests the engine held (``by_requests``: steps,
tokens per step, ms per step and tokens per ms of the whole engine step), which shows at which
batch sizes an arm gains or loses. JSON on stdout, a summary line on
stderr, SVG charts in ``--plots DIR``. Arrival-time latencies absorb every pause of the machine:
publish only runs on a quiet machine. Not covered here: the gateway level and two replicas (the
gateway's own benchmark, ``bench spec-policy``, drives HTTP).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from specserve.bench.load import (
    Finished,
    StepLog,
    arrivals,
    closed_loop,
    merge_by_requests,
    open_loop,
    output_lengths,
    phased_arrivals,
    summarise,
)
from specserve.bench.stats import best_and_verdict, mean_ci, paired_verdict
from specserve.bench.svg import line_chart
from specserve.bench.trees import tree_counters
from specserve.cli import UsageError
from specserve.engine.local import worker_runner
from specserve_vllm.spec_control.planner import CONFIG_KEY, settings_from, unknown_settings
from specserve_vllm.spec_control.step_time import STEP_TERMS

logger = logging.getLogger(__name__)

FULL = {"rates": "0.5,1,2,4,6,8", "concurrency": "1,2,4,8,16", "reps": 3, "temperatures": "0,0.7",
        "requests": 32, "parts": "open,closed,trace"}
"""What ``--full`` sets (the figures to publish)."""
METRICS = ("latency_mean_s", "latency_p50_s", "latency_p99_s", "ttft_mean_ms", "tpot_mean_ms",
           "tokens_per_s", "looping_share")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafter", default="recycling", choices=("recycling", "hydra", "medusa"))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--parts", default="open", help="open,closed,trace")
    parser.add_argument("--rates", default="0.5,1,2,4", help="open loop: Poisson arrival rates, requests/s")
    parser.add_argument("--concurrency", default="1,4,16", help="closed loop: clients")
    parser.add_argument("--trace-phases", default="0.5:20,6:20,0.5:20",
                        help="step trace: rate:seconds phases, in order")
    parser.add_argument("--requests", type=int, default=24, help="requests per point and arm")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of every point")
    parser.add_argument("--mean-output", type=int, default=48, help="mean output tokens (lognormal)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--temperatures", default="0",
                        help="e.g. 0,0.7; 0+0.7 is one point whose requests alternate between 0 and 0.7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="none,k1,k2,k3,k4,goodput")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="an extra arm goodput-NAME: the goodput engine with these engine settings added, "
                             "e.g. 'oldcal={\"calibration\": \"old.json\"}' (repeatable; list it in --arms)")
    parser.add_argument("--tree-budget", type=int, default=8, help="goodput-tree: draft nodes per request and step")
    parser.add_argument("--tree-shape", default="dynamic", choices=("static", "dynamic"),
                        help="goodput-tree: tree shape")
    parser.add_argument("--interleave", action="store_true",
                        help="closed loops of one client: the arms take turns request by request (a slow "
                             "spell of the machine falls on every arm's copy of a request alike), and the "
                             "report adds verdicts paired by request (request_paired_latency)")
    parser.add_argument("--plots", type=Path, default=None, help="write SVG charts into this folder")
    parser.add_argument("--full", action="store_true",
                        help="the published run: " + ", ".join(f"{k}={v}" for k, v in FULL.items()))


def _plan_stats(llm: Any) -> dict[str, Any]:
    """The in-process engine's planner statistics (``PlanStats.snapshot``)."""
    planner = _planner(llm)
    return planner.snapshot() if planner is not None else {}


def step_terms(planner: Any) -> dict[str, Any]:
    """The controller's step-time terms as it prices steps at the end of a repetition (ms;
    ``StepCost`` fields, level included) and its drafting factors: how the online fit moved
    between repetitions. Empty for a policy without a step model.

    >>> from types import SimpleNamespace
    >>> from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel
    >>> policy = SimpleNamespace(model_state=lambda: StepTimeModel(StepCost(5, 1, 0, 0, 2, 0, 0.5, 0.1)).state())
    >>> step_terms(SimpleNamespace(policy=policy))["step_terms"]["spec"], step_terms(None)
    (2.0, {})
    """
    state = getattr(getattr(planner, "policy", None), "model_state", None)
    if not callable(state):
        return {}
    model = state()
    return {"step_terms": {k: v for k, v in model["cost"].items() if k in STEP_TERMS},
            "draft_correction": model.get("draft_correction")}


def _planner(llm: Any) -> Any:
    """The in-process engine's planner object (``None`` without a drafter)."""
    def get(worker: Any) -> Any:
        return getattr(worker_runner(worker), "_specserve_planner", None)

    return llm.collective_rpc(get)[0]


def plan_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the controller did between two snapshots: plans, the share with no speculation, mean
    planned k per decode row, and the step-time model's MAPE over the steps it timed (and, when
    steps without drafts were scored, how many and their mean would-be acceptance).

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
    hindsight = after.get("hindsight_rows", 0) - before.get("hindsight_rows", 0)
    scored = ({"hindsight_rows": hindsight, "hindsight_mean": round(
        (after.get("hindsight_accepted", 0.0) - before.get("hindsight_accepted", 0.0)) / hindsight, 4)}
        if hindsight else {})
    return {**scored, "plans": plans,
            "no_spec_share": round((after.get("no_spec_steps", 0) - before.get("no_spec_steps", 0)) / plans, 3)
            if plans else None,
            "mean_k": round(drafts / rows, 3) if rows else None,
            "timed_steps": timed, "mape": round(errors / timed, 4) if timed else None}


def combine(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Repetitions of one point and arm: each metric's mean, and its CI half width (``<m>_ci``).

    >>> combine([{"latency_mean_s": 1.0, "tokens_per_s": 10.0}, {"latency_mean_s": 3.0, "tokens_per_s": 12.0}])
    {'reps': 2, 'latency_mean_s': 2.0, 'latency_mean_s_ci': 12.706, 'tokens_per_s': 11.0, 'tokens_per_s_ci': 12.706}
    """
    out: dict[str, Any] = {"reps": len(runs)}
    for key in runs[0]:
        if isinstance(runs[0][key], (int, float)) and all(isinstance(r.get(key), (int, float)) for r in runs):
            mean, ci = mean_ci([float(r[key]) for r in runs])
            out[key], out[f"{key}_ci"] = round(mean, 4), round(ci, 4)
    return out


def request_paired(latencies: dict[str, list[float]]) -> dict[str, Any]:
    """Verdicts from per-request latencies (``latencies[arm][j]``: request ``j`` of the point,
    every arm serving the same requests with the same output lengths), paired by request:
    ``goodput`` against the best judged arm and, with a tree arm, the tree arm against the best
    chain arm (see :func:`paired_verdict`; the slowdown is the geometric mean over requests).

    >>> out = request_paired({"none": [1.0, 2.0, 1.5], "k2": [0.8, 1.6, 1.2], "goodput": [0.81, 1.62, 1.21]})
    >>> out["request_paired_latency"]["best"], out["request_paired_latency"]["verdict"]
    ('k2', 'within')
    """
    out: dict[str, Any] = {"request_paired_latency": paired_verdict(judged_arms(latencies), "goodput")}
    tree = tree_judged_arms(latencies)
    if tree:
        out["tree_request_paired_latency"] = paired_verdict(tree, TREE_ARM)
    variants = {arm: paired_ratio(latencies["goodput"], v) for arm, v in latencies.items()
                if goodput_arm(arm) and arm not in ("goodput", TREE_ARM) and "goodput" in latencies}
    if variants:
        out["variants_request_paired_latency"] = variants
    return out


def paired_ratio(values: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """The geometric mean of ``values[j] / other[j]`` with its 95% interval (how a goodput
    variant compares with the default controller, request by request; below 1: the default is
    faster).

    >>> paired_ratio([1.0, 2.0, 4.0], [2.0, 4.0, 8.0])
    {'ratio': 0.5, 'low': 0.5, 'high': 0.5}
    """
    n = min(len(values), len(other))
    mean, ci = mean_ci([math.log(max(a, 1e-12) / max(b, 1e-12)) for a, b in zip(values[:n], other[:n])])
    return {"ratio": round(math.exp(mean), 4), "low": round(math.exp(mean - ci), 4),
            "high": round(math.exp(mean + ci), 4)}


def twin_ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The twin arm's throughput over ``goodput``'s, paired by repetition (geometric mean and 95%
    interval; 1 is what identical engines should give). Empty without the twin arm.

    >>> twin_ratios({"goodput": [{"tokens_per_s": 100.0}], TWIN_ARM: [{"tokens_per_s": 90.0}]})
    {'twin_throughput': {'ratio': 0.9, 'low': 0.9, 'high': 0.9}}
    """
    if TWIN_ARM not in runs or "goodput" not in runs:
        return {}
    out = {"twin_throughput": paired_ratio([x["tokens_per_s"] for x in runs[TWIN_ARM]],
                                           [x["tokens_per_s"] for x in runs["goodput"]])}
    if all("tokens_per_s_full_load" in x for x in runs[TWIN_ARM] + runs["goodput"]):
        out["twin_full_load_throughput"] = paired_ratio([x["tokens_per_s_full_load"] for x in runs[TWIN_ARM]],
                                                        [x["tokens_per_s_full_load"] for x in runs["goodput"]])
    return out


def full_load_verdict(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Closed loop: ``goodput``'s throughput while every client was busy, paired by repetition
    against the best arm's (the span's throughput also counts the drain, when ever fewer rows
    run; at 16 clients and 48 requests that is about 40% of the run). Empty for open loops.

    >>> runs = {"k2": [{"tokens_per_s_full_load": 100.0}, {"tokens_per_s_full_load": 90.0}],
    ...         "goodput": [{"tokens_per_s_full_load": 99.0}, {"tokens_per_s_full_load": 90.0}]}
    >>> full_load_verdict(runs)["paired_full_load_throughput"]["best"], full_load_verdict({"k2": [{}]})
    ('k2', {})
    """
    if not all(r and all("tokens_per_s_full_load" in x for x in r) for r in runs.values()):
        return {}
    verdict = paired_verdict({a: [x["tokens_per_s_full_load"] for x in r] for a, r in runs.items()}, "goodput",
                             lower_is_better=False)
    return {"paired_full_load_throughput": verdict} if verdict else {}


def variant_verdicts(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each goodput variant (``goodput-*`` arms but the tree arm) judged as ``goodput`` is:
    its throughput paired by repetition against the best baseline arm's, so a setting's trial
    arm and the default read alike. Empty without variants.

    >>> runs = {"k2": [{"tokens_per_s": 100.0}, {"tokens_per_s": 90.0}], "goodput": [{"tokens_per_s": 95.0}] * 2,
    ...         "goodput-twin": [{"tokens_per_s": 50.0}, {"tokens_per_s": 45.0}]}
    >>> variant_verdicts(runs)["variants_paired_throughput"]["goodput-twin"]["slowdown"]
    2.0
    """
    baselines = {a: [x["tokens_per_s"] for x in r] for a, r in runs.items() if not goodput_arm(a)}
    out = {}
    for arm in runs:
        if goodput_arm(arm) and arm not in ("goodput", TREE_ARM) and baselines:
            verdict = paired_verdict({**baselines, arm: [x["tokens_per_s"] for x in runs[arm]]}, arm,
                                     lower_is_better=False)
            if verdict:
                out[arm] = verdict
    return {"variants_paired_throughput": out} if out else {}


def verdicts(point: dict[str, dict[str, Any]], key: str, lower_is_better: bool) -> dict[str, Any] | None:
    """The best arm at a point and how ``goodput`` stands (see :func:`best_and_verdict`)."""
    if "goodput" not in point or len(point) < 2:
        return None
    values = {arm: (float(r[key]), float(r.get(f"{key}_ci", 0.0))) for arm, r in point.items()}
    return best_and_verdict(values, "goodput", lower_is_better=lower_is_better)


def _phases(text: str) -> list[tuple[float, float]]:
    """``"0.5:20,6:20"`` -> ``[(0.5, 20.0), (6.0, 20.0)]``.

    >>> _phases("0.5:20,6:20")
    [(0.5, 20.0), (6.0, 20.0)]
    """
    return [(float(r), float(d)) for r, d in (p.split(":") for p in text.split(",") if p)]


class _Trace:
    """Per-step samples of one arm's engine: time, decode rows, drafts per decode row.

    Called after every engine step of an in-process engine, whose step timer has just added that
    step's record to the planner (the count of timed steps tells a new one).
    """

    def __init__(self, planner: Any) -> None:
        self.planner = planner
        self.seen = planner.stats.timed_steps if planner is not None else 0
        self.samples: list[tuple[float, int, float]] = []

    def __call__(self, now: float) -> None:
        if self.planner is None or self.planner.stats.timed_steps == self.seen or not self.planner.records:
            return
        self.seen = self.planner.stats.timed_steps
        record = self.planner.records[-1]
        rows = int(record.rows)
        self.samples.append((round(now, 3), rows, round(record.drafts_verified / rows, 3) if rows else 0.0))


def _engines(args: argparse.Namespace, arms: list[str], model_dir: Path,
             variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.head_training import resolve_heads
    from specserve.speculative_config import speculative_config

    heads = resolve_heads(args.drafter, None, is_demo=args.model is None)
    spec = speculative_config(args.drafter, args.k)  # type: ignore[arg-type]
    common = {"max_num_seqs": args.max_num_seqs, "kv_cache_memory_bytes": 256 << 20}
    engines: dict[str, Any] = {}
    with settings.override(heads_dir=heads or settings.current().heads_dir):  # read as engines build
        if "none" in arms:
            engines["none"] = local_llm(model_dir, **common)
        for arm in arms:
            if fixed_k(arm) is not None:  # one engine each: drafter state learned per arm
                engines[arm] = local_llm(model_dir, speculative_config=spec, **common,
                                         additional_config={"specserve": {"spec_policy": "fixed"}})
        for arm, extra in {**GOODPUT_ARMS, **(variants or {})}.items():
            if arm not in arms:
                continue
            tree = arm == TREE_ARM
            arm_spec = speculative_config(args.drafter, args.tree_budget) if tree else spec  # type: ignore[arg-type]
            with settings.override(tree=args.tree_shape if tree else "chain"):
                engines[arm] = local_llm(model_dir, speculative_config=arm_spec, **common,
                                         additional_config={"specserve": {"spec_policy": "goodput", **extra}})
    return engines


GOODPUT_ARMS: dict[str, dict[str, Any]] = {
    "goodput": {},
    "goodput-pooled": {"sampling_classes": False},
    "goodput-every-step": {"recheck_on": 1},
    "goodput-no-hindsight": {"hindsight": False},
    "goodput-tree": {},
    "goodput-twin": {},
    "goodput-last-prefill": {"prefill_estimate": "last"},
}
"""The goodput arms and the engine settings each adds to the default controller."""

TWIN_ARM = "goodput-twin"
"""A second engine built exactly as ``goodput``'s: an A/A control. Its ratio to ``goodput``
should be 1; how far it strays is the noise floor of the run, the engine's own instance included
(two engines of one build can differ in speed for the whole run), which a 3% verdict needs below it."""

TREE_ARM = "goodput-tree"
"""The arm whose engine drafts trees (``--tree-shape``, ``--tree-budget`` nodes)."""


def judged_arms(point: dict[str, Any]) -> dict[str, Any]:
    """The arms ``goodput`` is judged against at a point, and ``goodput``: the baselines, not
    its own variants (which a user would not run instead of it).

    >>> list(judged_arms({"none": 1, "k2": 2, "goodput": 3, "goodput-every-step": 4}))
    ['none', 'k2', 'goodput']
    """
    return {a: v for a, v in point.items() if a == "goodput" or not goodput_arm(a)}


def tree_judged_arms(point: dict[str, Any]) -> dict[str, Any]:
    """The tree arm and the chain arms it is judged against at a point (empty without it).

    >>> list(tree_judged_arms({"none": 1, "k2": 2, "goodput": 3, "goodput-pooled": 4, "goodput-tree": 5}))
    ['none', 'k2', 'goodput', 'goodput-tree']
    >>> tree_judged_arms({"none": 1, "goodput": 3})
    {}
    """
    return {**judged_arms(point), TREE_ARM: point[TREE_ARM]} if TREE_ARM in point else {}


def goodput_arm(arm: str) -> bool:
    """Whether ``arm`` runs the goodput controller: ``goodput`` and its variants (``goodput-*``:
    :data:`GOODPUT_ARMS` and ``--variant`` arms).

    >>> goodput_arm("goodput"), goodput_arm("goodput-oldcal"), goodput_arm("k2"), goodput_arm("none")
    (True, True, False, False)
    """
    return arm == "goodput" or arm.startswith("goodput-")


def parse_variants(values: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--variant NAME=JSON`` values as arms: ``goodput-NAME``, an engine with the goodput policy
    and these engine settings added (a trial of a setting or a calibration file beside the
    default, in the same run). Refuses a name the built-in arms take, settings that are not a
    JSON object, names no engine setting reads and values the engine would refuse
    (:class:`~specserve.cli.UsageError`).

    >>> parse_variants(['oldcal={"calibration": "old.json"}', 'r1={"revert": 1}'])
    {'goodput-oldcal': {'calibration': 'old.json'}, 'goodput-r1': {'revert': 1}}
    >>> parse_variants(["twin={}"])
    Traceback (most recent call last):
    ...
    specserve.cli.UsageError: --variant twin: goodput-twin is a built-in arm
    >>> parse_variants(['r={"revrt": 1}'])
    Traceback (most recent call last):
    ...
    specserve.cli.UsageError: --variant r: no engine setting named revrt
    """

    out: dict[str, dict[str, Any]] = {}
    for value in values:
        name, sep, settings = value.partition("=")
        name = name.strip()
        arm = f"goodput-{name}"
        if not sep or not name:
            raise UsageError(f"--variant {value!r}: expected NAME=JSON")
        if arm in GOODPUT_ARMS:
            raise UsageError(f"--variant {name}: {arm} is a built-in arm")
        try:
            parsed = json.loads(settings)
        except json.JSONDecodeError as e:
            raise UsageError(f"--variant {name}: settings are not JSON ({e.msg})") from None
        if not isinstance(parsed, dict):
            raise UsageError(f"--variant {name}: settings must be a JSON object")
        if unknown_settings(parsed):
            raise UsageError(f"--variant {name}: no engine setting named {', '.join(unknown_settings(parsed))}")
        try:
            settings_from({CONFIG_KEY: {"spec_policy": "goodput", **parsed}}, env={})
        except (TypeError, ValueError) as e:
            raise UsageError(f"--variant {name}: {e}") from None
        out[arm] = parsed
    return out


def fixed_k(arm: str) -> int | None:
    """The ``spec_k`` of a fixed arm (``k0`` .. ``k4``), ``None`` for the others.

    >>> fixed_k("k3"), fixed_k("goodput"), fixed_k("none")
    (3, None, None)
    """
    return int(arm[1:]) if arm[:1] == "k" and arm[1:].isdigit() else None


def temperature_mix(label: str) -> tuple[float, ...]:
    """The temperatures of a ``--temperatures`` item, which request ``i`` takes in turn.

    >>> temperature_mix("0.7"), temperature_mix("0+0.7")
    ((0.7,), (0.0, 0.7))
    """
    return tuple(float(t) for t in label.split("+"))


@dataclasses.dataclass
class PromptFeed:
    """Hands each arm's engine the next prompts of ``pool`` in the same order, so the arms of a
    repetition serve the same prompts and no engine serves one twice until the pool is spent
    (Token Recycling learns from what it serves: a repeated greedy prompt would be drafted from
    its own earlier output). ``repeats`` counts the requests that came round again.

    >>> feed = PromptFeed([[1], [2], [3]])
    >>> feed.take("a", 2), feed.take("b", 2), feed.take("a", 2), feed.repeats
    ([[1], [2]], [[1], [2]], [[3], [1]], {'a': 1})
    """

    pool: list[list[int]]
    served: dict[str, int] = dataclasses.field(default_factory=dict)
    repeats: dict[str, int] = dataclasses.field(default_factory=dict)

    def take(self, arm: str, n: int) -> list[list[int]]:
        start = self.served.get(arm, 0)
        self.served[arm] = start + n
        again = max(0, start + n - max(start, len(self.pool)))
        if again:
            self.repeats[arm] = self.repeats.get(arm, 0) + again
        return [self.pool[(start + i) % len(self.pool)] for i in range(n)]


def run(args: argparse.Namespace) -> int:
    from vllm import SamplingParams

    from specserve.bench.drafters import held_out_prompts
    from specserve.demo import demo_model_dir

    if args.full:
        for key, value in FULL.items():
            setattr(args, key, value)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    variants = parse_variants(args.variant)
    unknown = [a for a in arms if a != "none" and fixed_k(a) is None and a not in GOODPUT_ARMS and a not in variants]
    if unknown:
        raise UsageError(f"unknown arms {', '.join(unknown)} (a goodput-NAME arm needs --variant NAME=JSON)")
    model_dir = args.model or demo_model_dir()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    temps = [t.strip() for t in str(args.temperatures).split(",") if t.strip()]
    engines = _engines(args, arms, model_dir, variants)
    # every window of the held-out files; the last one warms the engines up and is served by no point
    windows = held_out_prompts(model_dir, 1 << 20, args.prompt_tokens, windows_per_file=64)
    warm_prompt, feed = windows[-1], PromptFeed(windows[:-1])
    rng = random.Random(args.seed)
    report: dict[str, Any] = {"model": str(model_dir), "drafter": args.drafter, "k": args.k,
                              "requests": args.requests, "reps": args.reps, "temperatures": temps,
                              "arms": arms, "open": {}, "closed": {}, "trace": {}}

    def requests_for(seed: int, n: int, temperature: str, arm: str) -> list[tuple[Any, Any]]:
        lengths = output_lengths(args.mean_output, n, seed)
        k = fixed_k(arm)
        extra = {"spec_k": k} if k is not None else None
        mix = temperature_mix(temperature)
        return [({"prompt_token_ids": prompt},
                 SamplingParams(temperature=mix[i % len(mix)], max_tokens=m, ignore_eos=True, seed=seed + i,
                                extra_args=extra)) for i, (m, prompt) in enumerate(zip(lengths, feed.take(arm, n)))]

    def measured(arm: str, served: Callable[[], tuple[list[Finished], float]]) -> tuple[list[Finished], float, float]:
        """``served()`` on ``arm``'s engine: its requests, wall span and this process's CPU seconds."""
        cpu0 = time.process_time()
        finished, span = served()
        return finished, span, time.process_time() - cpu0

    def arm_result(arm: str, finished: list[Finished], span: float, cpu_s: float,
                   before: dict[str, Any] | None, trees_before: dict[str, Any] | None,
                   steps: StepLog) -> dict[str, Any]:
        llm = engines[arm]
        result: dict[str, Any] = summarise(finished, span)
        result["by_requests"] = steps.summary()
        # this process's CPU time (the engine runs in it): blind to time the machine gave
        # other work, which wall-clock figures on a shared machine are not
        result["tokens_per_cpu_s"] = round(sum(len(f.tokens) for f in finished) / cpu_s, 1) if cpu_s > 0 else 0.0
        if before is not None:
            planner = _planner(llm)
            result["plan"] = {**plan_delta(before, planner.snapshot()), **step_terms(planner)}
        if trees_before is not None:  # counts, so the tree arm is seen to verify trees
            trees_after = tree_counters(llm)
            result["trees_verified"] = trees_after.get("verified", 0) - trees_before.get("verified", 0)
            result["tree_nodes_accepted"] = (trees_after.get("accepted_nodes", 0)
                                             - trees_before.get("accepted_nodes", 0))
        return result

    def point(label: str, drive: Callable[[Any, list[tuple[Any, Any]], str, int, StepLog], tuple[list[Finished], float]],
              temperature: str, seed_base: int, by_request: bool = False) -> dict[str, Any]:
        """Every arm at one load point, ``--reps`` times. ``by_request`` (one client): the arms
        take turns request by request, in an order shuffled per request, and the report adds
        verdicts paired by request."""
        runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
        latencies: dict[str, list[float]] = {a: [] for a in arms}  # per request, over repetitions
        orders: list[Any] = []  # per repetition: the arms' order, or (by request) each request's
        for rep in range(args.reps):
            order = arms[:]
            rng.shuffle(order)
            reqs = {arm: requests_for(seed_base + 1000 * rep, args.requests, temperature, arm) for arm in arms}
            before = {arm: _plan_stats(engines[arm]) if goodput_arm(arm) else None for arm in arms}
            trees_before = {arm: tree_counters(engines[arm]) if arm == TREE_ARM else None for arm in arms}
            served: dict[str, list[tuple[list[Finished], float, float]]] = {a: [] for a in arms}
            steps = {arm: StepLog() for arm in arms}
            if by_request:
                orders.append([])
                for i in range(args.requests):
                    turn = arms[:]
                    rng.shuffle(turn)
                    orders[-1].append(turn)
                    for arm in turn:
                        served[arm].append(measured(arm, lambda arm=arm, i=i: closed_loop(
                            engines[arm].llm_engine, [reqs[arm][i]], 1, f"{label}-{arm}-{rep}-{i}",
                            steps=steps[arm])))
            else:
                orders.append(order)
                for arm in order:
                    served[arm].append(measured(arm, lambda arm=arm: drive(
                        engines[arm].llm_engine, reqs[arm], f"{label}-{arm}-{rep}", rep, steps[arm])))
            for arm in order:
                finished = [f for part in served[arm] for f in part[0]]
                span, cpu_s = sum(part[1] for part in served[arm]), sum(part[2] for part in served[arm])
                latencies[arm] += [f.done - f.sent for f in finished]
                result = arm_result(arm, finished, span, cpu_s, before[arm], trees_before[arm], steps[arm])
                runs[arm].append(result)
                logger.info("bench goodput point", extra={"fields": {
                    "point": label, "temperature": temperature, "rep": rep, "arm": arm, **result}})
        per_arm = {arm: {**combine(r), "by_requests": merge_by_requests([x["by_requests"] for x in r]),
                         **({"plan": [x["plan"] for x in r]} if "plan" in r[0] else {})}
                   for arm, r in runs.items()}
        judged, judged_runs = judged_arms(per_arm), judged_arms(runs)
        tree_runs = tree_judged_arms(runs)
        trees = {f"tree_paired_{name}": paired_verdict({a: [x[key] for x in r] for a, r in tree_runs.items()},
                                                       TREE_ARM, lower_is_better=lower)
                 for name, key, lower in (("latency", "latency_mean_s", True), ("throughput", "tokens_per_s", False),
                                          ("cpu_throughput", "tokens_per_cpu_s", False))} if tree_runs else {}
        if by_request:
            trees.update(request_paired(latencies))
        return {"orders": orders, "arms": per_arm, **trees,
                "verdict_latency": verdicts(judged, "latency_mean_s", lower_is_better=True),
                "verdict_throughput": verdicts(judged, "tokens_per_s", lower_is_better=False),
                "paired_latency": paired_verdict({a: [x["latency_mean_s"] for x in r] for a, r in judged_runs.items()},
                                                 "goodput", lower_is_better=True),
                "paired_throughput": paired_verdict({a: [x["tokens_per_s"] for x in r]
                                                     for a, r in judged_runs.items()}, "goodput", lower_is_better=False),
                "paired_cpu_throughput": paired_verdict({a: [x["tokens_per_cpu_s"] for x in r]
                                                         for a, r in judged_runs.items()}, "goodput",
                                                        lower_is_better=False),
                **full_load_verdict(judged_runs), **twin_ratios(runs), **variant_verdicts(runs)}

    try:
        for llm in engines.values():  # the same warm-up for every engine
            llm.generate([{"prompt_token_ids": warm_prompt}], SamplingParams(max_tokens=8), use_tqdm=False)
        for ti, temperature in enumerate(temps):
            key = f"t{temperature}"
            if "open" in parts:
                report["open"][key] = {}
                for ri, rate in enumerate(float(r) for r in args.rates.split(",")):
                    times = {rep: arrivals(rate, args.requests, args.seed + 100 * ri + rep) for rep in range(args.reps)}

                    def drive_open(engine: Any, reqs: list[tuple[Any, Any]], tag: str, rep: int, steps: StepLog,
                                   times: dict[int, list[float]] = times) -> tuple[list[Finished], float]:
                        return open_loop(engine, reqs, times[rep], tag, steps=steps)

                    report["open"][key][f"{rate:g}"] = point(f"open-{rate:g}-{key}", drive_open, temperature,
                                                             args.seed + 100 * ri + 10 * ti)
            if "closed" in parts:
                report["closed"][key] = {}
                for ci, clients in enumerate(int(c) for c in args.concurrency.split(",")):
                    def drive_closed(engine: Any, reqs: list[tuple[Any, Any]], tag: str, rep: int, steps: StepLog,
                                     clients: int = clients) -> tuple[list[Finished], float]:
                        return closed_loop(engine, reqs, clients, tag, steps=steps)

                    report["closed"][key][str(clients)] = point(
                        f"closed-{clients}-{key}", drive_closed, temperature, args.seed + 500 + 100 * ci + 10 * ti,
                        by_request=args.interleave and clients == 1)
            if "trace" in parts and ti == 0:
                report["trace"] = _step_trace(args, arms, engines, requests_for, temperature, rng)
    finally:
        engines.clear()
        gc.collect()
    report["prompts"] = {"distinct": len(feed.pool), "served_per_arm": max(feed.served.values(), default=0),
                         "repeats_per_arm": max(feed.repeats.values(), default=0)}
    if args.plots is not None:
        write_plots(report, args.plots)
    sys.stdout.write(json.dumps(report, indent=1) + "\n")
    sys.stderr.write(summary_line(report) + "\n")
    return 0


def _step_trace(args: argparse.Namespace, arms: list[str], engines: dict[str, Any],
                requests_for: Callable[[int, int, str, str], list[tuple[Any, Any]]], temperature: str,
                rng: random.Random) -> dict[str, Any]:
    """Every arm through the same low -> high -> low load; the goodput arm's per-step k and batch."""
    phases = _phases(args.trace_phases)
    times = phased_arrivals(phases, args.seed + 7)
    out: dict[str, Any] = {"phases": phases, "requests": len(times), "arms": {}}
    order = arms[:]
    rng.shuffle(order)
    out["order"] = order
    for arm in order:
        llm = engines[arm]
        trace = _Trace(_planner(llm)) if arm == "goodput" else None
        reqs = requests_for(args.seed + 7, len(times), temperature, arm)
        finished, span = open_loop(llm.llm_engine, reqs, times, f"trace-{arm}", on_step=trace)
        by_phase = []
        start = 0.0
        for _, duration in phases:  # latency of the requests that arrived in each phase
            inside = [f for f, t in zip(finished, times) if start <= t < start + duration]
            by_phase.append(summarise(inside, duration)["latency_mean_s"] if inside else None)
            start += duration
        out["arms"][arm] = {**summarise(finished, span), "latency_mean_s_by_phase": by_phase}
        if trace is not None:
            out["goodput_steps"] = trace.samples
    return out


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """SVG charts: mean latency vs rate, tokens/s vs clients (per temperature), the step trace."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for part, key, name, title, x_label, y_label in (
        ("open", "latency_mean_s", "latency-vs-rate", "mean latency vs arrival rate", "requests/s (Poisson)",
         "mean latency (s)"),
        ("closed", "tokens_per_s", "throughput-vs-clients", "throughput vs clients", "concurrent clients",
         "output tokens/s"),
    ):
        for temp, points in report.get(part, {}).items():
            path = folder / f"goodput-{name}-{temp}.svg"
            path.write_text(line_chart(_per_arm(points, key), title=f"{report['drafter']}: {title} ({temp})",
                                       x_label=x_label, y_label=y_label))
            written.append(path)
    steps = report.get("trace", {}).get("goodput_steps")
    if steps:
        k = [(t, kk) for t, _, kk in steps]
        rows = [(t, float(b)) for t, b, _ in steps]
        path = folder / "goodput-step-trace.svg"
        path.write_text(line_chart({"drafts per decode row (k)": k, "decode rows": rows}, markers=False,
                                   title=f"{report['drafter']}: goodput controller through a load step",
                                   x_label="time (s)", y_label="k / decode rows"))
        written.append(path)
    return written


def _per_arm(points: dict[str, Any], key: str) -> dict[str, list[tuple[float, float]]]:
    """``{arm: [(x, value of key), ...]}`` over a part's points (x: the rate or client count).

    >>> _per_arm({"1": {"arms": {"none": {"v": 2.0}}}, "4": {"arms": {"none": {"v": 3.0}}}}, "v")
    {'none': [(1.0, 2.0), (4.0, 3.0)]}
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for x, pt in points.items():
        for arm, r in pt["arms"].items():
            series.setdefault(arm, []).append((float(x), r[key]))
    return series


def summary_line(report: dict[str, Any]) -> str:
    """One line: per point, the best arm, goodput's ratio to it, and whether it is within 3% (or
    the CI), with goodput's paired slowdown (and, for closed loops, the same per CPU second of
    this process); then, from ratios paired by repetition, how many points show goodput within
    3% of the best arm, how many show it more than 3% behind, and how many leave it undecided;
    the same tally for the tree arm against the best chain arm when it ran. Closed loops add the
    paired slowdown while every client was busy (``full load``). Points run with
    ``--interleave`` add goodput's slowdown paired by request.

    >>> summary_line({"drafter": "hydra", "open": {"t0": {"1": {"verdict_latency": {
    ...     "best": "k4", "ratio": 1.01, "within": True, "better_than_fixed": False},
    ...     "paired_latency": {"best": "k4", "slowdown": 1.01, "low": 0.99, "high": 1.02, "verdict": "within"}}}},
    ...     "closed": {}})
    'goodput hydra: open t0 1/s best=k4 goodput/best=1.01 ok (paired 1.01 [0.99, 1.02]); 1 of 1 points within 3% or the CI; paired: 1 within 3%, 0 beyond, 0 undecided'
    """
    parts, ok, total = [], 0, 0
    tally = {"within": 0, "beyond": 0, "undecided": 0}
    trees = {"within": 0, "beyond": 0, "undecided": 0}
    for kind, unit, key in (("open", "/s", "latency"), ("closed", " clients", "throughput")):
        for temp, points in report.get(kind, {}).items():
            for x, pt in points.items():
                tv = pt.get(f"tree_paired_{key}")
                if tv:
                    trees[str(tv["verdict"])] += 1
                v = pt.get(f"verdict_{key}")
                if not v:
                    continue
                total += 1
                ok += bool(v["within"])
                text = (f"{kind} {temp} {x}{unit} best={v['best']} goodput/best={v['ratio']} "
                        + ("ok" if v["within"] else "MISS"))
                pv = pt.get(f"paired_{key}")
                if pv:
                    tally[str(pv["verdict"])] += 1
                    text += f" (paired {pv['slowdown']} [{pv['low']}, {pv['high']}])"
                rv = pt.get("request_paired_latency")
                if rv:
                    text += f" (by request {rv['slowdown']} [{rv['low']}, {rv['high']}] vs {rv['best']}: {rv['verdict']})"
                for arm, r in (pt.get("variants_request_paired_latency") or {}).items():
                    text += f" (goodput/{arm} by request {r['ratio']} [{r['low']}, {r['high']}])"
                cpu = pt.get("paired_cpu_throughput") if kind == "closed" else None
                if cpu:
                    text += f" (per CPU s {cpu['slowdown']} [{cpu['low']}, {cpu['high']}], best={cpu['best']})"
                twin = pt.get("twin_throughput")
                if twin:
                    text += f" (twin/goodput {twin['ratio']} [{twin['low']}, {twin['high']}])"
                busy = pt.get("paired_full_load_throughput") if kind == "closed" else None
                if busy:
                    text += f" (full load {busy['slowdown']} [{busy['low']}, {busy['high']}], best={busy['best']})"
                parts.append(text)
    line = (f"goodput {report['drafter']}: " + ", ".join(parts) + f"; {ok} of {total} points within 3% or the CI"
            + f"; paired: {tally['within']} within 3%, {tally['beyond']} beyond, {tally['undecided']} undecided")
    if any(trees.values()):
        line += (f"; {TREE_ARM} against the best chain arm, paired: {trees['within']} within 3%, "
                 f"{trees['beyond']} beyond, {trees['undecided']} undecided")
    return line
