"""The engine's per-step goodput controller: its pure parts, the step timer patch and the wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from specserve.engine.process import EngineSpec, engine_command
from specserve_vllm.compat import step_timer
from specserve_vllm.spec_control.acceptance import AcceptanceModel
from specserve_vllm.spec_control.goodput import PREFILL_ESTIMATES, GoodputPolicy
from specserve_vllm.spec_control.plan import StepRows, VerifiedRows
from specserve_vllm.spec_control.planner import PlannerSettings, StepPlanner, build_policy
from specserve_vllm.spec_control.step_time import (
    DEFAULT_CALIBRATION,
    Calibration,
    StepCost,
    STEP_TERMS,
    StepTimeModel,
    fit_cost,
)

# Roughly the demo model on 2 cores: ~9 ms a step at batch 1, ~25 ms at 8; spec path ~3 ms + 0.4/row.
COST = StepCost(base=6.0, per_token=1.0, per_row=1.0, context=0.0, spec=2.0, spec_row=0.4, draft=0.3,
                draft_token=0.05)
DEEP = replace(COST, draft=0.2, draft_token=0.035, draft_depth=0.32)
"""Drafting with a cost per position (Hydra's shape on the demo model)."""


def _rows(n: int, cap: int = 4, ctx: int = 200) -> StepRows:
    return StepRows(tuple(f"r{i}" for i in range(n)), np.full(n, cap), np.full(n, ctx))


def _policy(rate: float, cost: StepCost = COST) -> GoodputPolicy:
    return GoodputPolicy(StepTimeModel(cost), AcceptanceModel([rate] * 4))


def test_describe_splits_decode_and_prefill_tokens() -> None:
    out = SimpleNamespace(num_scheduled_tokens={"a": 3, "b": 1, "c": 16}, total_num_scheduled_tokens=20,
                          scheduled_spec_decode_tokens={"a": [5, 6]})
    step = step_timer.describe(out, ["a", "b", "c"], ctx_tokens=99)
    assert step == {"rows": 3, "tokens": 20, "ctx_tokens": 99, "spec": True, "drafts_verified": 2,
                    "prefill_tokens": 16, "sampled": 0}
    # a sampled decode row draws its token and each draft; a sampled prefill row draws one token
    sampled = step_timer.describe(out, ["a", "b", "c"], ctx_tokens=99, temperatures=[0.7, 1.0, 0.0])
    assert sampled["sampled"] == 3 + 1
    assert step_timer.describe(out, ["a", "b", "c"], 99, temperatures=[0.0, 0.0, 0.5])["sampled"] == 1


def test_idle_speculates_and_a_full_batch_of_poor_drafts_does_not() -> None:
    assert _policy(0.8).plan(_rows(1)).tolist() == [4]
    assert _policy(0.3).plan(_rows(16)).tolist() == [0] * 16


def test_plan_is_within_caps_and_skips_rows_that_are_not_decoding() -> None:
    rows = StepRows(("a", "b", "c"), np.array([2, 0, 4]), np.array([50, 500, 50]))
    plan = _policy(0.9).plan(rows)
    assert plan[1] == 0 and 0 < plan[0] <= 2 and 0 < plan[2] <= 4


def test_better_requests_get_longer_drafts() -> None:
    policy = _policy(0.6)
    for _ in range(10):
        policy.observe(VerifiedRows(("good", "bad"), np.array([4, 4]), np.array([4, 0])))
    plan = policy.plan(StepRows(("good", "bad"), np.array([4, 4]), np.array([100, 100])))
    assert plan[0] > plan[1], plan


def test_no_spec_is_priced_without_spec_path_or_drafting() -> None:
    g, _, times = _policy(0.5).goodput(_rows(8))
    assert times[0] == pytest.approx(COST.step_ms(8, 8, 1600, spec=False))
    assert times[1] == pytest.approx(COST.step_ms(8, 9, 1600, spec=True) + COST.draft_ms(1))
    assert g[0] == pytest.approx(8 / times[0])


def _set_step_term(policy: GoodputPolicy, term: int, ms: float) -> None:
    coef = list(policy.model.step_fit.coef)
    coef[term] = ms
    policy.model.step_fit.coef = tuple(coef)


def _spec_priced_so_off_leads_by(lead: float, rate: float = 0.8) -> GoodputPolicy:
    """A policy whose spec path's fixed cost makes "off" ``lead`` better than the best "on"
    (bisection on the ``spec`` coefficient)."""
    spec = STEP_TERMS.index("spec")
    lo, hi = COST.spec, COST.spec + 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([rate] * 4), margin=0.03)
        _set_step_term(policy, spec, mid)
        g, _, _ = policy.goodput(_rows(4))
        lo, hi = (mid, hi) if g[1:].max() * (1 + lead) > g[0] else (lo, mid)
    policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([rate] * 4), margin=0.03)
    _set_step_term(policy, spec, hi)
    g, _, _ = policy.goodput(_rows(4))
    assert g[0] == pytest.approx(g[1:].max() * (1 + lead), rel=1e-6)
    return policy


