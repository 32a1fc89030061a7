"""Tree verification: greedy returns the longest matching path; sampling keeps the target's law."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.tree.draft import DraftTree, from_topological
from specserve_vllm.tree.verify import (
    TreeVerdict,
    row_offsets,
    sampled_token_ids,
    target_probs,
    verify_argmax,
    verify_drawn,
    verify_greedy,
)

VOCAB = 4


def verify_sampled(tree: DraftTree, probs: np.ndarray, rng: np.random.Generator) -> TreeVerdict:
    """What the engine does at temperature > 0: one draw per row from ``probs``, then the walk."""
    return verify_drawn(tree, [int(rng.choice(probs.shape[1], p=row / row.sum())) for row in probs])


@st.composite
def trees_and_argmax(draw: st.DrawFn) -> tuple[DraftTree, list[int]]:
    n = draw(st.integers(0, 14))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    tree = from_topological(tokens, parents)[0]
    argmax = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n + 1, max_size=n + 1))
    return tree, argmax


def _matches(tree: DraftTree, argmax: list[int], node: int) -> bool:
    """Every step on the path to ``node`` holds the target's argmax at its parent's row."""
    return all(tree.tokens[i] == argmax[tree.parents[i] + 1] for i in tree.node_path(node))


@settings(max_examples=400, deadline=None)
@given(trees_and_argmax(), st.floats(0.5, 30.0))
def test_one_hot_logits_return_the_longest_matching_path(case: tuple[DraftTree, list[int]], scale: float) -> None:
    tree, argmax = case
    logits = np.eye(VOCAB)[argmax] * scale  # [N+1, V] one-hot rows
    verdict = verify_greedy(tree, logits)
    longest = max((len(tree.node_path(i)) for i in range(len(tree)) if _matches(tree, argmax, i)), default=0)
    assert len(verdict.accepted) == longest
    if verdict.accepted:
        assert tree.node_path(verdict.accepted[-1]) == verdict.accepted
        assert _matches(tree, argmax, verdict.accepted[-1])
    last_row = verdict.accepted[-1] + 1 if verdict.accepted else 0
    assert verdict.tokens == (*(tree.tokens[i] for i in verdict.accepted), argmax[last_row])
    # With one-hot target probabilities sampling is deterministic and agrees with greedy when
    # siblings are distinct (with repeated siblings it takes the first, which stays lossless).
    distinct = all(len({tree.tokens[c] for c in tree.children(n)}) == len(tree.children(n))
                   for n in range(-1, len(tree)))
    sampled = verify_sampled(tree, np.eye(VOCAB)[argmax], np.random.default_rng(0))
    # Whatever branch it took, sampling accepted a path the target agrees with, then the target's token.
    if sampled.accepted:
        assert tree.node_path(sampled.accepted[-1]) == sampled.accepted
        assert _matches(tree, argmax, sampled.accepted[-1])
    sampled_row = sampled.accepted[-1] + 1 if sampled.accepted else 0
    assert sampled.tokens == (*(tree.tokens[i] for i in sampled.accepted), argmax[sampled_row])
    if distinct:
        assert sampled == verdict


def test_greedy_on_a_chain_is_chain_verification() -> None:
    tree = DraftTree.chain([3, 1, 2])
    logits = np.eye(VOCAB)[[3, 1, 0, 2]]
    assert verify_greedy(tree, logits) == TreeVerdict((0, 1), (3, 1, 0))
    assert verify_argmax(tree, [3, 1, 0, 2]) == verify_drawn(tree, [3, 1, 0, 2]) == TreeVerdict((0, 1), (3, 1, 0))
    with pytest.raises(ValueError, match="rows"):
        verify_greedy(tree, logits[:3])
    with pytest.raises(ValueError, match="row tokens"):
        verify_drawn(tree, [3, 1, 0])


# A toy target model: its next-token distribution is a fixed function of the whole context.
@cache
def _target(context: tuple[int, ...]) -> np.ndarray:
    seed = zlib.crc32(bytes(context))
    logits = np.random.default_rng(seed).normal(0.0, 1.5, VOCAB)
    return target_probs(logits[None, :], 1.0)[0]


def _rows(tree: DraftTree, prefix: tuple[int, ...]) -> np.ndarray:
    return np.stack([_target(prefix), *(_target(prefix + tree.path_to(i)) for i in range(len(tree)))])


Verifier = Callable[[DraftTree, np.ndarray, np.random.Generator], TreeVerdict]


def _emitted_law(tree: DraftTree, verifier: Verifier, draws: int, length: int, seed: int) -> Counter:
    """Counts of the first ``length`` tokens: one tree step, then plain target sampling."""
    prefix = (1, 2)
    rows = _rows(tree, prefix)
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    for _ in range(draws):
        out = list(verifier(tree, rows, rng).tokens)
        while len(out) < length:
            out.append(int(rng.choice(VOCAB, p=_target(prefix + tuple(out)))))
        counts[tuple(out[:length])] += 1
    return counts


def _chi2(counts: Counter, length: int, draws: int) -> tuple[float, int]:
    prefix = (1, 2)
    stat, cells = 0.0, 0
    for seq in np.ndindex(*(VOCAB,) * length):
        p = 1.0
        for j in range(length):
            p *= _target(prefix + tuple(int(t) for t in seq[:j]))[seq[j]]
        expected = p * draws
        stat += (counts.get(tuple(int(t) for t in seq), 0) - expected) ** 2 / expected
        cells += 1
    return stat, cells - 1


def _critical(df: int, z: float = 3.29) -> float:
    """Chi-square quantile (Wilson-Hilferty); z = 3.29 is the 0.9995 normal quantile."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * np.sqrt(a)) ** 3


