"""Hindsight drafts: steps without drafts score the chain draft they would have verified, the
scores reach the goodput controller's first-position estimate, and learning is unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.compat import logits_feed
from specserve_vllm.drafters import recycling
from specserve_vllm.drafters.argmax_backlog import ArgmaxBacklog, best_candidates
from specserve_vllm.drafters.hindsight import HindsightRows, HindsightTally, acceptance_probability, drafts_before
from specserve_vllm.drafters.recycling_proposer import RecyclingProposer
from specserve_vllm.spec_control.acceptance import AcceptanceModel, sampling_class
from specserve_vllm.spec_control.goodput import GoodputPolicy
from specserve_vllm.spec_control.plan import StepRows
from specserve_vllm.spec_control.planner import StepPlanner, settings_from
from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel

VOCAB = 10


def _config() -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=3),
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: VOCAB),
    )


def test_acceptance_probability_is_the_tempered_softmax_at_the_draft() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    drafts = np.array([2, 5, 7, 1])
    temps = np.array([0.7, 1.3, 0.0, np.nan])
    p = acceptance_probability(logits.numpy(), drafts, temps)
    for i in range(2):
        expected = torch.softmax(logits[i] / float(temps[i]), dim=-1)[drafts[i]].item()
        assert p[i] == pytest.approx(expected, rel=1e-5)
    assert p[2] == float(int(logits[2].argmax()) == 7)
    assert np.isnan(p[3])  # no evidence
    assert np.isnan(acceptance_probability(logits.numpy()[:1], np.array([-1]), np.array([0.7]))).all()


def test_rows_of_one_step_do_not_see_each_other() -> None:
    # Two requests ending on token 4 in one step both had the draft made before the step.
    column = np.full(VOCAB, -1)
    column[4] = 9
    assert drafts_before(np.array([4, 4, 4]), np.array([1, 2, 3]), column, np.array([0, 0, 1])).tolist() == [9, 9, 2]
    assert drafts_before(np.array([4, 11, 4]), np.array([1, 2, 3]), column).tolist() == [9, -1, 1]


steps_strategy = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4), min_size=1, max_size=10)


@settings(max_examples=60, deadline=None)
@given(steps=steps_strategy, seed=st.integers(0, 2**16), ring_rows=st.integers(4, 12),
       temperature=st.sampled_from([0.0, 0.7]))
def test_hindsight_scores_the_draft_each_step_would_have_verified(steps: list[list[int]], seed: int,
                                                                 ring_rows: int, temperature: float) -> None:
    """Against a step-by-step drafter that proposes before each step: the same draft per row,
    scored at the same probability, and the matrix learnt as without hindsight (any batch,
    repeated tokens, ring sizes that force early flushes)."""
    gen = torch.Generator().manual_seed(seed)
    kept = RecyclingProposer(_config(), tree_shape="chain")
    kept._argmax = ArgmaxBacklog(ring_rows)
    assert kept.enable_hindsight()
    plain = RecyclingProposer(_config(), tree_shape="chain")  # learns at once, no hindsight
    expected: list[float] = []
    for i, tokens in enumerate(steps):
        logits = (torch.randn(len(tokens), VOCAB, generator=gen) * 2).round()
        drafts = plain.matrix[np.array(tokens), 0].astype(np.int64)  # proposed before the step
        expected += acceptance_probability(logits.numpy(), drafts, np.full(len(tokens), temperature)).tolist()
        ids = tuple(f"r{j}" for j in range(len(tokens)))
        kept.observe_logits(torch.tensor(tokens), logits.clone(), rows=HindsightRows(ids, np.full(len(tokens), temperature)))
        plain.observe_topk(torch.tensor(tokens), torch.from_numpy(best_candidates(logits)), VOCAB)
    ids, temps, p = kept.take_hindsight()
    scored = [e for e in expected if np.isfinite(e)]
    assert len(p) == len(scored) and np.allclose(p, scored, atol=1e-6)
    assert np.array_equal(kept.matrix, plain.matrix)
    assert (temps == temperature).all() and len(ids) == len(p)


def test_rows_without_hindsight_are_learnt_but_not_scored() -> None:
    proposer = RecyclingProposer(_config(), tree_shape="chain")
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 5.0
    proposer.observe_logits(torch.tensor([2]), logits, rows=HindsightRows(("a",), np.array([0.0])))
    assert proposer.take_hindsight()[0] == []  # not enabled: nothing kept
    proposer.flush_backlog()
    assert proposer.matrix[2, 0] == 3
    proposer.enable_hindsight()
    proposer.observe_logits(torch.tensor([2]), logits)  # a verifying step: no rows
    proposer.observe_logits(torch.tensor([2]), logits, rows=HindsightRows(("a",), np.array([np.nan])))
    proposer.observe_logits(torch.tensor([2]), logits, rows=HindsightRows(("a",), np.array([0.0])))
    ids, _, p = proposer.take_hindsight()
    assert ids == ["a"] and p.tolist() == [1.0]
    assert not RecyclingProposer(_config(), tree_shape="static").enable_hindsight()


def test_tally_keeps_the_newest_rows() -> None:
    tally = HindsightTally(limit=3)
    for i in range(4):
        tally.add([f"r{i}", f"s{i}"], np.array([0.7, 0.7]), np.array([0.1 * i, np.nan]))
    ids, _, p = tally.take()
    assert ids == ["r1", "r2", "r3"] and np.allclose(p, [0.1, 0.2, 0.3])


def test_first_position_evidence_equals_one_row_at_a_time_and_leaves_deeper_positions() -> None:
    together = AcceptanceModel(prior=[0.5, 0.4], weight=2.0, global_weight=4.0)
    apart = AcceptanceModel(prior=[0.5, 0.4], weight=2.0, global_weight=4.0)
    for m in (together, apart):
        m.assign(["a", "b"], [2, 2])
    ids, p, classes = ["a", "b", "a", "a"], [0.9, 0.1, 0.8, 0.7], [2, 2, 2, 2]
    together.observe_first(ids, p, classes)
    for r, x, c in zip(ids, p, classes):
        apart.observe_first([r], [x], [c])
    assert np.allclose(together.conditional(["a", "b", "new"]), apart.conditional(["a", "b", "new"]))
    assert together.conditional(["a"])[0, 1] == pytest.approx(0.4)
    assert together.class_rates()[2, 0] > 0.5 and together.seen_classes() == [2]
    assert together.conditional(["a"])[0, 0] > together.conditional(["b"])[0, 0]


def test_rows_of_requests_the_model_does_not_hold_count_for_their_class_only() -> None:
    """A finished request's last hindsight rows arrive after it was forgotten: they move its
    class's rate and allocate nothing (a slot per finished request would never be freed)."""
    model = AcceptanceModel(prior=[0.5], weight=2.0, global_weight=4.0)
    model.assign(["a"], [2])
    model.forget(["a"])
    for _ in range(50):
        model.observe_first(["a", "b"], [0.05, 0.05], classes=[2, 2])
    assert model._slot == {} and model._used == 2 and model._free == [1]  # only a's own slot, freed
    assert model.class_rates()[2, 0] < 0.1


