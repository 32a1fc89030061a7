"""``specserve bench routing``: registered, arguments, and the report's arithmetic."""

from __future__ import annotations

import argparse
import doctest

from specserve.bench import routing
from specserve.commands.bench import BENCHES


def test_registered_and_parses() -> None:
    assert BENCHES["routing"][0] == "routing"
    parser = argparse.ArgumentParser()
    routing.add_arguments(parser)
    args = parser.parse_args(["--replicas", "recycling,hydra", "--concurrency", "1,4", "--reps", "3"])
    assert args.replicas == "recycling,hydra" and args.concurrency == "1,4" and args.reps == 3
    assert parser.parse_args([]).replicas == "hydra,medusa"


def test_docstring_examples() -> None:
    assert doctest.testmod(routing).failed == 0


def test_summary_pairs_arms_within_a_repetition_and_keeps_replica_shares() -> None:
    runs = []
    for rep, (least, good, share_l, share_g) in enumerate([(100.0, 90.0, 0.5, 0.7), (50.0, 55.0, 0.5, 0.8)]):
        runs.append({"arm": "least-loaded", "concurrency": 4, "rep": rep, "tokens_per_s": least,
                     "p50_latency_s": 1.0, "first_share": share_l})
        runs.append({"arm": "goodput", "concurrency": 4, "rep": rep, "tokens_per_s": good,
                     "p50_latency_s": 2.0, "first_share": share_g})
    summary = routing.summarize(runs)["4"]
    assert summary["goodput_vs_least_loaded"] == {"median": 1.0, "min": 0.9, "max": 1.1}
    assert summary["goodput"]["first_replica_share"] == [0.7, 0.8]
    assert summary["least-loaded"]["median_tokens_per_s"] == 75.0 and summary["goodput"]["p50_latency_s"] == 2.0


def test_plain_arm_is_on_by_default_and_each_arm_is_paired_against_it() -> None:
    parser = argparse.ArgumentParser()
    routing.add_arguments(parser)
    assert parser.parse_args([]).plain is True and parser.parse_args(["--no-plain"]).plain is False
    runs = [{"arm": arm, "concurrency": 1, "rep": 0, "tokens_per_s": speed, "p50_latency_s": 1.0, "first_share": 0.5}
            for arm, speed in (("least-loaded", 120.0), ("goodput", 150.0), ("plain", 100.0))]
    summary = routing.summarize(runs)["1"]
    assert summary["goodput_vs_plain"] == {"median": 1.5, "min": 1.5, "max": 1.5}
    assert summary["least_loaded_vs_plain"] == {"median": 1.2, "min": 1.2, "max": 1.2}
    assert routing.summarize(runs[:2])["1"]["goodput_vs_plain"] is None


def test_every_arm_names_a_routing_the_gateway_accepts() -> None:
    from specserve.cli import build_parser

    parser = build_parser()
    for arm in routing.ARMS:
        args = parser.parse_args(["gateway", "--replica=http://127.0.0.1:1", "--routing", routing.routing_of(arm)])
        assert args.routing == routing.routing_of(arm)
