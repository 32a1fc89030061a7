"""``specserve calibrate`` end to end on a tiny grid (real engine, demo model): it writes a
calibration the engine can load, and reports the fit's error cell by cell of the grid."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from specserve.commands import calibrate
from specserve_vllm.spec_control.step_time import Calibration

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_calibrate_writes_a_loadable_file_and_errors_by_cell(demo_model_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    out = tmp_path / "calibration.json"
    args = parser.parse_args(["--model", str(demo_model_dir), "--drafters", "recycling", "--batch-sizes", "1,2",
                              "--spec-ks", "0,2", "--max-tokens", "10", "--prior-tokens", "14", "--prompt-tokens", "48",
                              "--temperatures", "", "--timing-temperatures", "0,0.7", "--rounds", "2",
                              "--out", str(out)])
    assert calibrate.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    loaded = Calibration.load(out)
    assert set(loaded.drafter_cost) == set(summary["cells"]) and len(loaded.drafter_cost) == 1
    # the greedy prior comes from its own pass over --prior-tokens outputs, one rate per position
    (name, prior), = loaded.acceptance.items()
    assert len(prior) == 4 and all(0.0 <= p <= 1.0 for p in prior)
    assert loaded.acceptance_by_class[name] == {"greedy": prior}
    cells = next(iter(summary["cells"].values()))
    assert [(c["batch"], c["spec_k"], c["temperature"]) for c in cells] == [
        (b, k, t) for b in (1, 2) for k in (0, 2) for t in (0.0, 0.7)]
    # sampled rows are a term of the step model, fitted from the sampled cells (>= 0 by construction)
    assert "sampled" in summary["cost"] and summary["cost"]["sampled"] >= 0.0
    # two passes over the grid: at 10 tokens a request, a cell of one pass has at most 10 decode steps
    assert all(c["steps"] > 10 for c in cells if c["spec_k"] == 0)
    for cell in cells:
        assert cell["steps"] > 0 and cell["step_ms"] > 0 and cell["predicted_ms"] > 0
        # drafting only where the cell speculates; its prediction from the fitted drafting terms
        assert ("draft_ms" in cell) == (cell["spec_k"] > 0)
        if cell["spec_k"]:
            assert cell["draft_predicted_ms"] > 0 and "draft_per_draft_only_ms" in cell