def test_hysteresis_keeps_the_current_side_near_the_break_even() -> None:
    # "Off" 1% better than the best "on": a speculating policy stays on, an idle one stays off.
    policy = _spec_priced_so_off_leads_by(0.01)
    assert policy.plan(_rows(4)).sum() > 0
    policy.speculating = False
    assert policy.plan(_rows(4)).sum() == 0


def test_online_fit_tracks_a_slower_machine() -> None:
    model = StepTimeModel(COST, alpha=0.2)
    for _ in range(40):
        model.observe(8, 8, 1600, False, measured_ms=2 * COST.step_ms(8, 8, 1600, False))
    assert model.step_ms(8, 8, 1600, False) == pytest.approx(2 * COST.step_ms(8, 8, 1600, False), rel=0.01)
    # One fit over every step: the other batch sizes and the spec path slow down with it.
    for rows in (1, 4, 16):
        assert 1.5 < model.step_ms(rows, rows, 200 * rows, False) / COST.step_ms(rows, rows, 200 * rows, False) < 2.5
    assert model.step_ms(8, 40, 1600, True) > 1.5 * COST.step_ms(8, 40, 1600, True)


def test_a_rarely_run_batch_size_is_priced_from_the_others() -> None:
    """Measured on the demo model: plain steps cost about 3.9 ms + 0.2 ms a row, against a
    calibration of 2.7 + 0.09 a row. Waves of 8-row steps with a few 1-row ones teach the
    fit both ends, so 3-row steps (the tail of a wave) are priced within 5% before any runs."""
    cost = StepCost(base=2.7, per_token=0.028, per_row=0.059, context=0.0, spec=0.72, spec_row=0.062,
                    draft=0.93, draft_token=0.061)
    model = StepTimeModel(cost)

    def measured(rows: int) -> float:
        return 3.9 + 0.2 * rows

    for _ in range(10):
        for rows in (8,) * 12 + (1,) * 3:
            model.observe(rows, rows, 200 * rows, False, measured(rows))
    assert abs(model.step_ms(3, 3, 600, False) / measured(3) - 1) < 0.05


def test_fit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    records = []
    for _ in range(200):
        rows = int(rng.integers(1, 17))
        spec = bool(rng.integers(0, 2))
        drafts = int(rng.integers(0, 4 * rows + 1)) if spec else 0
        depth = min(drafts, int(rng.integers(1, 5)))
        tokens = rows + drafts
        ctx = int(rng.integers(100, 300)) * rows
        records.append({"rows": rows, "tokens": tokens, "ctx_tokens": ctx, "spec": spec, "drafts": drafts,
                        "draft_depth": depth, "step_ms": COST.step_ms(rows, tokens, ctx, spec),
                        "draft_ms": DEEP.draft_ms(drafts, depth)})
    fitted = fit_cost(records)
    for name in ("base", "per_token", "per_row", "spec", "spec_row"):
        assert getattr(fitted, name) == pytest.approx(getattr(COST, name), abs=1e-3), name
    for name in ("draft", "draft_token", "draft_depth"):
        assert getattr(fitted, name) == pytest.approx(getattr(DEEP, name), abs=1e-3), name


def test_verified_drafts_are_priced_apart_from_prefill_tokens() -> None:
    """Measured at one row on the demo model: a verified draft costs more than a prefill token.
    The calibration fit and the online fit both learn it, so the controller's price of one more
    draft follows the verified drafts, not the prefills."""
    truth = StepCost(base=3.7, per_token=0.42, per_row=0.23, context=0.0, spec=0.35, spec_row=0.0, draft=0.22,
                     draft_token=0.001, spec_token=0.2)
    steps = [(1, 128, False, 0)] + [(1, 1, False, 0)] * 3 + [(1, 1 + n, True, n) for n in (1, 2, 3, 4)] * 3
    records = [{"rows": r, "tokens": t, "ctx_tokens": 0, "spec": s, "drafts_verified": v, "drafts": v,
                "step_ms": truth.step_ms(r, t, 0, s, v), "draft_ms": truth.draft_ms(v)} for r, t, s, v in steps]
    fitted = fit_cost(records)
    assert fitted.spec_token == pytest.approx(0.2, abs=1e-3) and fitted.per_token == pytest.approx(0.42, abs=1e-3)
    # Online, from a calibration without the term (one price per token, as before it): the
    # verified count moves the price of a draft toward the truth (0.621); without it, it stays
    # near the prefill's price. (The fit's pull toward the calibration keeps part of the gap.)
    def per_draft_after(verified: bool) -> float:
        model = StepTimeModel(StepCost(base=3.7, per_token=0.42, per_row=0.23, context=0.0, spec=0.77,
                                       spec_row=0.55, draft=0.22, draft_token=0.001))
        for _ in range(30):
            for r, t, s, v in steps:
                model.observe(r, t, 0, s, truth.step_ms(r, t, 0, s, v), verified=v if verified else 0)
        return model.chain_terms(1, 1, 0)[2]

    assert per_draft_after(True) > 0.52 > 0.46 > per_draft_after(False)


