"""The goodput controller with trees on: each step it chooses no speculation, chains or trees,
pricing trees by a gain and a cost it learns from the steps that verified them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from specserve_vllm.drafters.recycling_proposer import RecyclingProposer
from specserve_vllm.spec_control.acceptance import AcceptanceModel
from specserve_vllm.spec_control.export import model_families
from specserve_vllm.spec_control.goodput import GoodputPolicy
from specserve_vllm.spec_control.plan import StepRows, VerifiedRows
from specserve_vllm.spec_control.step_time import StepCost, StepTimeModel
from specserve_vllm.spec_control.tree_pricing import TreePricing

# A forward-bound step (GPU-like): drafts are cheap next to the step itself.
COST = StepCost(base=20.0, per_token=0.1, per_row=0.2, context=0.0, spec=1.0, spec_row=0.1, draft=0.2,
                draft_token=0.01)


def _rows(n: int, cap: int = 8) -> StepRows:
    return StepRows(tuple(f"r{i}" for i in range(n)), np.full(n, cap), np.full(n, 200))


def _policy(k: int = 8, chain_depth: int | None = None, gain: float = 1.1) -> GoodputPolicy:
    return GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.7] * k), trees=TreePricing(k, gain_prior=gain),
                         chain_depth=chain_depth)


def _tree_step(policy: GoodputPolicy, rows: StepRows, ratio: float, accepted_share: float) -> None:
    """Feed the policy one verified tree step: ``accepted_share`` of the chain's expectation held,
    and the step took ``ratio`` times its chain price."""
    plan = rows.caps.copy()  # every row verified a tree of its cap, whatever the policy would choose
    policy.remember_tree_rows(rows, plan)
    expected = {r: e for r, (_, e) in policy._tree_rows.items()}
    accepted = np.array([int(round(accepted_share * expected[r])) for r in rows.req_ids])
    policy.observe(VerifiedRows(rows.req_ids, plan, accepted, trees=np.ones(len(plan), dtype=bool)))
    chain_ms = policy.model.step_ms(len(plan), int(len(plan) + plan.sum()), 200 * len(plan), True)
    policy.observe_step(len(plan), int(len(plan) + plan.sum()), 200 * len(plan), True, 0, ratio * chain_ms,
                        0, 0.0, trees=len(plan))


def test_untried_trees_are_tried_first_with_one_node_count_for_every_row() -> None:
    policy = _policy()
    plan = policy.plan(_rows(2))
    assert not policy.chains_only  # the optimistic prior: trees look at least as good as chains
    assert plan[0] == plan[1] > 0 and plan.max() <= 8


def test_trees_that_cost_more_than_they_gain_give_way_to_chains_at_that_batch_size() -> None:
    policy = _policy()
    for _ in range(40):
        _tree_step(policy, _rows(1), ratio=2.5, accepted_share=1.1)
    assert policy.trees is not None and policy.trees.cost_factor(1) > 2.0
    policy.plan(_rows(1))
    assert policy.chains_only  # one request: trees priced 2.5x, chains win
    policy.plan(_rows(8))
    assert not policy.chains_only  # eight requests: that bucket's price is still the prior


def test_trees_that_gain_enough_keep_being_chosen() -> None:
    policy = _policy(gain=1.0)
    for _ in range(40):
        _tree_step(policy, _rows(1), ratio=1.02, accepted_share=1.6)
    assert policy.trees is not None and policy.trees.gain.max() > 1.3
    policy.plan(_rows(1))
    assert not policy.chains_only


def test_tree_verifications_teach_the_gain_and_not_the_chain_acceptance() -> None:
    policy = _policy()
    before = policy.acceptance.engine_rates().copy()
    _tree_step(policy, _rows(2), ratio=1.0, accepted_share=0.5)
    assert np.array_equal(policy.acceptance.engine_rates(), before)  # trees leave the chain rates alone
    assert policy.trees is not None and policy.trees.gain.min() < 1.1
    policy.observe(VerifiedRows(("r0",), np.array([4]), np.array([0]), trees=np.array([False])))
    assert policy.acceptance.engine_rates()[0] < before[0]  # a chain row does teach them


def test_chains_stop_at_the_drafters_depth_while_trees_may_hold_more_nodes() -> None:
    policy = _policy(k=16, chain_depth=4, gain=1.0)
    policy.trees.cost[:] = 10.0  # type: ignore[union-attr]  # trees far too dear: chains
    plan = policy.plan(_rows(1, cap=16))
    assert policy.chains_only and 0 < plan[0] <= 4
    policy.trees.cost[:] = 1.0  # type: ignore[union-attr]
    policy.trees.gain[:] = np.linspace(1.0, 3.0, 16)  # type: ignore[union-attr]  # wide trees pay
    plan = policy.plan(_rows(1, cap=16))
    assert not policy.chains_only and plan[0] > 4


def test_a_controller_settled_on_chains_tries_trees_again_now_and_then() -> None:
    policy = _policy()
    assert policy.trees is not None
    policy.trees.cost[:] = 3.0
    policy.trees.explore_every = 5
    shapes = []
    for _ in range(10):
        policy.plan(_rows(1))
        shapes.append(policy.chains_only)
    assert shapes.count(False) == 2 and shapes[4] is False and shapes[9] is False


def test_a_tree_mode_drafter_drafts_chains_when_the_plan_says_so() -> None:
    config = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=4),
                             model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 6))
    proposer = RecyclingProposer(config, topk_width=2, tree_shape="static")
    proposer.observe_topk(np.array([1, 3, 4]), np.array([[3, 4], [5, 1], [2, 0]]))
    tokens = np.array([[0, 1, 0]])
    proposer.set_draft_lengths(np.array([4]), chains=True)
    assert proposer.propose([[1]], np.array([2]), tokens) == [[3, 5]]  # 1 -> 3 -> 5, row 5 empty
    assert proposer.last_trees == [None]
    proposer.set_draft_lengths(np.array([4]))
    assert proposer.propose([[1]], np.array([2]), tokens) == [[3, 5, 1, 4]]  # the static tree again
    assert proposer.last_trees[0] is not None


def test_the_learned_tree_price_is_exported_with_the_cost_model() -> None:
    policy = _policy(k=4)
    _tree_step(policy, _rows(1, cap=4), ratio=2.0, accepted_share=0.5)
    families = {f.name: {s.labels.get("nodes", s.labels.get("bucket")): s.value for s in f.samples}
                for f in model_families(policy.model_state())}
    assert families["specserve_engine_tree_cost_ratio"]["1"] == 1.1  # 1 + 0.1 * (2.0 - 1)
    assert families["specserve_engine_tree_gain_ratio"]["4"] < 1.1 and len(families["specserve_engine_tree_gain_ratio"]) == 4
    assert "specserve_engine_tree_gain_ratio" not in {f.name for f in model_families(
        GoodputPolicy(StepTimeModel(COST), AcceptanceModel([0.7] * 4)).model_state())}