TREES = {
    "chain": DraftTree.chain([0, 1, 2]),
    "wide": from_topological([0, 1, 2, 3, 0, 1, 2], [-1, -1, -1, 0, 0, 1, 4])[0],
    "duplicate siblings": DraftTree(tokens=(2, 0, 2, 3), parents=(-1, 0, -1, 2)),
}


@pytest.mark.parametrize("name", list(TREES))
def test_sampling_verification_emits_the_targets_distribution(name: str) -> None:
    tree, draws, length = TREES[name], 20000, 3
    stat, df = _chi2(_emitted_law(tree, verify_sampled, draws, length, seed=7), length, draws)
    assert stat < _critical(df), f"chi2 {stat:.1f} over {df} degrees of freedom for the {name} tree"


def _greedy_when_drafted(tree: DraftTree, probs: np.ndarray, rng: np.random.Generator) -> TreeVerdict:
    """A lossy verifier: accept a child whenever it is the target's most likely token."""
    kids = [[i for i, p in enumerate(tree.parents) if p == r - 1] for r in range(len(tree) + 1)]
    accepted: list[int] = []
    row = 0
    while True:
        best = int(probs[row].argmax())
        node = next((c for c in kids[row] if tree.tokens[c] == best), None)
        if node is None:
            x = int(rng.choice(VOCAB, p=probs[row]))
            return TreeVerdict(tuple(accepted), (*(tree.tokens[i] for i in accepted), x))
        accepted.append(node)
        row = node + 1


def test_the_distribution_test_detects_a_lossy_verifier() -> None:
    tree, draws, length = TREES["wide"], 20000, 3
    stat, df = _chi2(_emitted_law(tree, _greedy_when_drafted, draws, length, seed=7), length, draws)
    assert stat > _critical(df), f"chi2 {stat:.1f}: the test cannot tell a biased verifier apart"


def test_sampling_accepts_a_draft_with_the_targets_probability() -> None:
    tree = DraftTree(tokens=(1, 2), parents=(-1, -1))
    probs = np.array([[0.1, 0.5, 0.3, 0.1], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float64)
    rng = np.random.default_rng(3)
    firsts = Counter(verify_sampled(tree, probs, rng).accepted[:1] for _ in range(20000))
    assert abs(firsts[(0,)] / 20000 - 0.5) < 0.015 and abs(firsts[(1,)] / 20000 - 0.3) < 0.015


def test_batch_layout_helpers() -> None:
    trees = [DraftTree.chain([1]), DraftTree(tokens=(2, 3), parents=(-1, -1))]
    offsets = row_offsets(trees)
    assert offsets.tolist() == [0, 2, 5]
    logits = np.eye(VOCAB)[[1, 0, 3, 1, 1]]
    verdicts = [verify_greedy(t, logits[a:b]) for t, a, b in zip(trees, offsets[:-1], offsets[1:])]
    assert verdicts == [TreeVerdict((0,), (1, 0)), TreeVerdict((1,), (3, 1))]
    assert sampled_token_ids(verdicts, 3).tolist() == [[1, 0, -1], [3, 1, -1]]
    with pytest.raises(ValueError, match="width"):
        sampled_token_ids(verdicts, 1)
    with pytest.raises(ValueError, match="temperature"):
        target_probs(logits, 0.0)
