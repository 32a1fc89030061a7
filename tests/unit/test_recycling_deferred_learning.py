"""Token Recycling's deferred learning: what steps without drafts teach, learnt later, leaves
the matrix step-by-step learning would, for the one-column (chain) and the wide (tree) matrix."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.drafters import recycling, recycling_proposer
from specserve_vllm.drafters.argmax_backlog import ArgmaxBacklog
from specserve_vllm.drafters.recycling_proposer import RecyclingProposer, best_candidates

VOCAB = 12


def _config() -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=2),
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: VOCAB),
    )


def test_chains_keep_one_candidate_per_token_and_trees_the_papers_eight() -> None:
    assert RecyclingProposer(_config(), tree_shape="chain").matrix.shape == (VOCAB, 1)
    assert RecyclingProposer(_config(), tree_shape="static").matrix.shape == (VOCAB, recycling.DEFAULT_K)
    assert RecyclingProposer(_config(), topk_width=3, tree_shape="chain").matrix.shape == (VOCAB, 3)


steps = st.lists(st.lists(st.integers(0, VOCAB + 2), min_size=1, max_size=6), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(steps=steps, width=st.sampled_from([1, 3]), steps_kept=st.integers(1, 5), seed=st.integers(0, 2**16),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16]), min_size=1, max_size=3),
       ring_rows=st.integers(1, 8))
def test_deferred_learning_equals_learning_every_step(steps: list[list[int]], width: int, steps_kept: int,
                                                      seed: int, dtypes: list[torch.dtype], ring_rows: int) -> None:
    """Any token sequence (repeats within and across steps, ids past the matrix, bf16 logits
    with ties, the dtype changing between steps, steps with more rows than the one-column
    matrix's buffer holds, backlogs flushed when full): once flushed, the matrix equals the one
    each step's own top-k writes, and the logits the runner edits after the feed do not change it."""
    gen = torch.Generator().manual_seed(seed)
    old = recycling_proposer.BACKLOG_STEPS
    recycling_proposer.BACKLOG_STEPS = steps_kept
    try:
        deferred = RecyclingProposer(_config(), topk_width=width, tree_shape="chain")
        at_once = RecyclingProposer(_config(), topk_width=width, tree_shape="chain")
        deferred._argmax = ArgmaxBacklog(ring_rows)
        for i, tokens in enumerate(steps):
            dtype = dtypes[i % len(dtypes)]
            # Logits wider than the matrix (a padded vocabulary), rounded so that ties happen.
            logits = (torch.randn(len(tokens), VOCAB + 2, generator=gen) * 2).round().to(dtype)
            top = torch.topk(logits.float(), width, dim=-1).indices if width > 1 else torch.from_numpy(best_candidates(logits))
            at_once.observe_topk(torch.tensor(tokens), top, VOCAB + 2)
            deferred.observe_logits(torch.tensor(tokens), logits)
            logits.fill_(0.0)  # the sampler edits the runner's tensor after the feed
            assert len(deferred._backlog) < steps_kept and deferred._argmax.steps < steps_kept
    finally:
        recycling_proposer.BACKLOG_STEPS = old
    deferred.flush_backlog()
    assert np.array_equal(deferred.matrix, at_once.matrix)
    assert not deferred._backlog and not len(deferred._argmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_best_candidates_is_the_first_maximum_of_each_row(dtype: torch.dtype) -> None:
    logits = torch.tensor([[0.0, 1.0, 1.0, -2.0], [5.0, 5.0, 0.0, 0.0], [-1.0, -3.0, -1.0, -0.5]], dtype=dtype)
    got = best_candidates(logits)
    assert got.dtype == np.int64 and got.shape == (3, 1)
    assert got[:, 0].tolist() == [1, 0, 3] == logits.float().argmax(dim=-1).tolist()


def test_nothing_of_the_runners_tensors_is_kept() -> None:
    proposer = RecyclingProposer(_config(), tree_shape="chain")
    tokens = torch.tensor([3, 4])
    logits = torch.zeros(2, VOCAB)
    logits[0, 7] = logits[1, 9] = 1.0
    proposer.observe_logits(tokens, logits)
    tokens.fill_(0)
    logits.fill_(0.0)
    logits[:, 2] = 1.0
    proposer.flush_backlog()
    assert proposer.matrix[3, 0] == 7 and proposer.matrix[4, 0] == 9 and proposer.matrix[0, 0] == recycling.EMPTY