def test_sampled_rows_are_a_term_of_their_own_in_both_fits() -> None:
    """A row at temperature > 0 draws its token and each verified draft from its sampling law:
    a cost per drawn row that a greedy grid cannot see. The calibration fit separates it from
    the other terms given sampled and greedy steps, and the online fit learns it from a
    calibration written before the term."""
    truth = replace(COST, spec_token=0.05, sampled=0.3)
    steps = [(r, r * (1 + k), k > 0, r * k, s * r * (1 + k)) for r in (1, 4, 8) for k in (0, 1, 2, 4) for s in (0, 1)]
    records = [{"rows": r, "tokens": t, "ctx_tokens": 0, "spec": sp, "drafts_verified": v, "sampled": n,
                "step_ms": truth.step_ms(r, t, 0, sp, v, n)} for r, t, sp, v, n in steps]
    assert fit_cost(records).sampled == pytest.approx(0.3, abs=1e-3)
    assert fit_cost([{**r, "sampled": 0} for r in records]).sampled == 0.0  # a greedy view cannot see it
    model = StepTimeModel(replace(truth, sampled=0.0))
    before = model.step_ms(8, 16, 0, True, 8, sampled=16)
    for _ in range(40):  # about a thousand steps: per_token takes the cost first, then gives it back
        for r, t, sp, v, n in steps:
            model.observe(r, t, 0, sp, truth.step_ms(r, t, 0, sp, v, n), verified=v, sampled=n)
    after = model.step_ms(8, 16, 0, True, 8, sampled=16)
    assert abs(after - truth.step_ms(8, 16, 0, True, 8, 16)) < 0.25 * abs(before - truth.step_ms(8, 16, 0, True, 8, 16))
    assert model.step_fit.coef[STEP_TERMS.index("sampled")] > 0.15


def test_a_sampled_rows_drafts_are_priced_dearer_than_a_greedy_rows() -> None:
    """The same rows and acceptance: drafting is worth less where each draft is a draw over the
    vocabulary, so a sampled batch drafts less, and its plain step is dearer too."""
    cost = replace(COST, sampled=0.8)
    greedy = StepRows(tuple(f"r{i}" for i in range(4)), np.full(4, 4), np.full(4, 200), classes=np.zeros(4, dtype=np.int64))
    sampled = replace(greedy, classes=np.full(4, 2, dtype=np.int64))
    policy = GoodputPolicy(StepTimeModel(cost), AcceptanceModel([0.75] * 4), sampling_classes=False)
    g_greedy, _, t_greedy = policy.goodput(greedy)
    g_sampled, _, t_sampled = policy.goodput(sampled)
    assert t_sampled[0] == pytest.approx(t_greedy[0] + 4 * 0.8)  # the plain step draws 4 rows
    assert np.all(np.diff(t_sampled) > np.diff(t_greedy))  # and each draft one more
    assert int(np.argmax(g_sampled)) < int(np.argmax(g_greedy))
    assert policy.plan(sampled).sum() < GoodputPolicy(StepTimeModel(cost), AcceptanceModel([0.75] * 4),
                                                      sampling_classes=False).plan(greedy).sum()


def test_shipped_calibration_loads_and_gives_priors(tmp_path: Path) -> None:
    calibration = Calibration.load(DEFAULT_CALIBRATION)
    cost, prior = calibration.for_drafter("RecyclingProposer")
    assert cost.step_ms(1, 1, 200, False) > 0 and prior and all(0 < p < 1 for p in prior)
    again = tmp_path / "c.json"
    again.write_text(calibration.to_json())
    assert Calibration.load(again) == calibration
    policy = build_policy(PlannerSettings(policy="goodput"), 4, "HydraProposer")
    assert isinstance(policy, GoodputPolicy) and policy.acceptance.k == 4


