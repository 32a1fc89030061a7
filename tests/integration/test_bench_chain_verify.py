"""``specserve bench chain-verify`` end to end on tiny settings (real engines, demo model, fp32):
every arm is measured at every point, greedy outputs equal no speculation for both verifiers,
and only the ``walk`` engine walked its chains."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from specserve.bench import chain_verify

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_bench_chain_verify_measures_both_verifiers(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    chain_verify.add_arguments(parser)
    args = parser.parse_args(["--model", str(demo_model_dir), "--k", "3", "--prompts", "3", "--prompt-tokens", "48",
                              "--max-tokens", "12", "--batch-sizes", "1,2", "--temperatures", "0,0.7",
                              "--reps", "2", "--seed", "1"])
    assert chain_verify.run(args) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    rows = {(r["batch"], r["temperature"]): r for r in report["rows"]}
    assert set(rows) == {(1, 0.0), (2, 0.0), (1, 0.7), (2, 0.7)}
    for (_, temp), row in rows.items():
        assert all(len(row["tokens_per_s"][arm]) == 2 and min(row["tokens_per_s"][arm]) > 0
                   for arm in chain_verify.ARMS)
        assert row["walked_steps_walk"] > 0 and row["walked_steps_rejection"] == 0
        assert 1.0 <= row["tau_walk"] <= 4.0 and 1.0 <= row["tau_rejection"] <= 4.0
        assert row["walk_vs_rejection"]["min"] > 0 and row["walk_vs_rejection_per_step"]["min"] > 0
        expected = True if temp == 0 else None
        assert row["equal_to_none_walk"] is expected and row["equal_to_none_rejection"] is expected
    assert "bs1/t0: walk x" in out.err and "DIFFERS" not in out.err
