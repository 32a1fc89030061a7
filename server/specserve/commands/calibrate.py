"""Calibrate the engine's step-time model (used by ``--engine-spec-policy goodput``).

Runs an in-process engine per drafter, side by side, over a grid of batch sizes, per-request
draft lengths (``spec_k``; 0 gives non-speculative steps) and temperatures (``--timing-temperatures``:
a sampled row's token and drafts are drawn, not argmaxed, a term of its own), collects every step
the engines measured (rows, scheduled and context tokens, spec path on/off, sampled rows, drafting
time), and fits the linear model of
:mod:`specserve_vllm.spec_control.step_time` by least squares: one step cost shared by the
drafters (same target model), a drafting cost and an acceptance prior per drafter (one pass per
sampling class, greedy and each ``--temperatures`` value, over ``--prior-tokens`` outputs: longer
than the timing grid's, since a request accepts more as it goes on). Writes the
calibration JSON the engine loads (``--additional-config '{"specserve": {"calibration": FILE}}'``,
or ``SPECSERVE_ENGINE_CALIBRATION``) and prints the fit's error (MAPE) on the measured steps,
overall and by grid cell (``cells``: each batch size and ``spec_k``, step and drafting time
measured against predicted). ``--rounds N`` runs the timing grid N times, each pass in a new
shuffled order with the drafters' engines taking turns, so neither a cell's figure nor a
drafter's is one stretch of the machine's time.

Example:
    specserve calibrate --drafters recycling,hydra --out calibration.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specserve_vllm.spec_control.acceptance import SAMPLING_CLASSES, sampling_class
from specserve_vllm.spec_control.stats import PlanStats

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafters", default="recycling,hydra")
    parser.add_argument("--k", type=int, default=4, help="the engine's num_speculative_tokens")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16",
                        help="batch sizes of the grid (up to the engine's --max-num-seqs: a step model "
                             "fitted below a batch size prices it by extrapolation)")
    parser.add_argument("--spec-ks", default="0,1,2,4", help="per-request draft lengths of the grid")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each request of the timing grid generates")
    parser.add_argument("--prior-tokens", type=int, default=96,
                        help="tokens each request of the acceptance passes generates (a request accepts more "
                             "drafts as it goes on, so the priors come from outputs longer than the timing grid's)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--timing-temperatures", default="0,0.7",
                        help="temperatures of the timing grid (comma-separated): a sampled row's token and each "
                             "draft it verifies is drawn over the vocabulary, not argmaxed, which the step model "
                             "prices as its own term")
    parser.add_argument("--temperatures", default="0.7",
                        help="sampled temperatures whose acceptance is measured as its class's prior "
                             "(comma-separated; empty: greedy only)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes over the timing grid, each in a new shuffled order (more steps per cell, "
                             "and a slow spell of the machine spread over the cells)")
    parser.add_argument("--out", type=Path, default=Path("calibration.json"))


def mape(records: list[dict[str, Any]], cost: Any) -> float:
    """Mean |predicted - measured| / measured of the step time (drafting excluded)."""
    errors = [abs(cost.step_ms(r["rows"], r["tokens"], r["ctx_tokens"], r["spec"], r.get("drafts_verified", 0),
                               r.get("sampled", 0)) - r["step_ms"]) / r["step_ms"]
              for r in records if r["step_ms"] > 0]
    return round(sum(errors) / len(errors), 4) if errors else 0.0


def draft_mape(records: list[dict[str, Any]], cost: Any) -> float:
    """Mean |predicted - measured| / measured of the drafting time, over the steps that drafted."""
    errors = [abs(cost.draft_ms(r["drafts"], r.get("draft_depth", 0)) - r["draft_ms"]) / r["draft_ms"]
              for r in records if r.get("drafts", 0) > 0 and r["draft_ms"] > 0]
    return round(sum(errors) / len(errors), 4) if errors else 0.0


def _cell(record: dict[str, Any]) -> tuple[int, int, float]:
    """A record's grid cell: batch size, ``spec_k``, temperature (0 in records without one)."""
    cell = record["cell"]
    return int(cell[0]), int(cell[1]), float(cell[2]) if len(cell) > 2 else 0.0