def test_planner_counts_measured_steps_against_predictions() -> None:
    planner = StepPlanner(_policy(0.7), num_speculative_tokens=4)
    record = step_timer.StepRecord(rows=1, tokens=1, ctx_tokens=200, spec=False, drafts_verified=0,
                                   prefill_tokens=0, total_ms=9.0, drafts=0, draft_ms=0.0)
    planner.observe_step(record)
    assert planner.stats.timed_steps == 1 and planner.stats.last_measured_ms == 9.0
    assert planner.stats.mape == pytest.approx(abs(COST.step_ms(1, 1, 200, False) - 9.0) / 9.0)
    assert list(planner.records) == [record]


def test_engine_command_carries_the_engine_policy() -> None:
    spec = EngineSpec(model="/m", port=1, served_model_name="m", speculative_config='{"method":"ngram"}',
                      spec_policy="goodput", calibration="/c.json")
    cmd = engine_command(spec, python="py")
    config = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert config["specserve"]["spec_policy"] == "goodput" and config["specserve"]["calibration"] == "/c.json"
    plain = engine_command(EngineSpec(model="/m", port=1, served_model_name="m", spec_policy="goodput"), "py")
    assert "--additional-config" not in plain


def test_vllm_server_parser_reads_the_engine_policy() -> None:
    spec = EngineSpec(model="/m", port=1, served_model_name="m", speculative_config='{"method":"ngram"}',
                      spec_policy="off")
    argv = engine_command(spec, python="py")[3:]
    script = (
        "import json, sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "a = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.stdin.read()))\n"
        "print(json.dumps(a.additional_config))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(argv), capture_output=True, check=False,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["specserve"]["spec_policy"] == "off"


def test_a_decision_not_to_speculate_holds_while_the_batch_is_unchanged() -> None:
    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)
    policy = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), recheck_every=4, recheck_off_max=4)
    computed: list[int] = []
    goodput = policy.goodput
    policy.goodput = lambda rows, *more: (computed.append(len(rows.caps)), goodput(rows, *more))[1]  # type: ignore[method-assign]
    rows = _rows(16)
    for _ in range(9):
        assert policy.plan(rows).sum() == 0
    assert computed == [16, 16, 16], "decided at steps 1, 5 and 9; held in between"
    policy.plan(_rows(15))  # another batch: decided again
    policy.observe(VerifiedRows(("r0",), np.array([1]), np.array([1])))
    policy.plan(_rows(15))  # a verified draft ends the hold
    assert computed == [16, 16, 16, 15, 15]
    idle = _policy(0.9)  # speculates: nothing holds, every step decides
    decided: list[int] = []
    idle_goodput = idle.goodput
    idle.goodput = lambda rows, *more: (decided.append(1), idle_goodput(rows, *more))[1]  # type: ignore[method-assign]
    assert idle.plan(_rows(1)).sum() > 0 and idle.plan(_rows(1)).sum() > 0 and len(decided) == 2


def test_a_repeated_decision_not_to_speculate_holds_twice_as_long_unless_hindsight_teaches() -> None:
    """Off again: the hold doubles (4, 8, 16, then 16 at ``recheck_off_max``), so a drafter that
    keeps losing costs few decisions; a new batch decides at once, and keeps the long hold if
    it is off too. A drafter with hindsight (evidence gathered while off) keeps
    ``recheck_every``, so what it learns is read as often as before."""
    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)

    def decisions(learns: bool, steps: int, batches: list[int]) -> list[int]:
        policy = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), recheck_every=4,
                               recheck_off_max=16, probe_every=0)
        policy.learns_while_off = learns
        decided: list[int] = []
        goodput = policy.goodput
        step = 0
        policy.goodput = lambda rows, *more: (decided.append(step), goodput(rows, *more))[1]  # type: ignore[method-assign]
        for step in range(steps):
            assert policy.plan(_rows(batches[step] if step < len(batches) else batches[-1])).sum() == 0
        return decided

    assert decisions(False, 60, [16]) == [0, 4, 12, 28, 44]
    assert decisions(True, 60, [16]) == list(range(0, 60, 4))
    # a new batch at step 14 decides at once (off again: held 16)
    assert decisions(False, 60, [16] * 14 + [15]) == [0, 4, 12, 14, 30, 46]


def test_a_long_run_without_speculation_is_probed_once_every_probe_every_steps() -> None:
    """Nothing drafted, nothing measured: every ``probe_every`` steps off, one step speculates so
    the acceptance and the spec path's price are measured again."""
    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)
    policy = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), probe_every=16, probe_max=16)
    rows = _rows(16)
    speculated = [i for i in range(48) if policy.plan(rows).sum() > 0]
    assert speculated == [15, 31, 47] and policy.probes == 3
    never = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), probe_every=0)
    assert all(never.plan(rows).sum() == 0 for _ in range(300))


