"""The step's tree plan: which requests verify trees, and their position shifts."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.tree.draft import DraftTree, depth_positions, from_topological
from specserve_vllm.tree.plan import plan_step, position_deltas


@st.composite
def steps(draw: st.DrawFn) -> tuple[list, list, list, list[int]]:
    """Requests with a proposed tree (or none), scheduled drafts (prefixes, or not), prompts."""
    trees, drafts, computed, lens = [], [], [], []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(0, 8))
        parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
        tree = from_topological(list(range(10, 10 + n)), parents)[0] if draw(st.booleans()) else None
        cut = draw(st.integers(0, n))
        sched = list(range(10, 10 + n))[:cut] if tree is None else list(tree.tokens[:cut])
        if sched and draw(st.integers(0, 4)) == 0:
            sched[-1] = 99  # the scheduled drafts are not the proposed tree's
        prefill = draw(st.integers(0, 3))  # extra scheduled tokens before the root (chunked prefill)
        trees.append(tree)
        drafts.append(sched)
        computed.append(draw(st.integers(0, 50)))
        lens.append(prefill + 1 + len(sched))
    return trees, drafts, computed, lens


@settings(deadline=None)
@given(steps())
def test_positions_follow_depth_on_tree_rows_and_stay_sequential_elsewhere(step: tuple) -> None:
    trees, drafts, computed, lens = step
    query_start = np.concatenate([[0], np.cumsum(lens)]).tolist()
    plan = plan_step(trees, drafts, query_start)
    # vLLM's positions: num_computed + 0..len-1 per request.
    positions = np.concatenate([c + np.arange(n) for c, n in zip(computed, lens)]).astype(np.int64)
    shifted = positions + position_deltas(plan, int(query_start[-1]))
    planned = {r.req_index: r for r in plan.requests}
    for i, (tree, sched) in enumerate(zip(trees, drafts)):
        rows = slice(query_start[i], query_start[i + 1])
        if i not in planned:
            assert (shifted[rows] == positions[rows]).all()
            is_branching_prefix = (tree is not None and sched and tuple(sched) == tree.tokens[: len(sched)]
                                   and tree.prefix(len(sched)) != DraftTree.chain(sched))
            assert not is_branching_prefix, "a branching tree prefix was run as a chain"
            continue
        r = planned[i]
        assert r.tree == tree.prefix(len(sched)) and r.tree.tokens == tuple(sched)
        root_row = query_start[i + 1] - len(sched) - 1
        assert r.row_start == root_row
        assert shifted[root_row : query_start[i + 1]].tolist() == depth_positions(r.tree, positions[root_row]).tolist()
        assert (shifted[query_start[i] : root_row] == positions[query_start[i] : root_row]).all()
