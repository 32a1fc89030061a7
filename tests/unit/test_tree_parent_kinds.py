"""Token Recycling's dynamic trees learn from verified trees how acceptance depends on the node a
candidate continues (the root, a rank-0 candidate, another): counting, factors, their effect on
the tree's shape, and the engine wrap that feeds the proposer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings as hsettings, strategies as st

from specserve_vllm.compat import tree_steps
from specserve_vllm.drafters.recycling_proposer import RecyclingProposer
from specserve_vllm.drafters.recycling_trees import (
    KindRecord,
    kind_log_factors,
    node_ranks,
    recycling_tree,
    verified_children,
)
from specserve_vllm.tree.build import parent_kind
from specserve_vllm.tree.draft import DraftTree
from specserve_vllm.tree.plan import RequestTree
from specserve_vllm.tree.verify import verify_greedy

MATRIX = np.array([[1, 2], [3, 4], [0, 1], [5, 0], [1, 2], [2, 3]], dtype=np.int16)


@st.composite
def trees_and_paths(draw: st.DrawFn) -> tuple[DraftTree, tuple[int, ...]]:
    tree = recycling_tree(MATRIX, draw(st.integers(0, 5)), "static", draw(st.integers(1, 8)))
    path: list[int] = []
    while True:  # walk down: any child of the last accepted node, or stop
        parent = path[-1] if path else -1
        children = [i for i, p in enumerate(tree.parents) if p == parent]
        if not children or draw(st.booleans()):
            return tree, tuple(path)
        path.append(draw(st.sampled_from(children)))


@hsettings(max_examples=80, deadline=None)
@given(case=trees_and_paths())
def test_verified_children_are_those_of_the_accepted_path(case: tuple[DraftTree, tuple[int, ...]]) -> None:
    tree, accepted = case
    ranks = tuple(0 for _ in tree.tokens)
    children = verified_children(tree, ranks, accepted)
    tested = [i for i, p in enumerate(tree.parents) if p == -1 or p in accepted]
    assert len(children) == len(tested)
    # every accepted node is one tested child that counts as a hit, and nothing else is a hit
    assert sum(hit for _, _, hit in children) == len(accepted)


def test_node_ranks_follow_the_rows_the_tree_came_from() -> None:
    tree = recycling_tree(MATRIX, 0, "static", 6)
    ranks = node_ranks(MATRIX, 0, tree)
    for i, (tok, parent) in enumerate(zip(tree.tokens, tree.parents)):
        row = MATRIX[0 if parent < 0 else tree.tokens[parent]].tolist()
        assert row[ranks[i]] == tok
    assert parent_kind(MATRIX, 0, (1, 3)) == 1 and parent_kind(MATRIX, 0, (2,)) == 2


def test_factors_follow_the_measured_rates_and_stay_bounded() -> None:
    record = KindRecord(k=2)
    assert kind_log_factors(record.trials[0], record.hits[0]) == [[0.0, 0.0]] * 3  # no data
    record.observe(0, [(0, 0, True)] * 300 + [(0, 0, False)] * 300 + [(1, 0, True)] * 540 + [(1, 0, False)] * 60)
    greedy = [[math.exp(x) for x in row] for row in record.log_factors(0)]
    assert greedy[1][0] > 1.2 and greedy[0][0] < 0.85  # after a rank-0 node: more often accepted
    assert record.log_factors(2) == [[0.0, 0.0]] * 3  # another sampling class: its own counts
    record.observe(0, [(2, 0, False)] * 10_000)
    low, high = math.log(0.5), math.log(2.0)
    assert all(low - 1e-12 <= x <= high + 1e-12 for row in record.log_factors(0) for x in row)


def test_factors_deepen_the_tree() -> None:
    matrix = np.array([[1, 2], [3, 4], [-1, -1], [5, 0], [-1, -1], [-1, -1]], dtype=np.int16)
    wide = recycling_tree(matrix, 0, "dynamic", 3, (0.6, 0.4))
    assert wide.parents == (-1, 0, -1)  # 0.6 * 0.6 < 0.4: the root's second candidate
    deep = recycling_tree(matrix, 0, "dynamic", 3, (0.6, 0.4),
                          kind_factors=[[0.0, 0.0], [math.log(1.5), 0.0], [0.0, 0.0]])
    assert deep.parents == (-1, 0, 1)  # after a rank-0 node rank 0 scores 0.9: 0.54 > 0.4


def _config(vocab: int, k: int) -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: vocab),
    )


def test_the_tree_wrap_teaches_the_proposer_the_verified_path() -> None:
    proposer = RecyclingProposer(_config(vocab=6, k=4), topk_width=2, tree_shape="dynamic")
    proposer.matrix[:] = MATRIX
    proposer.row_classes = np.array([0])
    proposer.propose([[1]], np.array([2]), np.array([[4, 0, 0]]))
    tree, ranks = proposer.last_trees[0], proposer.last_ranks[0]
    assert tree is not None and ranks == node_ranks(MATRIX, 0, tree)
    # The target agrees with the first path for two nodes, then stops.
    rows = np.zeros((len(tree) + 1, 6))
    want = [tree.tokens[0], tree.tokens[1]]
    rows[0, want[0]] = rows[1, want[1]] = 1.0
    verdict = verify_greedy(tree, rows)
    assert verdict.accepted[:1] == (0,)
    runner = SimpleNamespace(
        drafter=proposer,
        input_batch=SimpleNamespace(req_ids=["a"]),
        requests={"a": SimpleNamespace(sampling_params=SimpleNamespace(temperature=0.0))},
    )
    setattr(runner, tree_steps.TREES_ATTR, {"a": tree})
    setattr(runner, tree_steps.RANKS_ATTR, {"a": ranks})
    step = SimpleNamespace(plan=SimpleNamespace(requests=(RequestTree(req_index=0, row_start=0, tree=tree),)))
    tree_steps.teach(runner, step, {0: verdict})
    assert proposer.kinds is not None
    assert int(proposer.kinds.trials[0].sum()) == len(verified_children(tree, ranks, verdict.accepted))
    assert int(proposer.kinds.hits[0].sum()) == len(verdict.accepted)
    # A tree the grammar pruned to other tokens teaches nothing.
    pruned = DraftTree(tokens=(5,), parents=(-1,))
    step = SimpleNamespace(plan=SimpleNamespace(requests=(RequestTree(req_index=0, row_start=0, tree=pruned),)))
    before = proposer.kinds.trials.copy()
    tree_steps.teach(runner, step, {0: verify_greedy(pruned, np.eye(6)[[5, 0]])})
    assert (proposer.kinds.trials == before).all()