def _policy(prior: float) -> GoodputPolicy:
    cost = StepCost(base=4, per_token=0.4, per_row=0, context=0, spec=0.5, spec_row=0, draft=0.2, draft_token=0.0)
    return GoodputPolicy(StepTimeModel(cost), AcceptanceModel([prior] * 3, class_priors={2: [prior] * 3}))


def test_hindsight_turns_speculation_on_and_off_while_nothing_is_verified() -> None:
    rows = StepRows(("a",), np.array([3]), np.array([50]), np.array([sampling_class(0.7)]))
    low = _policy(0.05)
    assert low.plan(rows).tolist() == [0]
    for _ in range(20):  # what drafting would have done: accepted most of the time
        low.observe_hindsight(["a"] * 8, [2] * 8, np.full(8, 0.95))
    low.release()
    assert low.plan(rows)[0] > 0
    high = _policy(0.9)
    assert high.plan(rows)[0] > 0
    for _ in range(20):
        high.observe_hindsight(["a"] * 8, [2] * 8, np.full(8, 0.02))
    high.release()
    assert high.plan(rows).tolist() == [0]


def test_planner_counts_and_forwards_hindsight() -> None:
    policy = _policy(0.3)
    planner = StepPlanner(policy, 3)
    planner.observe_hindsight(["a", "b"], np.array([0.0, 0.7]), np.array([1.0, 0.25]))
    assert planner.stats.hindsight_rows == 2 and planner.stats.hindsight_accepted == pytest.approx(1.25)
    assert policy.acceptance.seen_classes() == [0, 2]
    assert settings_from({"specserve": {"hindsight": False}}, env={}).hindsight is False
    assert settings_from(None, env={}).hindsight is True


