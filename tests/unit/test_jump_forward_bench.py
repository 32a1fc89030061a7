"""Pure parts of the jump-forward τ measurement in `specserve bench jsonschema --parts speculation`."""

from __future__ import annotations

from pathlib import Path

from specserve.bench import jsonschema_speculation
from specserve.bench.jsonschema import summary
from specserve.cli import build_parser


def test_totals_without_drafts() -> None:
    t = jsonschema_speculation.speculation_totals(
        [{"tokens": 5, "drafted": 0, "accepted": 0, "spec_steps": 0, "finished": 1, "valid": 1}]
    )
    assert (t["tau"], t["tokens_per_forward"], t["acceptance_rate"]) == (1.0, 1.0, None)


def test_summary_line_names_both_modes() -> None:
    mode = {"tau": 2.0, "tokens_per_forward": 1.5, "requests": 2}
    spec = {"drafter": "ngram", "k": 4, "schemas": 1, "identical": 2, "off": mode, "jump_forward": mode}
    line = summary({"seconds": 1.0, "speculation": spec})
    assert line.startswith("jsonschema: ngram k=4 on 1 schemas: tau 2.0 -> 2.0")
    assert line.endswith("1.0 s") and "\n" not in line


def test_cli_speculation_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["bench", "jsonschema", "--data", str(tmp_path), "--parts", "speculation",
         "--spec-drafter", "recycling", "--spec-k", "3"]
    )
    assert (args.parts, args.spec_drafter, args.spec_k) == ("speculation", "recycling", 3)
