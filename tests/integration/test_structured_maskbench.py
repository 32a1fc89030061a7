"""`specserve bench jsonschema` on the small test copy of JSONSchemaBench with the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specserve.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "jsonschemabench"


def test_maskbench_agreement_on_served_schemas(
    demo_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        ["bench", "jsonschema", "--data", str(DATA), "--model", str(demo_model_dir),
         "--parts", "maskbench"]
    )
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    total = result["maskbench"]["total"]
    assert total["schemas"] >= 20
    assert total["compiled"] == total["schemas"]
    assert total["served_instances"] >= 50
    # Schemas the gateway serves are classified exactly like their valid flags.
    assert total["served_agree"] == total["served_instances"]
    # Mask fills were timed on the way, per dataset and overall.
    assert 0 < total["mask_fill_us_p50"] <= total["mask_fill_us_p99"]
    assert all(row["mask_fill_us_p50"] for row in result["maskbench"]["per_dataset"].values()
               if row["compiled"])
    assert captured.err.strip().splitlines()[-1].startswith("jsonschema: maskbench agreement")
