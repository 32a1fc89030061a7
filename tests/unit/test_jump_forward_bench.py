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


def test_forced_tool_call_rows_are_judged_by_the_calls_parameters() -> None:
    from types import SimpleNamespace as NS

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    metrics = NS(to_dict=lambda: {"num_draft_tokens": 6, "num_accepted_draft_tokens": 5, "num_spec_steps": 2})

    def row(text: str, constraint: str) -> dict:
        return jsonschema_speculation._row(NS(spec_decode_metrics=metrics, finish_reason="stop", text=text,
                                              token_ids=[1] * 9), schema, constraint)

    call = '[{"name": "tool", "parameters": {"a": 1}}]'
    assert row(call, "required")["valid"] == 1
    assert row(call, "response_format")["valid"] == 0  # an array is not the object
    assert row('[{"name": "tool", "parameters": {"a": "x"}}]', "required")["valid"] == 0
    assert row(call, "required")["accepted"] == 5


def test_summary_line_names_the_forced_tool_call_run() -> None:
    mode = {"tau": 3.0, "tokens_per_forward": 2.5, "requests": 2}
    spec = {"drafter": "recycling", "k": 4, "schemas": 1, "identical": 2, "off": mode, "jump_forward": mode,
            "constraint": "required"}
    assert "forced tool calls: recycling k=4 on 1 schemas" in summary({"seconds": 1.0, "tool_speculation": spec})


def test_an_unknown_constraint_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="constraint must be one of"):
        jsonschema_speculation.speculation_coverage(Path("."), {}, "ngram", 4, 8, lambda s: True, constraint="x")
