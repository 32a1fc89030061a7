"""The logits-feed patch that gives Token Recycling the target's top-k: behaviour."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
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
    tokens, topk = logits_feed._observed_topk(runner, logits)
    assert tokens.tolist() == [6, 8] and topk.tolist() == [[8, 2], [6, 1]]
    proposer.observe_topk(tokens, topk)
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
