"""``specserve bench trees`` end to end on tiny settings (real engines, demo model, fp32): every
arm is measured at every point, greedy outputs equal no speculation, and trees were verified."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from specserve.bench import trees

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_bench_trees_measures_every_arm_in_turn(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    trees.add_arguments(parser)
    args = parser.parse_args(["--model", str(demo_model_dir), "--drafter", "recycling", "--budgets", "3",
                              "--shapes", "chain,dynamic", "--prompts", "3", "--prompt-tokens", "48",
                              "--max-tokens", "12", "--batch-sizes", "1,2", "--reps", "2", "--seed", "1"])
    assert trees.run(args) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    rows = {(r["shape"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("chain", 1), ("chain", 2), ("dynamic", 1), ("dynamic", 2)}
    for row in rows.values():
        assert row["equal_to_none"] is True  # greedy: every repetition's outputs equal no speculation
        assert len(row["tokens_per_s_runs"]) == 2 and min(row["tokens_per_s_runs"]) > 0
        assert 1.0 <= row["tau"] <= 4.0 and len(row["tau_runs"]) == 2
        assert row["vs_none"]["min"] > 0 and row["vs_best_chain"]["min"] > 0
    assert rows[("chain", 1)]["trees"]["steps"] == 0  # chains verified no tree...
    assert rows[("chain", 1)]["trees"]["walked_chains"] > 0  # ...they were walked
    assert rows[("dynamic", 1)]["trees"]["steps"] > 0  # the dynamic arm verified trees
    assert rows[("dynamic", 1)]["trees"]["whole_batch"] > 0  # batch 1: no rejection sampler
    assert len(report["none_tokens_per_s"]["1@0"]) == 2
    assert report["distinct_prompts"] == 12  # 2 repetitions x 2 batch sizes x 3 prompts, none served twice
    assert "dynamic@3/fixed/bs1/t0" in out.err and "DIFFERS" not in out.err
