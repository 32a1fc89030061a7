"""The hidden-state feed for head drafters, the head proposer and the vLLM registry entries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specserve.engine import settings
from specserve.engine.settings import HEADS_ENV
from specserve_vllm.compat import hidden_feed
from specserve_vllm.heads.checkpoint import save_heads
from specserve_vllm.heads.config import CheckpointError, HeadsConfig
from specserve_vllm.heads.model import HydraHeads, build_heads
from specserve_vllm.heads.proposer import HydraProposer, MedusaProposer


def test_patch_binds_the_arguments_it_reads() -> None:
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    hidden_feed.apply()
    params = inspect.signature(GPUModelRunner.propose_draft_token_ids).parameters
    assert set(hidden_feed.ARGUMENTS) <= set(params)
    first = GPUModelRunner.propose_draft_token_ids
    hidden_feed.apply()
    assert GPUModelRunner.propose_draft_token_ids is first


def test_hidden_rows_follow_vllms_medusa_branch() -> None:
    states = torch.arange(7.0)[:, None]  # rows 0..6
    meta = SimpleNamespace(num_draft_tokens=[2, 0, 3])  # blocks [0..2], [3], [4..6]
    picked = hidden_feed._hidden_per_request([[5, 6, 7], [8], [9]], states, meta)
    assert picked[:, 0].tolist() == [2.0, 3.0, 4.0]
    # Prefill / no drafts: one row per request already.
    assert hidden_feed._hidden_per_request([[1], [2]], states[:2], None) is not None


def _vllm_config(k: int, hidden: int = 8, vocab: int = 16, max_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_len, get_vocab_size=lambda: vocab,
                                     get_hidden_size=lambda: hidden, model_impl="auto", convert_type="none"),
    )


@pytest.fixture
def hydra_dir(tmp_path: Path) -> Iterator[Path]:
    config = HeadsConfig(kind="hydra", num_heads=3, hidden_size=8, vocab_size=16)
    heads = build_heads(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    save_heads(tmp_path / "hydra", config, heads)
    with settings.override(heads_dir=str(tmp_path / "hydra")):
        yield tmp_path / "hydra"


def test_proposer_checks_the_checkpoint(hydra_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="not medusa"):
        MedusaProposer(_vllm_config(2))
    with pytest.raises(CheckpointError, match="exceeds the 3 heads"):
        HydraProposer(_vllm_config(4))
    with pytest.raises(CheckpointError, match="the target has hidden=4"):
        HydraProposer(_vllm_config(2, hidden=4))
    with settings.override(heads_dir=None), pytest.raises(CheckpointError, match=HEADS_ENV):
        HydraProposer(_vllm_config(2))


def test_proposer_drafts_from_the_fed_hidden_state(hydra_dir: Path) -> None:
    proposer = HydraProposer(_vllm_config(3, max_len=12))
    lm, emb = torch.randn(16, 8), torch.randn(16, 8)
    target = SimpleNamespace(lm_head=SimpleNamespace(weight=lm),
                             model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=emb)))
    proposer.load_model(target)
    assert isinstance(proposer.heads, HydraHeads)  # resolved through vLLM's ModelRegistry
    hidden = torch.randn(3, 8)
    proposer.observe_hidden(hidden)
    # Request 0 decodes; request 1 sampled nothing this step; request 2 has room for 1 token.
    drafts = proposer.propose([[4], [], [5, 6]], np.array([5, 5, 11]), np.zeros((3, 12), dtype=np.int64))
    expected = proposer.heads.draft(hidden[[0]], torch.tensor([4]), lm, emb, 3)[0].tolist()
    assert drafts[0] == expected and drafts[1] == [] and len(drafts[2]) == 1
    # Without a fed hidden state (e.g. the feed did not run) it drafts nothing rather than guess.
    assert proposer.propose([[4]], np.array([5]), np.zeros((1, 12), dtype=np.int64)) == [[]]


def test_registry_knows_the_head_architectures() -> None:
    from vllm import ModelRegistry

    from specserve_vllm.heads import registry

    registry.register()
    assert {"SpecserveMedusaHeads", "SpecserveHydraHeads"} <= set(ModelRegistry.get_supported_archs())