def test_probes_that_find_speculation_still_losing_come_ever_more_rarely() -> None:
    """Each probe after which the controller stays off doubles the wait (16, 32, 64, then 64 at
    ``probe_max``); once a decision speculates on its merits the wait is back at ``probe_every``."""
    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)
    policy = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), probe_every=16, probe_max=64)
    rows = _rows(16)
    speculated = [i for i in range(300) if policy.plan(rows).sum() > 0]
    assert speculated == [15, 47, 111, 175, 239] and policy.probes == 5
    policy.model = StepTimeModel(StepCost(base=8, per_token=0, per_row=0, context=0, spec=0.1, spec_row=0,
                                          draft=0.1, draft_token=0.01))  # drafting now pays
    policy.release()
    assert policy.plan(rows).sum() > 0 and policy.probes == 5, "on by its own decision"
    policy.model = StepTimeModel(busy)
    policy.release()
    off = [i for i in range(40) if policy.plan(rows).sum() > 0]
    assert off == [15] and policy.probes == 6, "the wait is back at probe_every"


def test_a_class_that_stopped_after_a_bad_stretch_reverts_to_its_long_run_rate_while_off() -> None:
    """A long good run, then a bad stretch of other requests turns a 16-row batch off. Nothing is
    measured while off (no probes here): with ``revert`` the recent rate moves back toward the
    long-run one and the controller speculates again on its own; with ``revert=1`` the dip stays
    the estimate for good."""
    rows = _rows(16)
    outcomes = {}
    for revert in (0.98, 1.0):
        policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.6] * 4), probe_every=0, revert=revert)
        model = policy.acceptance
        good, bad = [f"g{i}" for i in range(3000)], [f"b{i}" for i in range(100)]
        model.observe_rows(good, np.ones(3000, dtype=np.int64), np.ones(3000, dtype=np.int64))
        model.forget(good)
        assert policy.plan(rows).sum() > 0, "a high rate: on"
        model.observe_rows(bad, np.ones(100, dtype=np.int64), np.zeros(100, dtype=np.int64))
        model.forget(bad)
        policy.release()
        outcomes[revert] = [bool(policy.plan(rows).sum()) for _ in range(200)]
        assert not outcomes[revert][0], "the bad stretch turns it off"
        assert model.long_rates()[0, 0] > 0.9
    back = outcomes[0.98].index(True)
    assert 5 < back < 100 and all(outcomes[0.98][back:]) and policy.probes == 0
    assert not any(outcomes[1.0]), "without reverting, the dip is never revisited"


def test_a_class_measured_since_the_last_decision_does_not_revert() -> None:
    """Reverting is for classes nothing measured: a class whose drafts were verified keeps its
    recent rate (here a greedy dip) while an unmeasured one (temperature 0.7) moves."""
    model = AcceptanceModel([0.5], weight=1.0, global_weight=10.0, global_decay=0.9)
    model.assign(["g", "s"], [0, 2])
    for _ in range(100):
        model.observe_rows(["g", "s"], [1, 1], [1, 1])
    for _ in range(10):
        model.observe_rows(["g", "s"], [1, 1], [0, 0])
    model.revert(1.0)  # both measured since: the first call only clears
    before = model.class_rates()[[0, 2], 0]
    model.observe("g", 1, 0)
    model.revert(0.0)
    after = model.class_rates()[[0, 2], 0]
    assert after[0] < before[0], "greedy measured: its dip stays (and deepens)"
    assert after[1] == pytest.approx(model.long_rates()[2, 0]) and after[1] > before[1] + 0.3


def test_a_request_that_stopped_after_an_unlucky_start_is_tried_again() -> None:
    """Two rejections turn request ``r0`` off while the engine-wide rate stays high; its own
    evidence fades while it decodes without drafting, and it drafts again."""
    policy = _policy(0.8)
    policy.acceptance = AcceptanceModel([0.8] * 4, weight=1.0)
    rows = _rows(1)
    assert policy.plan(rows).tolist() == [4]
    for _ in range(2):
        policy.observe(VerifiedRows(("r0",), np.array([4]), np.array([0])))
    plans = [int(policy.plan(rows).sum()) for _ in range(60)]
    assert plans[0] == 0, "off after two rejections"
    back = plans.index(next(p for p in plans if p > 0))
    assert 1 < back < 60 and policy.probes == 0, plans
    never = _policy(0.8)
    never.acceptance, never.idle_decay = AcceptanceModel([0.8] * 4, weight=1.0), 1.0
    never.plan(rows)
    for _ in range(2):
        never.observe(VerifiedRows(("r0",), np.array([4]), np.array([0])))
    assert all(never.plan(rows).sum() == 0 for _ in range(60))


