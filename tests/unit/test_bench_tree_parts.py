"""``specserve bench tree-parts`` runs end to end on tiny settings and reports every figure."""

from __future__ import annotations

import argparse
import json

import pytest

from specserve.bench import tree_parts


def test_tree_parts_reports_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    tree_parts.add_arguments(parser)
    assert tree_parts.run(parser.parse_args(["--nodes", "3,5", "--prefix", "130", "--reps", "2"])) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert [r["nodes"] for r in report["rows"]] == [3, 5]
    for row in report["rows"]:
        assert 1 <= row["depth"] <= row["nodes"]
        assert 1 <= row["side_rows"] <= row["nodes"]
        for key in ("native_kernel_ms", "gather_kv_ms", "tree_attention_ms", "verify_greedy_ms", "dynamic_tree_ms",
                    "side_rows_ms"):
            assert row[key] > 0, key
    assert "N=5: native" in out.err
