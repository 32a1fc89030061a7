"""Pure parts of `specserve bench jsonschema` and the bench sub-command dispatch."""

from __future__ import annotations

from pathlib import Path

from specserve.bench.jsonschema import summary
from specserve.bench.jsonschema_grammar import _with_totals, compact, dataset_of, percentile
from specserve.cli import build_parser


def test_dataset_names() -> None:
    assert dataset_of(Path("Github_easy---o10008.json")) == "Github_easy"
    assert dataset_of(Path("BFCL_parallel_multiple_7.json")) == "BFCL_parallel_multiple"
    assert dataset_of(Path("Handwritten---a_1.json")) == "Handwritten"


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) is None


def test_totals_and_rates() -> None:
    out = _with_totals(
        {"a": {"agree": 3, "instances": 4}, "b": {"agree": 1, "instances": 0}},
        ("agree", "instances"),
    )
    assert out["total"] == {"agree": 4, "instances": 4, "agree_rate": 1.0}
    assert out["per_dataset"]["a"]["agree_rate"] == 0.75
    assert out["per_dataset"]["b"]["agree_rate"] is None


def test_compact_is_what_the_engine_emits() -> None:
    assert compact({"a": [1, "é"]}) == '{"a":[1,"é"]}'


def test_summary_line() -> None:
    line = summary(
        {
            "seconds": 2.5,
            "maskbench": {"total": {"agree_rate": 0.99, "instances": 10,
                                    "served_agree_rate": 1.0, "served_instances": 8}},
        }
    )
    assert line.startswith("jsonschema: maskbench agreement 0.99 of 10")
    assert "\n" not in line


def test_cli_dispatches_bench_by_name(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["bench", "jsonschema", "--data", str(tmp_path), "--limit", "3"]
    )
    assert args.bench == "jsonschema"
    assert args.limit == 3
    assert args.data == tmp_path