def _classed(ids: tuple[str, ...], classes: list[int]) -> StepRows:
    n = len(ids)
    return StepRows(ids, np.full(n, 4), np.full(n, 200), classes=np.array(classes))


def test_sampled_requests_learn_their_own_engine_rate_and_greedy_ones_keep_theirs() -> None:
    """A mixed workload: greedy drafts hold, sampled ones miss. A new request is priced at its
    own class's rate, so a new greedy request speculates and a new sampled one does not."""
    policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.6] * 4))
    for step in range(400):
        ids = (f"g{step}", f"s{step}")
        policy.plan(_classed(ids, [0, 2]))
        policy.observe(VerifiedRows(ids, np.array([4, 4]), np.array([4, 0])))
    rates = policy.acceptance.class_rates()
    assert rates[0, 0] > 0.9 and rates[2, 0] < 0.15
    assert policy.plan(_classed(("new-g",), [0])).tolist() == [4]
    assert policy.plan(_classed(("new-s",), [2])).tolist() == [0]
    state = policy.model_state()
    assert set(state["acceptance_by_class"]) == {"greedy", "le_1"}
    # Without classes (one pooled rate) the new sampled request would have been priced like the rest.
    pooled = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.6] * 4))
    for step in range(400):
        ids = (f"g{step}", f"s{step}")
        pooled.plan(_rows(2))
        pooled.observe(VerifiedRows(ids, np.array([4, 4]), np.array([4, 0])))
    assert pooled.plan(StepRows(("new-s",), np.full(1, 4), np.full(1, 200))).tolist() != [0]


def test_a_forgotten_request_leaves_its_class_behind() -> None:
    model = AcceptanceModel([0.5] * 2)
    model.assign(["a"], [3])
    model.forget(["a"])
    model.assign(["a"], [0])
    model.observe("a", 2, 2)
    assert model.seen_classes() == [0]


def test_calibration_priors_by_sampling_class_reach_the_policy(tmp_path: Path) -> None:
    base = json.loads(DEFAULT_CALIBRATION.read_text())
    base["acceptance_by_class"] = {"HydraProposer": {"le_1": [0.2, 0.3], "gt_1": [0.1], "unknown": [0.9]}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(base))
    loaded = Calibration.load(path)
    (tmp_path / "again.json").write_text(loaded.to_json())
    assert Calibration.load(tmp_path / "again.json") == loaded
    assert loaded.class_priors("HydraProposer") == {2: [0.2, 0.3], 3: [0.1]}
    policy = GoodputPolicy.from_settings(PlannerSettings(policy="goodput", calibration=str(path)), 4,
                                         "HydraProposer")
    rates = policy.acceptance.class_rates()
    assert rates[2].round(2).tolist() == [0.2, 0.3, 0.3, 0.3]  # the last measured rate carries on
    assert rates[3].round(2).tolist() == [0.1] * 4
    assert rates[0].tolist() == rates[1].tolist()  # greedy and low temperatures: the drafter's prior


def test_the_runner_batch_gives_each_request_its_sampling_class() -> None:
    from specserve_vllm.compat.spec_length import request_classes

    params = {"a": SimpleNamespace(temperature=0.0), "b": SimpleNamespace(temperature=0.7),
              "c": SimpleNamespace(temperature=1.3), "d": None}
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a", "b", "c", "d"]),
                             requests={r: SimpleNamespace(sampling_params=p) for r, p in params.items()})
    assert request_classes(runner).tolist() == [0, 2, 3, 0]


def test_sampling_classes_can_be_turned_off_for_one_pooled_rate() -> None:
    from specserve_vllm.spec_control.planner import settings_from

    settings = settings_from({"specserve": {"spec_policy": "goodput", "sampling_classes": False}}, env={})
    assert settings.sampling_classes is False and settings_from({}, env={}).sampling_classes is True
    policy = build_policy(settings, 4, "HydraProposer")
    assert isinstance(policy, GoodputPolicy) and policy.sampling_classes is False
    policy.plan(_classed(("s",), [2]))
    policy.observe(VerifiedRows(("s",), np.array([4]), np.array([0])))
    assert policy.acceptance.seen_classes() == [0]  # the sampled request counted as greedy: one rate


def test_a_speculating_plan_is_reused_while_the_batch_is_unchanged_then_decided_again() -> None:
    policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.9] * 4), recheck_on=3)
    rows = _rows(1)
    first = policy.plan(rows).tolist()
    assert first == [4]
    policy.acceptance = AcceptanceModel([0.01] * 4)  # would turn speculation off at once
    assert policy.plan(rows).tolist() == first and policy.plan(rows).tolist() == first  # held: 3 steps in all
    assert policy.plan(rows).tolist() == [0]  # decided again
    policy.acceptance = AcceptanceModel([0.9] * 4)
    assert policy.plan(rows).tolist() == [0]  # an "off" decision holds under its own rule (recheck_every)
    other = _rows(2)  # a new batch ends any hold
    assert policy.plan(other).tolist() != [0, 0]


