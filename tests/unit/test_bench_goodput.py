"""The spec-off and goodput benchmarks' arithmetic, the open-loop driver on a fake engine, and the CLI."""

from __future__ import annotations

import doctest
import importlib
from types import SimpleNamespace
from typing import Any

import pytest

from specserve.bench import goodput, spec_off
from specserve.cli import build_parser


@pytest.mark.parametrize("name", ["specserve.bench.goodput", "specserve.bench.spec_off",
                                  "specserve.commands.calibrate"])
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0


def test_paired_ratios_pair_arms_within_a_repetition() -> None:
    runs = [{"none": 100.0, "a": 96.0}, {"none": 50.0, "a": 49.0}, {"none": 80.0, "a": 76.0}]
    assert spec_off.paired_ratios(runs, "a") == {"median": 0.96, "min": 0.95, "max": 0.98}


class _FakeEngine:
    """Finishes each request after ``steps`` engine steps, one token per step."""

    def __init__(self, steps: int = 3) -> None:
        self.steps, self.live = steps, {}

    def add_request(self, rid: str, prompt: Any, params: Any) -> None:
        self.live[rid] = 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[Any]:
        out = []
        for rid in list(self.live):
            self.live[rid] += 1
            n = self.live[rid]
            out.append(SimpleNamespace(request_id=rid, finished=n == self.steps,
                                       outputs=[SimpleNamespace(token_ids=list(range(n)))]))
            if n == self.steps:
                del self.live[rid]
        return out


def test_open_loop_counts_every_request_and_token() -> None:
    times = [0.0, 0.001, 0.002, 0.003]
    result = goodput.open_loop(_FakeEngine(steps=3), [[1]] * 4, [None] * 4, times, "t")
    assert result["tokens_per_s"] > 0 and result["latency_mean_s"] >= 0
    assert result["latency_p99_s"] >= result["latency_p50_s"]
    assert result["tpot_mean_ms"] >= 0


def test_cli_knows_the_new_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "spec-off", "--reps", "2"])
    assert args.reps == 2 and args.drafters == "recycling,hydra"
    args = parser.parse_args(["bench", "goodput", "--rates", "1,2"])
    assert args.rates == "1,2" and "goodput" in args.arms
    args = parser.parse_args(["calibrate", "--drafters", "recycling"])
    assert args.spec_ks == "0,1,2,4"
    args = parser.parse_args(["serve", "--drafter", "recycling", "--engine-spec-policy", "goodput"])
    assert args.engine_spec_policy == "goodput" and args.spec_policy in ("fixed", "goodput")
