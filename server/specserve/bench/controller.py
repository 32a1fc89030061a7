"""``specserve bench controller``: what the engine's goodput controller costs per step.

The per-step controller must cost well under 1% of a step. This benchmark times its two calls
outside the engine, warm, at several batch sizes:

- ``decide``: one decision (:meth:`GoodputPolicy.plan` with nothing held, every row decoding
  with ``k`` slots): survival, the sort of slots, the step-time curve, the plan;
- ``learn``: folding one step's verifications into the acceptance estimates;
- ``learn_held``: the same per step when ``--held`` steps are folded at once, as they are when a
  plan is held for that many steps (the engine's ``recheck_on``, 4 by default); with
  ``share_of_step_held``, a decision every ``--held`` steps and that learning, over a step.

Each figure is the median over ``--batches`` batches of ``--calls`` calls, in process CPU time (µs
per call), so other work on a shared machine counts little. Each batch size is also priced
against the step it plans: the demo calibration's predicted plain step at that batch
(``share_of_step``, decision plus learning over that step). Inside the engine the same calls run
right after a forward pass, with colder caches, and cost several times these warm figures
(``docs/speculation-control.md``, "The controller's own cost per step").

JSON on stdout; one summary line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,8,16,64")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed batch")
    parser.add_argument("--batches", type=int, default=15, help="timed batches (the median is reported)")
    parser.add_argument("--calibration", type=Path, default=None, help="step-time calibration (default: the demo's)")
    parser.add_argument("--drafter", default="HydraProposer", help="drafter class whose calibration prices drafts")
    parser.add_argument("--held", type=int, default=4, help="steps a plan is held (the engine's recheck_on)")


def _policy(calibration: Any, drafter: str, k: int) -> Any:
    from specserve_vllm.spec_control.acceptance import AcceptanceModel
    from specserve_vllm.spec_control.goodput import GoodputPolicy
    from specserve_vllm.spec_control.step_time import StepTimeModel

    cost, prior = calibration.for_drafter(drafter)
    prior = list(prior or [0.6])[:k]
    prior += [prior[-1]] * (k - len(prior))
    return GoodputPolicy(StepTimeModel(cost), AcceptanceModel(prior), recheck_on=1)


def time_calls(call: Any, calls: int, batches: int) -> float:
    """Median over ``batches`` of the process CPU time per call (µs), after one warm batch.

    >>> time_calls(lambda: None, calls=10, batches=3) < 1000
    True
    """
    per_call = []
    for batch in range(batches + 1):
        t0 = time.process_time()
        for _ in range(calls):
            call()
        if batch:  # the first batch warms caches
            per_call.append((time.process_time() - t0) / calls * 1e6)
    return float(statistics.median(per_call))


def measure(batch: int, k: int, calls: int, batches: int, calibration: Any, drafter: str,
            held: int = 4) -> dict[str, Any]:
    """The warm cost of a decision and of learning one step at ``batch`` decode rows; and per
    step when a plan is held for ``held`` steps (the engine's ``recheck_on``): a decision
    and one fold of ``held`` steps' verifications."""
    from specserve_vllm.spec_control.plan import StepRows, VerifiedRows

    policy = _policy(calibration, drafter, k)
    ids = tuple(f"r{i}" for i in range(batch))
    rows = StepRows(ids, np.full(batch, k), np.full(batch, 256), np.zeros(batch, dtype=np.int64))
    rng = np.random.default_rng(batch)
    accepted = rng.integers(0, k + 1, size=batch)
    verified = VerifiedRows(ids, np.full(batch, k), accepted)
    policy.observe(verified)
    policy.plan(rows)  # the requests are known before timing

    def decide() -> None:
        policy.release()  # a decision every call, as when the batch changes
        policy.plan(rows)

    def learn() -> None:
        policy.observe(verified)
        policy.learn()

    def learn_held() -> None:
        for _ in range(held):
            policy.observe(verified)
        policy.learn()

    decide_us = time_calls(decide, calls, batches)
    learn_us = time_calls(learn, calls, batches)
    learn_held_us = time_calls(learn_held, max(1, calls // held), batches) / held
    step_ms = calibration.cost.step_ms(batch, batch, 256 * batch, False)
    return {"batch": batch, "decide_us": round(decide_us, 1), "learn_us": round(learn_us, 1),
            "learn_held_us": round(learn_held_us, 1), "plain_step_ms": round(step_ms, 2),
            "share_of_step": round((decide_us + learn_us) / (step_ms * 1e3), 4),
            "share_of_step_held": round((decide_us / held + learn_held_us) / (step_ms * 1e3), 4)}


def summary_line(report: dict[str, Any]) -> str:
    """One line: µs per decision and per learnt step, and their share of a step, by batch
    (deciding every step; held: a decision every ``held`` steps).

    >>> summary_line({"held": 4, "points": [{"batch": 1, "decide_us": 40.0, "learn_us": 10.0,
    ...     "learn_held_us": 5.0, "plain_step_ms": 3.0, "share_of_step": 0.0167, "share_of_step_held": 0.005}]})
    'bench controller: b1 decide 40µs learn 10µs (1.67% of a 3.0 ms step; held 4: 0.50%)'
    """
    return "bench controller: " + ", ".join(
        f"b{p['batch']} decide {p['decide_us']:g}µs learn {p['learn_us']:g}µs "
        f"({100 * p['share_of_step']:.2f}% of a {p['plain_step_ms']:.1f} ms step; "
        f"held {report['held']}: {100 * p['share_of_step_held']:.2f}%)" for p in report["points"])


def run(args: argparse.Namespace) -> int:
    from specserve_vllm.spec_control.step_time import DEFAULT_CALIBRATION, Calibration

    calibration = Calibration.load(args.calibration or DEFAULT_CALIBRATION)
    points = []
    for batch in (int(b) for b in str(args.batch_sizes).split(",") if b.strip()):
        point = measure(batch, args.k, args.calls, args.batches, calibration, args.drafter, args.held)
        logger.info("bench controller point", extra={"fields": point})
        points.append(point)
    report = {"k": args.k, "drafter": args.drafter, "calls": args.calls, "batches": args.batches, "held": args.held,
              "clock": "process CPU time, warm", "points": points}
    sys.stdout.write(json.dumps(report, indent=1) + "\n")
    sys.stderr.write(summary_line(report) + "\n")
    return 0