def test_the_engine_setting_holds_plans_and_one_decides_every_step() -> None:
    from specserve_vllm.spec_control.planner import settings_from

    assert build_policy(settings_from({"specserve": {"spec_policy": "goodput"}}, env={}), 4,
                        "HydraProposer").recheck_on == 4
    assert build_policy(settings_from({"specserve": {"spec_policy": "goodput", "recheck_on": 1}}, env={}), 4,
                        "HydraProposer").recheck_on == 1


def test_the_engine_setting_sets_the_step_fits_memory_and_refuses_a_weight_outside_0_1() -> None:
    from specserve_vllm.spec_control.planner import PlannerSettings, settings_from

    default = build_policy(settings_from({"specserve": {"spec_policy": "goodput"}}, env={}), 4, "HydraProposer")
    assert default.model.step_fit.alpha == PlannerSettings.fit_alpha == default.model.draft_fit.alpha
    longer = build_policy(settings_from({"specserve": {"spec_policy": "goodput", "fit_alpha": 0.01}}, env={}), 4,
                          "HydraProposer")
    assert longer.model.step_fit.alpha == 0.01 and longer.model.draft_fit.alpha == 0.01
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fit_alpha"):
            settings_from({"specserve": {"fit_alpha": bad}}, env={})
    with pytest.raises(ValueError, match="prefill_estimate"):  # refused with the other settings, any policy
        settings_from({"specserve": {"spec_policy": "fixed", "prefill_estimate": "mean"}}, env={})


def test_an_unknown_engine_setting_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from specserve_vllm.spec_control.planner import settings_from

    with caplog.at_level("WARNING"):
        settings = settings_from({"specserve": {"spec_policy": "goodput", "revrt": 1}}, env={})
    assert settings.policy == "goodput"
    assert any(getattr(r, "fields", {}).get("names") == ["revrt"] for r in caplog.records)


def test_the_revert_setting_reaches_the_policy_and_refuses_a_share_outside_0_1() -> None:
    from specserve_vllm.spec_control.acceptance import REVERT
    from specserve_vllm.spec_control.planner import settings_from

    default = build_policy(settings_from({"specserve": {"spec_policy": "goodput"}}, env={}), 4, "HydraProposer")
    assert default.revert == REVERT < 1.0
    never = build_policy(settings_from({"specserve": {"spec_policy": "goodput", "revert": 1}}, env={}), 4,
                         "HydraProposer")
    assert never.revert == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="revert"):
            settings_from({"specserve": {"revert": bad}}, env={})


def test_the_planner_reuses_held_plans_and_counts_them() -> None:
    """``StepPlanner.reuse`` returns the policy's held plan for an unchanged batch (and counts
    it), and nothing for a changed batch, an exhausted hold, or a probe that is due."""
    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)
    policy = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), recheck_every=3, probe_every=6)
    planner = StepPlanner(policy, 4)
    ids, caps = [f"r{i}" for i in range(16)], [4] * 16
    assert planner.reuse(ids, caps) is None  # nothing decided yet
    assert planner.plan(_rows(16)).sum() == 0
    for _ in range(2):
        held = planner.reuse(ids, caps)
        assert held is not None and held.sum() == 0
    assert planner.reuse(ids, caps) is None  # held for recheck_every steps in all
    assert planner.stats.steps == 3 and planner.stats.no_spec_steps == 3
    planner.plan(_rows(16))
    assert planner.reuse(ids[:15], caps[:15]) is None  # other requests
    lower = planner.reuse(ids, [4] * 15 + [2])  # the same ones, a cap lower: held (the fifth step off)
    assert lower is not None and lower.sum() == 0
    assert planner.reuse(ids, [4] * 15 + [2]) is None, "a probe is due: the policy must decide"
    assert planner.plan(_rows(16)).sum() > 0 and policy.probes == 1


def test_a_speculating_hold_survives_its_own_verifications_and_an_off_hold_does_not() -> None:
    policy = _policy(0.9)
    policy.recheck_on = 3
    rows = _rows(1)
    plan = policy.plan(rows)
    assert plan.sum() > 0
    policy.observe(VerifiedRows(("r0",), plan.copy(), plan.copy()))
    assert policy.reuse((("r0",), (4,))) is not None
    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)
    off = GoodputPolicy(StepTimeModel(busy), AcceptanceModel([0.6] * 4), recheck_every=4)
    assert off.plan(_rows(16)).sum() == 0
    off.observe(VerifiedRows(("r0",), np.array([1]), np.array([1])))
    assert off.reuse(((tuple(f"r{i}" for i in range(16))), (4,) * 16)) is None


