"""The guard that lets top-k sampling run on speculative steps without any drafts."""

from __future__ import annotations

import torch

from specserve_vllm.compat import empty_top_k


def test_empty_batch_passes_and_others_are_masked() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler

    empty_top_k.apply()
    empty_top_k.apply()
    fn = topk_topp_sampler.apply_top_k_only
    assert not hasattr(fn.__wrapped__, "__wrapped__")
    empty = torch.zeros(0, 7)
    assert fn(empty, torch.zeros(0, dtype=torch.int32)).shape == (0, 7)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    out = fn(logits.clone(), torch.tensor([2]))
    assert torch.isinf(out).tolist() == [[True, False, True, False]]
