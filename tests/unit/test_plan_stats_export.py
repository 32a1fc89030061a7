"""The engine's plan statistics reach ``/metrics``: publisher → snapshot files → collector."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from specserve_vllm.spec_control import export
from specserve_vllm.spec_control.plan import FixedPolicy, StepRows, VerifiedRows
from specserve_vllm.spec_control.planner import StepPlanner


def _families(directory: Path) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(export.PlanStatsCollector(directory))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list, **labels: str) -> float:
    """Sum of the family's samples with ``labels`` (counters' ``_created`` timestamps left out)."""
    return sum(s.value for s in samples
               if not s.name.endswith("_created") and all(s.labels.get(k) == v for k, v in labels.items()))


def _planner_with_steps() -> StepPlanner:
    planner = StepPlanner(FixedPolicy(), 4)
    rows = StepRows(req_ids=("a", "b"), caps=np.array([4, 2]), context=np.array([10, 20]))
    planner.plan(rows)  # [4, 2]
    planner.plan(StepRows(req_ids=("a",), caps=np.array([0]), context=np.array([11])))  # prefill: no rows
    planner.observe(VerifiedRows(req_ids=("a", "b"), drafted=np.array([4, 2]), accepted=np.array([1, 2])))
    planner.record_drafting(6, 4, 1.5)
    planner.observe_hindsight(["c"], np.array([0.7]), np.array([0.25]))
    return planner


def test_publisher_writes_the_planner_snapshot_and_the_collector_serves_it(tmp_path: Path) -> None:
    planner = _planner_with_steps()
    publisher = export.StatsPublisher(tmp_path / "engine-1.json", planner.snapshot, planner.lock, interval_s=60)
    assert publisher.publish() is True
    assert publisher.publish() is False  # unchanged: not rewritten
    written = json.loads((tmp_path / "engine-1.json").read_text())
    assert written["steps"] == 2 and written["policy"] == "fixed"
    families = _families(tmp_path)
    assert _value(families["specserve_engine_spec_plans"]) == 2
    assert _value(families["specserve_engine_spec_drafter_calls"]) == 1
    assert _value(families["specserve_engine_spec_hindsight_rows"]) == 1
    assert _value(families["specserve_engine_spec_hindsight_accepted"]) == 0.25
    assert _value(families["specserve_engine_spec_rows_by_k"], k="4") == 1
    assert _value(families["specserve_engine_spec_drafts_by_batch"], batch="2-3") == 6
    assert _value(families["specserve_engine_spec_no_spec_plans_by_batch"], batch="0") == 1
    # Row a: position 1 accepted, position 2 rejected; row b: both accepted.
    assert _value(families["specserve_engine_spec_position_tested"], position="2") == 2
    assert _value(families["specserve_engine_spec_position_accepted"], position="2") == 1
    assert _value(families["specserve_engine_spec_policy"], policy="fixed") == 1


def test_two_engine_cores_add_up_and_a_torn_file_is_skipped(tmp_path: Path) -> None:
    planner = _planner_with_steps()
    for pid in (1, 2):
        export.write_atomically(tmp_path / f"engine-{pid}.json", planner.snapshot())
    (tmp_path / "engine-3.json").write_text("{not json")
    families = _families(tmp_path)
    assert _value(families["specserve_engine_spec_plans"]) == 4
    assert _value(families["specserve_engine_spec_rows_by_batch"], batch="2-3") == 4


def test_an_empty_directory_still_serves_zeroes(tmp_path: Path) -> None:
    assert _value(_families(tmp_path)["specserve_engine_spec_plans"]) == 0


def test_the_background_thread_publishes_what_changed(tmp_path: Path) -> None:
    planner = StepPlanner(FixedPolicy(), 4)
    path = tmp_path / "sub" / "engine-7.json"
    planner.publish_to(path)
    planner.plan(StepRows(req_ids=("a",), caps=np.array([3]), context=np.array([5])))
    done = threading.Event()
    for _ in range(200):  # polled on the file itself: written within a few intervals
        if path.exists() and json.loads(path.read_text())["steps"] == 1:
            done.set()
            break
        done.wait(0.05)
    planner.publisher.stop()
    assert done.is_set(), f"no snapshot with steps=1 at {path}"


def test_only_the_api_server_chooses_a_directory(tmp_path: Path, monkeypatch) -> None:
    env: dict[str, str] = {}
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert export.prepare_stats_dir(env) is None and not env
    env = {export.STATS_DIR_ENV: str(tmp_path)}
    assert export.prepare_stats_dir(env) == str(tmp_path)
    monkeypatch.setattr("sys.argv", ["/venv/bin/vllm", "serve", "model"])
    env = {}
    chosen = export.prepare_stats_dir(env)
    assert chosen and Path(chosen).is_dir() and env[export.STATS_DIR_ENV] == chosen


def test_the_goodput_policy_exports_its_cost_model_and_the_gateway_reads_it_back(tmp_path: Path) -> None:
    from specserve.gateway.engine_model import engine_budget, parse_page
    from specserve_vllm.spec_control.acceptance import AcceptanceModel
    from specserve_vllm.spec_control.goodput import GoodputPolicy
    from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel

    cost = StepCost(base=8, per_token=0.5, per_row=0, context=0, spec=1, spec_row=0, draft=0.5, draft_token=0.05)
    policy = GoodputPolicy(StepTimeModel(cost), AcceptanceModel([0.8, 0.7, 0.6, 0.5]))
    policy.observe_step(4, 4, 0, False, 0, step_ms=20.0, drafts=0, draft_ms=0.0)  # a slower machine
    for n, depth in ((4, 1), (16, 4), (4, 4), (16, 2)) * 15:  # drafting: a higher fixed cost, a lower cost
        policy.observe_step(4, 4 + n, 0, True, 0, step_ms=2 * cost.step_ms(4, 4 + n, 0, True), drafts=n,
                            draft_ms=1.0 + 0.02 * n + 0.1 * depth, draft_depth=depth)  # per draft, 0.1 a position
    planner = StepPlanner(policy, 4)
    export.StatsPublisher(tmp_path / "engine-1.json", planner.snapshot, planner.lock, interval_s=60).publish()
    registry = CollectorRegistry()
    registry.register(export.PlanStatsCollector(tmp_path))  # type: ignore[arg-type]
    model = parse_page(generate_latest(registry).decode())
    assert model is not None
    assert model.cost["base"] > 8 and model.cost["draft_token"] == 0.05  # fitted step terms, calibrated drafting terms
    assert model.acceptance == (0.8, 0.7, 0.6, 0.5)
    state = policy.model.state()
    assert model.cost == pytest.approx(state["cost"])
    for rows, tokens, spec in ((4, 4, False), (4, 20, True), (1, 1, False), (16, 80, True)):
        assert model.step_model().step_ms(rows, tokens, 0, spec) == pytest.approx(
            policy.model.step_ms(rows, tokens, 0, spec), rel=1e-3)
    assert policy.model.step_ms(4, 4, 0, False) > 1.2 * cost.step_ms(4, 4, 0, False)  # the fit reached the page
    fixed, per_draft, per_position = policy.model.draft_correction
    assert fixed > 1.2 and per_draft < 0.8 and per_position > 0  # the drafting terms moved, apart
    assert model.draft_correction == pytest.approx((fixed, per_draft, per_position), abs=1e-4)
    for n, depth in ((4, 1), (16, 4), (16, 1)):
        assert model.step_model().draft_ms(n, depth) == pytest.approx(policy.model.draft_ms(n, depth), rel=1e-3)
    assert _value(_families(tmp_path)["specserve_engine_spec_probes"]) == 0  # it never ran off long enough
    # The gateway's budget is the engine's own choice for identical rows.
    for batch in (1, 4, 16, 64):
        rows = StepRows(tuple(str(i) for i in range(batch)), np.full(batch, 4), np.zeros(batch))
        planned = GoodputPolicy(StepTimeModel.from_state(state), AcceptanceModel([0.8, 0.7, 0.6, 0.5]),
                                margin=0.0)  # the gateway decides once: no hysteresis
        assert engine_budget(model, batch, k_max=4) == int(planned.plan(rows).max()), batch


def test_a_fixed_policy_exports_no_cost_model(tmp_path: Path) -> None:
    from specserve.gateway.engine_model import parse_page

    planner = _planner_with_steps()
    export.StatsPublisher(tmp_path / "engine-1.json", planner.snapshot, planner.lock, interval_s=60).publish()
    assert "specserve_engine_step_cost_ms" not in _families(tmp_path)
    registry = CollectorRegistry()
    registry.register(export.PlanStatsCollector(tmp_path))  # type: ignore[arg-type]
    assert parse_page(generate_latest(registry).decode()) is None


def test_tree_counters_reach_metrics_summed_over_engine_cores(tmp_path: Path) -> None:
    from specserve_vllm.tree.step import TreeCounters

    planner = _planner_with_steps()
    export.write_atomically(tmp_path / "engine-0.json", planner.snapshot())
    assert "specserve_engine_tree_steps" not in _families(tmp_path)  # no tree verified: no families
    trees = TreeCounters(steps=3, verified=5, accepted_nodes=6, compacted=2, grammar=1, whole_batch=2,
                         walked_chains=7)
    for depth, accepted in ((3, 0), (3, 2), (2, 2), (1, 1), (3, 1)):
        trees.record_depths(depth, accepted)
    planner.trees = trees
    for pid in (1, 2):
        export.write_atomically(tmp_path / f"engine-{pid}.json", planner.snapshot())
    families = _families(tmp_path)
    assert _value(families["specserve_engine_tree_steps"]) == 6
    assert _value(families["specserve_engine_tree_verifications"]) == 10
    assert _value(families["specserve_engine_tree_accepted_nodes"]) == 12
    assert _value(families["specserve_engine_tree_compactions"]) == 4
    assert _value(families["specserve_engine_tree_grammar_verifications"]) == 2
    assert _value(families["specserve_engine_tree_whole_batch_steps"]) == 4
    assert _value(families["specserve_engine_walked_chain_steps"]) == 14
    # per core: depth 1 tested by all 5, accepted by 4; depth 2 tested 3, accepted 2; depth 3 tested 1
    assert [_value(families["specserve_engine_tree_depth_tested"], depth=str(d)) for d in (1, 2, 3)] == [10, 6, 2]
    assert [_value(families["specserve_engine_tree_depth_accepted"], depth=str(d)) for d in (1, 2, 3)] == [8, 4, 0]


def test_the_controllers_probes_reach_the_metrics(tmp_path: Path) -> None:
    from specserve_vllm.spec_control.acceptance import AcceptanceModel
    from specserve_vllm.spec_control.goodput import GoodputPolicy
    from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel

    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)
    policy = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), probe_every=4, probe_max=4)
    rows = StepRows(tuple(str(i) for i in range(16)), np.full(16, 4), np.zeros(16))
    for _ in range(12):
        policy.plan(rows)
    planner = StepPlanner(policy, 4)
    export.StatsPublisher(tmp_path / "engine-1.json", planner.snapshot, planner.lock, interval_s=60).publish()
    assert _value(_families(tmp_path)["specserve_engine_spec_probes"]) == 3


def test_acceptance_by_sampling_class_reaches_the_gateway_which_prices_each_request_at_its_own(tmp_path: Path) -> None:
    from specserve.gateway.engine_model import engine_budget, marginal_goodput, parse_page
    from specserve_vllm.spec_control.acceptance import AcceptanceModel
    from specserve_vllm.spec_control.goodput import GoodputPolicy
    from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel

    cost = StepCost(base=8, per_token=0.5, per_row=0, context=0, spec=1, spec_row=0, draft=0.5, draft_token=0.05)
    policy = GoodputPolicy(StepTimeModel(cost), AcceptanceModel([0.8] * 4))
    for step in range(400):
        ids = (f"g{step}", f"s{step}")
        policy.plan(StepRows(ids, np.full(2, 4), np.zeros(2), classes=np.array([0, 2])))
        policy.observe(VerifiedRows(ids, np.array([4, 4]), np.array([4, 0])))
    planner = StepPlanner(policy, 4)
    export.StatsPublisher(tmp_path / "engine-1.json", planner.snapshot, planner.lock, interval_s=60).publish()
    assert "specserve_engine_acceptance_by_sampling_ratio" in _families(tmp_path)
    registry = CollectorRegistry()
    registry.register(export.PlanStatsCollector(tmp_path))  # type: ignore[arg-type]
    model = parse_page(generate_latest(registry).decode())
    assert model is not None and set(model.acceptance_by_class) == {"greedy", "le_1"}
    assert model.acceptance_by_class["greedy"][0] > 0.9 > 0.2 > model.acceptance_by_class["le_1"][0]
    assert engine_budget(model, 1, k_max=4, temperature=0.0) == 4
    assert engine_budget(model, 1, k_max=4, temperature=0.7) == 0
    assert engine_budget(model, 1, k_max=4, temperature=1.5) == engine_budget(model, 1, k_max=4)  # unseen class
    # goodput routing prices the request at its own class too: a drafting replica is worth more
    # to a greedy request than to a sampled one, whose drafts this engine rejects
    assert marginal_goodput(model, 1, 4, temperature=0.0) > marginal_goodput(model, 1, 4, temperature=0.7)
    assert marginal_goodput(model, 1, 4, temperature=0.7) == pytest.approx(marginal_goodput(model, 1, 0))