def cell_errors(records: list[dict[str, Any]], cost: Any, per_draft_only: Any = None) -> list[dict[str, Any]]:
    """The fit's error by grid cell (batch size, ``spec_k``, temperature): over the cell's decode steps (no
    prefill, every row of the batch running), the median measured and predicted step time, and
    of the steps that drafted, the median drafting time measured, predicted, and predicted by
    ``per_draft_only`` (a fit without the per-position term) when given. Medians of per-step
    values, ms. Where a linear model misprices a region (deep plans at many rows, one row's
    drafting at depth 4), this table shows it; the overall MAPE averages it away.

        >>> from specserve_vllm.spec_control.step_time import StepCost
        >>> cost = StepCost(base=1.0, per_token=0.5, per_row=0.0, context=0.0, spec=0.0, spec_row=0.0,
        ...                 draft=0.2, draft_token=0.0, draft_depth=0.3)
        >>> step = {"rows": 2, "tokens": 4, "ctx_tokens": 0, "spec": True, "drafts_verified": 2,
        ...         "prefill_tokens": 0, "step_ms": 3.3, "drafts": 2, "draft_depth": 1, "draft_ms": 0.5, "cell": [2, 1, 0.0]}
        >>> cell_errors([step, {**step, "prefill_tokens": 8}], cost)
        [{'batch': 2, 'spec_k': 1, 'temperature': 0.0, 'steps': 1, 'step_ms': 3.3, 'predicted_ms': 3.0, 'error': -0.091, 'draft_ms': 0.5, 'draft_predicted_ms': 0.5}]
    """
    import statistics

    out: list[dict[str, Any]] = []
    cells = sorted({_cell(r) for r in records if "cell" in r})
    for bs, k, t in cells:
        steps = [r for r in records if "cell" in r and _cell(r) == (bs, k, t)
                 and r["prefill_tokens"] == 0 and r["rows"] == bs and r["step_ms"] > 0]
        if not steps:
            continue
        measured = statistics.median(r["step_ms"] for r in steps)
        predicted = statistics.median(cost.step_ms(r["rows"], r["tokens"], r["ctx_tokens"], r["spec"],
                                                   r.get("drafts_verified", 0), r.get("sampled", 0)) for r in steps)
        row: dict[str, Any] = {"batch": bs, "spec_k": k, "temperature": t, "steps": len(steps),
                               "step_ms": round(measured, 3),
                               "predicted_ms": round(predicted, 3), "error": round(predicted / measured - 1, 3)}
        drafting = [r for r in steps if r.get("drafts", 0) > 0 and r["draft_ms"] > 0]
        if drafting:
            row["draft_ms"] = round(statistics.median(r["draft_ms"] for r in drafting), 3)
            row["draft_predicted_ms"] = round(statistics.median(
                cost.draft_ms(r["drafts"], r.get("draft_depth", 0)) for r in drafting), 3)
            if per_draft_only is not None:
                row["draft_per_draft_only_ms"] = round(statistics.median(
                    per_draft_only.draft_ms(r["drafts"], 0) for r in drafting), 3)
        out.append(row)
    return out


def _engine(model_dir: Path, drafter: str, args: argparse.Namespace, heads: str | None) -> Any:
    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.speculative_config import speculative_config

    with settings.override(heads_dir=heads or settings.current().heads_dir):  # read as the engine builds
        return local_llm(model_dir, max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=256 << 20,
                         speculative_config=speculative_config(drafter, args.k),  # type: ignore[arg-type]
                         additional_config={"specserve": {"spec_policy": "fixed", "time_plain_every": 1}})


