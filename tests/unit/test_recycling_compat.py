"""The logits-feed patch that gives Token Recycling the target's top-k: behaviour."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specserve_vllm.compat import logits_feed
from specserve_vllm.drafters.recycling_proposer import CLASS_PATH, RecyclingProposer


def test_apply_is_idempotent() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    logits_feed.apply()
    first = (GPUModelRunner._prepare_inputs, GPUModelRunner._sample)
    logits_feed.apply()
    assert (GPUModelRunner._prepare_inputs, GPUModelRunner._sample) == first
    # other patches may wrap _sample around it, but logits_feed's layer is there exactly once
    layers, fn = [], first[1]
    while fn is not None:
        layers.append(fn.__code__.co_filename)
        fn = getattr(fn, "__wrapped__", None)
    assert sum(name.endswith("logits_feed.py") for name in layers) == 1


def _config(vocab: int, k: int, max_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_len, get_vocab_size=lambda: vocab),
    )


def test_feed_then_propose() -> None:
    proposer = RecyclingProposer(_config(vocab=10, k=3), topk_width=2)
    # Flattened inputs [5, 6, 7, 8]; logits rows at positions 1 and 3 (inputs 6 and 8).
    logits = torch.full((2, 10), -1.0)
    logits[0, 8], logits[0, 2] = 3.0, 2.0  # after 6: 8 then 2
    logits[1, 6], logits[1, 1] = 3.0, 1.0  # after 8: 6 then 1
    runner = SimpleNamespace(
        drafter=proposer,
        input_ids=SimpleNamespace(gpu=torch.tensor([5, 6, 7, 8])),
        _specserve_logits_indices=torch.tensor([1, 3]),
    )
    tokens, topk, width = logits_feed._observed_topk(runner, logits)
    assert tokens.tolist() == [6, 8] and topk.tolist() == [[8, 2], [6, 1]] and width == 10
    proposer.observe_topk(tokens, topk, width)
    token_ids = np.zeros((2, 64), dtype=np.int32)
    token_ids[0, :3] = [1, 2, 6]
    token_ids[1, :2] = [1, 9]
    drafts = proposer.propose([[6], []], np.array([3, 2]), token_ids)
    assert drafts == [[8, 6, 8], []]  # 6 -> 8 -> 6 -> 8; the second request is not decoding
    assert runner._specserve_logits_indices is None, "indices are used once"
    assert CLASS_PATH.endswith("RecyclingProposer")


def test_no_feed_for_drafters_without_observe_topk() -> None:
    runner = SimpleNamespace(drafter=object(), _specserve_logits_indices=torch.tensor([0]))
    assert logits_feed._observed_topk(runner, torch.zeros(1, 4)) is None


def test_propose_respects_max_model_len() -> None:
    proposer = RecyclingProposer(_config(vocab=4, k=4, max_len=5), topk_width=1)
    proposer.observe_topk(np.array([0, 1, 2, 3]), np.array([[1], [2], [3], [0]]))
    token_ids = np.zeros((1, 5), dtype=np.int32)
    assert proposer.propose([[0]], np.array([3]), token_ids) == [[1, 2]]
    assert proposer.propose([[0]], np.array([5]), token_ids) == [[]]


def test_tensor_feed_writes_what_the_numpy_update_writes() -> None:
    """The one-write path for tensors (repeated tokens included) and its fallback (candidates
    beyond the matrix) leave the matrix ``recycling.update`` would."""
    from specserve_vllm.drafters import recycling

    rng = np.random.default_rng(3)
    proposer = RecyclingProposer(_config(vocab=50, k=3), topk_width=4)
    expected = proposer.matrix.copy()
    cases = [
        (rng.choice(50, size=6, replace=False), rng.integers(0, 50, size=(6, 4)), 50),  # fast path
        (np.array([7, 9, 7]), rng.integers(0, 50, size=(3, 4)), 50),  # 7 twice: the last one wins
        (np.array([3, 3, 3, 8]), rng.integers(0, 50, size=(4, 4)), 50),
        (np.array([11]), np.array([[3, 60, 2, 1]]), 64),  # a candidate beyond the matrix: EMPTY
        (np.array([12]), np.array([[4, 5, 6, 7]]), None),  # width unknown, candidates in range
    ]
    for tokens, topk, width in cases:
        expected = recycling.update(expected, tokens, topk)
        proposer.observe_topk(torch.from_numpy(tokens), torch.from_numpy(topk), width)
        assert np.array_equal(proposer.matrix, expected)
    assert proposer.matrix[7].tolist() == topk_row(cases[1][1][2]) and proposer.matrix[11, 1] == recycling.EMPTY
    assert proposer._matrix_view is not None, "the fast path ran"


def topk_row(row: np.ndarray) -> list[int]:
    return [int(x) for x in row]


def test_logits_of_steps_without_drafts_are_learnt_in_one_batch_before_the_next_draft() -> None:
    gen = torch.Generator().manual_seed(0)
    steps = [(torch.randint(0, 12, (n,), generator=gen), torch.randn(n, 12, generator=gen)) for n in (1, 3, 2, 3)]
    steps.append((torch.tensor([4, 4]), torch.randn(2, 12, generator=gen)))  # a token twice: the last row wins
    deferred = RecyclingProposer(_config(vocab=12, k=2), topk_width=3, tree_shape="chain")
    at_once = RecyclingProposer(_config(vocab=12, k=2), topk_width=3, tree_shape="chain")
    empty = deferred.matrix.copy()
    for tokens, logits in steps:
        runner = SimpleNamespace(drafter=deferred, input_ids=SimpleNamespace(gpu=tokens),
                                 _specserve_logits_indices=torch.arange(len(tokens)))
        assert logits_feed._observe_logits(runner, logits)
        at_once.observe_topk(tokens, torch.topk(logits, 3).indices, 12)
    assert np.array_equal(deferred.matrix, empty)  # nothing drafted yet: nothing learnt yet
    token_ids = np.zeros((1, 64), dtype=np.int32)
    token_ids[0, :2] = [1, 4]
    assert deferred.propose([[4]], np.array([2]), token_ids) == at_once.propose([[4]], np.array([2]), token_ids)
    assert np.array_equal(deferred.matrix, at_once.matrix)  # the same matrix as step-by-step learning


def test_a_long_run_without_drafts_learns_when_the_backlog_fills(monkeypatch: pytest.MonkeyPatch) -> None:
    from specserve_vllm.drafters import recycling, recycling_proposer

    monkeypatch.setattr(recycling_proposer, "BACKLOG_ELEMENTS", 30)
    proposer = RecyclingProposer(_config(vocab=10, k=2), topk_width=2, tree_shape="chain")
    logits = torch.zeros(1, 10)
    logits[0, 7] = 5.0
    proposer.observe_logits(torch.tensor([3]), logits.clone())
    proposer.observe_logits(torch.tensor([5]), logits.clone())
    assert proposer.matrix[3, 0] == recycling.EMPTY  # 20 values kept, under the bound
    proposer.observe_logits(torch.tensor([6]), logits.clone())
    assert proposer.matrix[3, 0] == proposer.matrix[5, 0] == proposer.matrix[6, 0] == 7  # 30: learnt