def test_feed_rows_mark_discarded_and_reshaped_requests() -> None:
    batch = SimpleNamespace(req_ids=["a", "b", "c"], temperature_cpu=np.array([0.0, 0.7, 0.9, 5.0], dtype=np.float32),
                            top_p_reqs={"c"}, top_k_reqs=set())
    runner = SimpleNamespace(input_batch=batch, discard_request_mask=SimpleNamespace(np=np.array([True, False, False])))
    rows = logits_feed.hindsight_rows(runner, 3)
    assert rows.req_ids == ("a", "b", "c")
    assert np.isnan(rows.temperatures[0]) and rows.temperatures[1] == pytest.approx(0.7)
    assert np.isnan(rows.temperatures[2])
    assert logits_feed.hindsight_rows(runner, 2) is None  # not one row per request


def test_a_take_scores_every_greedy_row_and_a_bounded_spread_of_sampled_ones() -> None:
    from specserve_vllm.drafters import argmax_backlog
    from specserve_vllm.drafters.hindsight import scored_rows

    gen = torch.Generator().manual_seed(5)
    kept = RecyclingProposer(_config(), tree_shape="chain")
    kept._argmax = ArgmaxBacklog(256)
    kept.enable_hindsight()
    plain = RecyclingProposer(_config(), tree_shape="chain")
    temps = np.array([0.0 if i % 3 == 0 else 0.7 for i in range(60)])
    expected = []
    for i, t in enumerate(temps):
        token = int(torch.randint(0, VOCAB, (1,), generator=gen))
        logits = torch.randn(1, VOCAB, generator=gen) * 2
        draft = plain.matrix[[token], 0].astype(np.int64)
        expected.append(acceptance_probability(logits.numpy(), draft, np.array([t]))[0])
        kept.observe_logits(torch.tensor([token]), logits.clone(), rows=HindsightRows((f"r{i}",), np.array([t])))
        plain.observe_topk(torch.tensor([token]), torch.from_numpy(best_candidates(logits)), VOCAB)
    ids, got_temps, p = kept.take_hindsight()
    picked = scored_rows(temps, argmax_backlog.SAMPLED_ROWS)
    assert len(picked) == 20 + argmax_backlog.SAMPLED_ROWS  # rows whose token had no draft yet drop out below
    want = [(f"r{i}", expected[i]) for i in picked.tolist() if np.isfinite(expected[i])]
    assert ids == [r for r, _ in want] and np.allclose(p, [x for _, x in want], atol=1e-6)
    assert np.array_equal(kept.matrix, plain.matrix)


def test_the_input_batch_still_has_what_the_feed_rows_read() -> None:
    """``hindsight_rows`` reads vLLM's input batch by attribute name (a missing one would read
    as "no reshaping"): each must still be assigned in ``InputBatch.__init__`` and filled by
    ``add_request``, and the runner must still build ``discard_request_mask``."""
    from specserve_vllm.compat.upstream import UpstreamFunction

    init = UpstreamFunction("vllm.v1.worker.gpu_input_batch", "InputBatch.__init__", "").source()
    add = UpstreamFunction("vllm.v1.worker.gpu_input_batch", "InputBatch.add_request", "").source()
    for name in (*logits_feed._RESHAPED, "temperature_cpu"):
        assert f"self.{name}" in init, name
    for name in logits_feed._RESHAPED:
        assert f"self.{name}.add(req_id)" in add, name
    assert "self.temperature_cpu[" in add
    runner = UpstreamFunction("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__", "").source()
    assert "self.discard_request_mask = " in runner
