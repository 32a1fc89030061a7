"""``specserve bench controller``: the controller's warm cost per call, by batch size.

The figure it reports replaced a timed unit test (a decision under 400 µs): timing goals live in
benchmarks. What is checked here is that it times what it says it times."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from specserve.bench import controller


def test_every_call_it_times_is_a_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """A held plan would time a tuple comparison: each timed call must reach the decision."""
    from specserve_vllm.spec_control.goodput import GoodputPolicy

    decisions = []
    learnt = []
    real_plan, real_learn = GoodputPolicy.plan, GoodputPolicy.learn

    def plan(self: GoodputPolicy, rows: object) -> np.ndarray:
        out = real_plan(self, rows)
        decisions.append(self._steps)  # 1 right after a decision; a reused plan would not reach here
        return out

    def learn(self: GoodputPolicy) -> None:
        learnt.append(len(self._unlearned))
        real_learn(self)

    monkeypatch.setattr(GoodputPolicy, "plan", plan)
    monkeypatch.setattr(GoodputPolicy, "learn", learn)
    from specserve_vllm.spec_control.step_time import DEFAULT_CALIBRATION, Calibration

    point = controller.measure(8, 4, calls=5, batches=2, calibration=Calibration.load(DEFAULT_CALIBRATION),
                               drafter="HydraProposer")
    assert len(decisions) == 1 + 5 * 3  # one before timing, then (warm + 2 timed batches) x 5 calls
    assert set(decisions) == {1}
    assert 1 in learnt and 4 in learnt  # one step's verifications; four steps' in one fold (held)
    assert point["batch"] == 8 and point["decide_us"] > 0 and point["learn_us"] > 0
    share = (point["decide_us"] + point["learn_us"]) / (point["plain_step_ms"] * 1e3)
    assert point["share_of_step"] == pytest.approx(share, rel=0.01, abs=1e-4)  # both from rounded figures
    held = (point["decide_us"] / 4 + point["learn_held_us"]) / (point["plain_step_ms"] * 1e3)
    assert point["share_of_step_held"] == pytest.approx(held, rel=0.01, abs=1e-4)


def test_the_report_has_a_point_per_batch_size_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(batch_sizes="1,16", k=4, calls=3, batches=2, calibration=None, drafter="HydraProposer",
                              held=4)
    assert controller.run(args) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert [p["batch"] for p in report["points"]] == [1, 16]
    assert report["points"][1]["plain_step_ms"] > report["points"][0]["plain_step_ms"]
    summary = err.strip().splitlines()[-1]  # the last line (other tests' loggers may write to stderr too)
    assert summary.startswith("bench controller: b1 decide ") and "b16 decide" in summary
