"""``specserve bench spec-policy``: registered, arguments, pure parts."""

from __future__ import annotations

import argparse

from specserve.bench import spec_policy
from specserve.commands.bench import BENCHES


def test_registered_and_parses() -> None:
    assert BENCHES["spec-policy"][0] == "spec_policy"
    parser = argparse.ArgumentParser()
    spec_policy.add_arguments(parser)
    args = parser.parse_args(["--concurrency", "1,8", "--goodput-args=--spec-step-base-ms 7"])
    assert args.concurrency == "1,8" and args.goodput_args.split() == ["--spec-step-base-ms", "7"]
    assert args.drafter == "recycling" and args.k == 4
