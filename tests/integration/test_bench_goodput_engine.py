"""``specserve bench goodput`` end to end on tiny settings (real engines, demo model, fp32): every
arm runs at every closed-loop point, the tree arm verifies trees under the goodput controller,
and each point judges ``goodput`` against the baselines and the tree arm against the chain arms."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from specserve.bench import goodput

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ARMS = ("none", "k2", "goodput", goodput.TREE_ARM)


def test_bench_goodput_runs_every_arm_and_judges_the_tree_arm(demo_model_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    goodput.add_arguments(parser)
    args = parser.parse_args(["--model", str(demo_model_dir), "--arms", ",".join(ARMS), "--parts", "closed",
                              "--concurrency", "1,2", "--reps", "2", "--requests", "3", "--mean-output", "12",
                              "--prompt-tokens", "48", "--temperatures", "0", "--tree-budget", "6", "--seed", "2"])
    assert goodput.run(args) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    points = report["closed"]["t0"]
    assert set(points) == {"1", "2"}
    for pt in points.values():
        assert set(pt["arms"]) == set(ARMS)
        assert all(pt["arms"][a]["reps"] == 2 and pt["arms"][a]["tokens_per_s"] > 0 for a in ARMS)
        assert pt["paired_throughput"]["best"] in {"none", "k2", "goodput"}
        for key in ("tree_paired_latency", "tree_paired_throughput", "tree_paired_cpu_throughput"):
            assert pt[key]["best"] in ARMS and pt[key]["verdict"] in ("within", "beyond", "undecided")
        tree = pt["arms"][goodput.TREE_ARM]
        assert "plan" in tree and all(p["plans"] > 0 for p in tree["plan"])
        assert "trees_verified" not in pt["arms"]["goodput"]
    # the controller tries trees at every batch size it has not priced yet (it may then keep
    # chains where they pay more), so the tree engine verified trees at some point
    tree_arms = [pt["arms"][goodput.TREE_ARM] for pt in points.values()]
    assert sum(a["trees_verified"] for a in tree_arms) > 0
    assert all(a["tree_nodes_accepted"] >= 0 for a in tree_arms)
    assert f"{goodput.TREE_ARM} against the best chain arm, paired:" in out.err
    # 2 points x 2 repetitions x 3 requests per arm, each a window no engine had served before
    assert report["prompts"]["served_per_arm"] == 12 and report["prompts"]["repeats_per_arm"] == 0
    assert report["prompts"]["distinct"] > 12