def test_verifications_folded_at_the_next_decision_give_the_same_plans() -> None:
    """Verifications are kept as they come and folded when a decision reads the estimates:
    the plans are those of folding each at once, and nothing is lost or left behind."""
    from specserve_vllm.spec_control.goodput import MAX_UNLEARNED

    rng = np.random.default_rng(3)
    eager, lazy = _policy(0.7), _policy(0.7)
    for p in (eager, lazy):
        p.recheck_on = 3
    rows = _rows(4)
    for _ in range(40):
        plans = [p.plan(rows) for p in (eager, lazy)]
        assert plans[0].tolist() == plans[1].tolist()
        drafted = np.maximum(plans[0], 1)
        verified = VerifiedRows(rows.req_ids, drafted, rng.integers(0, drafted + 1))
        for p in (eager, lazy):
            p.observe(verified)
        _ = eager.acceptance  # folds now
        assert not eager._unlearned
    assert np.allclose(eager.acceptance.survival(rows.req_ids), lazy.acceptance.survival(rows.req_ids))
    idle = _policy(0.7)
    for _ in range(MAX_UNLEARNED + 1):  # no decision in between: still bounded
        idle.observe(VerifiedRows(("a",), np.array([4]), np.array([2])))
    assert len(idle._unlearned) < MAX_UNLEARNED
    idle.finished(frozenset({"a"}))  # a request's last verifications count before it is forgotten
    assert not idle._unlearned and idle.acceptance.seen_classes() == [0]


def test_a_probe_drafts_its_likeliest_row_to_full_depth() -> None:
    """A probe measures the deepest verification too: the row with the likeliest first draft
    drafts its whole cap, the others what the best speculating plan gives them."""
    busy = StepCost(base=8, per_token=2, per_row=0, context=0, spec=6, spec_row=1, draft=1, draft_token=0.1)
    acceptance = AcceptanceModel([0.6] * 4)
    acceptance.observe("r3", drafted=4, accepted=4)
    policy = GoodputPolicy(StepTimeModel(busy), acceptance, probe_every=4)
    rows = _rows(6)
    g, slot_rows, _ = policy.goodput(rows)
    best = np.bincount(slot_rows[:1 + int(np.argmax(g[1:]))], minlength=6)
    best[3] = 4
    plans = [policy.plan(rows) for _ in range(4)]
    assert [int(p.sum()) for p in plans[:3]] == [0, 0, 0]
    assert plans[3].tolist() == best.tolist() and policy.probes == 1


def test_the_next_step_is_priced_with_the_prefill_it_will_schedule() -> None:
    """A step that prefilled a whole 100-token prompt made the next one look 100 tokens slower
    under ``last``, so speculation at a 0.3 acceptance looked nearly free; ``next`` prices the
    prompt tokens still to prefill (:attr:`StepRows.prefill`), which a chunked prompt has."""
    plans = {}
    for mode in PREFILL_ESTIMATES:
        policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.3] * 4), prefill_estimate=mode)
        policy.observe_step(9, 108, 0, False, 100, 123.0, 0, 0.0)  # measured as predicted: the fit holds
        plans[mode] = int(policy.plan(_rows(8, ctx=0)).sum())
    assert plans == {"next": 0, "last": plans["last"]} and plans["last"] > 0
    chunked = StepRows(tuple(f"r{i}" for i in range(8)), np.full(8, 4), np.zeros(8, dtype=np.int64), prefill=100)
    policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.3] * 4))
    assert policy.next_prefill(chunked) == 100 and policy.plan(chunked).sum() > 0
    with pytest.raises(ValueError, match="prefill_estimate"):
        GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.3] * 4), prefill_estimate="mean")


def test_a_held_plan_follows_caps_that_fall_and_ends_when_one_rises() -> None:
    """Rows nearing ``max_tokens`` lose a cap a step; the held decision is cut to the new caps
    (and counted so) instead of decided again, which in a closed loop was every other step."""
    policy = GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.9] * 4), recheck_on=4)
    planner = StepPlanner(policy, 4)
    ids = ["r0", "r1"]
    first = planner.plan(_rows(2))
    assert first.tolist() == [4, 4]
    cut = planner.reuse(ids, [4, 2])
    assert cut is not None and cut.tolist() == [4, 2] and not cut.flags.writeable
    assert planner.reuse(ids, [4, 0]).tolist() == [4, 0]
    assert planner.stats.steps == 3 and planner.stats.decode_rows == 5 and planner.stats.k_rows == {4: 4, 2: 1}
    assert planner.reuse(ids, [4, 1]) is None  # a cap rose: decide again