def _take_records(worker: Any) -> list[dict[str, Any]]:
    from specserve.engine.local import worker_runner

    planner = worker_runner(worker)._specserve_planner
    records = [{**asdict(r), "step_ms": r.step_ms} for r in planner.records]
    planner.records.clear()
    return records


def _position_counts(worker: Any) -> tuple[list[int], list[int]]:
    from specserve.engine.local import worker_runner

    stats = worker_runner(worker)._specserve_planner.stats
    return list(stats.position_trials), list(stats.position_accepted)


def timing_order(drafters: list[str], grid: list[tuple[int, int, float]], rounds: int) -> list[tuple[str, int, int, float]]:
    """The timing grid's runs: every drafter's cells in one shuffled order per round, so the
    drafters' engines take turns and a slow spell of the machine falls on all of them, not on
    the one engine that ran then (one round: the grid in order, drafter by drafter).

    >>> timing_order(["r", "h"], [(1, 0, 0.0), (1, 2, 0.0)], 1)
    [('r', 1, 0, 0.0), ('r', 1, 2, 0.0), ('h', 1, 0, 0.0), ('h', 1, 2, 0.0)]
    >>> sorted(timing_order(["r", "h"], [(1, 0, 0.0)], 2)) == [("h", 1, 0, 0.0)] * 2 + [("r", 1, 0, 0.0)] * 2
    True
    """
    cells = [(d, *c) for d in drafters for c in grid]
    if rounds <= 1:
        return cells
    return [x for r in range(rounds) for x in random.Random(r).sample(cells, len(cells))]


def _timing(engines: dict[str, Any], args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, list[dict[str, Any]]]:
    """Every drafter's measured steps over the timing grid, each tagged with its cell."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from specserve.engine.local import worker_runner

    for llm in engines.values():
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0])],
                     SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
        llm.collective_rpc(lambda w: worker_runner(w)._specserve_planner.records.clear())
    temps = [float(t) for t in str(args.timing_temperatures).split(",") if t.strip()] or [0.0]
    grid = [(int(b), int(x), t) for b in args.batch_sizes.split(",") for x in args.spec_ks.split(",") for t in temps]
    records: dict[str, list[dict[str, Any]]] = {d: [] for d in engines}
    order = timing_order(list(engines), grid, args.rounds)
    for i, (drafter, bs, k, t) in enumerate(order):
        llm = engines[drafter]
        params = SamplingParams(temperature=t, max_tokens=args.max_tokens, ignore_eos=True,
                                seed=i if t > 0 else None, extra_args={"spec_k": k})
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in (prompts * bs)[:bs]], params, use_tqdm=False)
        # each grid cell's steps, tagged for the error table by cell
        records[drafter] += [{**x, "cell": [bs, k, t]} for x in llm.collective_rpc(_take_records)[0]]
        log.info("calibrate", extra={"fields": {"drafter": drafter, "run": i + 1, "of": len(order), "batch": bs,
                                                "spec_k": k, "temperature": t}})
    return records


def _priors(drafter: str, llm: Any, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, list[float]]:
    """The drafter's conditional acceptance by position, per sampling class (greedy, then each
    ``--temperatures`` value), over ``--prior-tokens`` outputs at every batch size of the grid."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    by_class: dict[str, list[float]] = {}
    for t in [0.0] + [float(x) for x in str(args.temperatures).split(",") if x.strip()]:
        trials0, accepted0 = llm.collective_rpc(_position_counts)[0]
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            params = SamplingParams(temperature=t, max_tokens=args.prior_tokens, ignore_eos=True, seed=bs)
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in (prompts * bs)[:bs]], params, use_tqdm=False)
            log.info("calibrate", extra={"fields": {"drafter": drafter, "batch": bs, "temperature": t}})
        trials1, accepted1 = llm.collective_rpc(_position_counts)[0]
        pad = len(trials1)
        trials0, accepted0 = trials0 + [0] * (pad - len(trials0)), accepted0 + [0] * (pad - len(accepted0))
        by_class[SAMPLING_CLASSES[sampling_class(t)]] = PlanStats(
            position_trials=[b - a for a, b in zip(trials0, trials1)],
            position_accepted=[b - a for a, b in zip(accepted0, accepted1)]).conditional_acceptance()
    return by_class


def _measure(model_dir: Path, drafters: list[str], args: argparse.Namespace, prompts: list[list[int]],
             heads: dict[str, str | None]) -> dict[str, tuple[list[dict[str, Any]], dict[str, list[float]]]]:
    """Per drafter class name: its measured steps and its priors by sampling class. The
    drafters' engines live side by side, so their timing runs can take turns (:func:`timing_order`)."""
    from specserve.engine.local import worker_runner

    engines: dict[str, Any] = {}
    try:
        for drafter in drafters:
            engines[drafter] = _engine(model_dir, drafter, args, heads[drafter])
        records = _timing(engines, args, prompts)
        out: dict[str, tuple[list[dict[str, Any]], dict[str, list[float]]]] = {}
        for drafter, llm in engines.items():
            name = llm.collective_rpc(lambda w: type(worker_runner(w).drafter).__name__)[0]
            out[name] = (records[drafter], _priors(drafter, llm, args, prompts))
        return out
    finally:
        engines.clear()
        gc.collect()


def run(args: argparse.Namespace) -> int:
    from specserve.bench.drafters import held_out_prompts
    from specserve.demo import demo_model_dir
    from specserve.head_training import resolve_heads
    from specserve_vllm.spec_control.step_time import Calibration, fit_cost

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON
    model_dir = args.model or demo_model_dir()
    prompts = held_out_prompts(model_dir, 8, args.prompt_tokens)
    drafters = [d.strip() for d in args.drafters.split(",") if d.strip()]
    all_records: list[dict[str, Any]] = []
    drafter_cost: dict[str, tuple[float, ...]] = {}
    acceptance: dict[str, list[float]] = {}
    by_class: dict[str, dict[str, list[float]]] = {}
    per_drafter: dict[str, list[dict[str, Any]]] = {}
    heads = {d: resolve_heads(d, None, is_demo=args.model is None) for d in drafters}
    for name, (records, classes) in _measure(model_dir, drafters, args, prompts, heads).items():
        all_records += records
        per_drafter[name] = records
        acceptance[name] = classes[SAMPLING_CLASSES[0]]
        by_class[name] = classes
    cost = fit_cost(all_records)
    drafting_mape: dict[str, dict[str, float]] = {}
    by_cell: dict[str, list[dict[str, Any]]] = {}
    per_draft_fits: dict[str, Any] = {}
    for name, records in per_drafter.items():
        own = fit_cost(records)
        drafter_cost[name] = (own.draft, own.draft_token, own.draft_depth)
        per_draft_only = fit_cost([{**r, "draft_depth": 0} for r in records])  # the fit without the position term
        per_draft_fits[name] = per_draft_only
        drafting_mape[name] = {"fitted": draft_mape(records, own), "per_draft_only": draft_mape(records, per_draft_only)}
    calibration = Calibration(cost=cost, drafter_cost=drafter_cost, acceptance=acceptance,
                              source=f"specserve calibrate on {model_dir.name}: {len(all_records)} steps",
                              acceptance_by_class=by_class)
    for name, records in per_drafter.items():  # each drafter priced as the engine will price it
        by_cell[name] = cell_errors(records, calibration.for_drafter(name)[0], per_draft_fits[name])
    args.out.write_text(calibration.to_json() + "\n", encoding="utf-8")
    summary = {"out": str(args.out), "steps": len(all_records), "mape": mape(all_records, cost),
               "draft_mape": drafting_mape, "cells": by_cell, "cost": asdict(cost), "drafter_cost": drafter_cost, "acceptance": acceptance,
               "acceptance_by_class": by_class}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    sys.stderr.write(f"calibrate: {len(all_records)} steps, step-time MAPE {summary['mape']:.1%} -> {args.out}\n")
    return 0
