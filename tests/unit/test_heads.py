"""Medusa / Hydra heads: module shapes, dependence structure, checkpoint round trip, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specserve_vllm.heads.checkpoint import load_heads, save_heads
from specserve_vllm.heads.config import CheckpointError, HeadsConfig, read_config
from specserve_vllm.heads.model import HydraHeads, MedusaHeads, build_heads


def _config(kind: str, heads: int = 3, d: int = 8, vocab: int = 16, layers: int = 1) -> HeadsConfig:
    return HeadsConfig(kind=kind, num_heads=heads, hidden_size=d, vocab_size=vocab, num_layers=layers)  # type: ignore[arg-type]


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_head_shapes(kind: str) -> None:
    heads = build_heads(_config(kind, heads=3, d=8, layers=2))
    out = heads(torch.randn(5, 8), torch.randn(5, 3, 8))
    assert out.shape == (5, 3, 8)
    drafts = heads.draft(torch.randn(5, 8), torch.zeros(5, dtype=torch.long), torch.randn(16, 8),
                         torch.randn(16, 8), 2)
    assert drafts.shape == (5, 2) and drafts.dtype == torch.long


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_untrained_heads_predict_the_targets_next_token(kind: str) -> None:
    # Zero-initialised projections: every head's state is the hidden state itself.
    heads = build_heads(_config(kind))
    hidden = torch.randn(4, 8)
    assert torch.equal(heads(hidden, torch.randn(4, 3, 8)), hidden[:, None, :].expand(4, 3, 8))


def test_hydra_heads_depend_on_earlier_tokens_and_medusa_heads_do_not() -> None:
    hydra, medusa = HydraHeads(_config("hydra")), MedusaHeads(_config("medusa"))
    _randomize(hydra)
    _randomize(medusa)
    hidden = torch.randn(2, 8)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    b[:, 0] = a[:, 0]  # same first token embedding, different later ones
    ha, hb = hydra(hidden, a), hydra(hidden, b)
    assert torch.allclose(ha[:, 0], hb[:, 0])  # head 0 sees only the first token
    assert not torch.allclose(ha[:, 1], hb[:, 1])  # head 1 sees the second one too
    assert torch.equal(medusa(hidden, a), medusa(hidden, b))


def test_hydra_draft_feeds_its_own_drafts_forward() -> None:
    heads = HydraHeads(_config("hydra", heads=3))
    _randomize(heads, seed=3)
    lm, emb = torch.randn(16, 8), torch.randn(16, 8)
    hidden, first = torch.randn(4, 8), torch.tensor([1, 2, 3, 4])
    drafts = heads.draft(hidden, first, lm, emb, 3)
    # Teacher forcing with the drafts themselves reproduces them.
    forced = torch.stack([emb[first], emb[drafts[:, 0]], emb[drafts[:, 1]]], dim=1)
    assert torch.equal((heads(hidden, forced) @ lm.T).argmax(-1), drafts)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_ragged_drafts_are_each_rows_prefix_of_the_full_draft(kind: str) -> None:
    heads = build_heads(_config(kind, heads=3))
    _randomize(heads, seed=5)
    lm, emb = torch.randn(16, 8), torch.randn(16, 8)
    hidden, first = torch.randn(5, 8), torch.tensor([1, 2, 3, 4, 5])
    full = heads.draft(hidden, first, lm, emb, 3)
    lengths = torch.tensor([1, 3, 0, 2, 3])
    ragged = heads.draft(hidden, first, lm, emb, 3, lengths)
    assert ragged.shape == (5, 3)
    for r, n in enumerate(lengths.tolist()):
        assert ragged[r, :n].tolist() == full[r, :n].tolist()
        assert (ragged[r, n:] == -1).all()
    # every row at the full depth takes the path without lengths
    assert torch.equal(heads.draft(hidden, first, lm, emb, 2, torch.tensor([3, 2, 2, 2, 2])),
                       heads.draft(hidden, first, lm, emb, 2))


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_ragged_drafts_run_a_head_only_for_the_rows_that_draft_its_position(kind: str) -> None:
    heads = build_heads(_config(kind, heads=3))
    _randomize(heads, seed=6)
    rows: list[int] = []
    for block in heads.blocks:  # every head ends in its block: count the rows each one runs on
        block.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    heads.draft(torch.randn(5, 8), torch.tensor([1, 2, 3, 4, 5]), torch.randn(16, 8), torch.randn(16, 8), 3,
                torch.tensor([1, 3, 0, 2, 3]))
    assert rows == [4, 3, 2]  # position 0: four rows draft; 1: three; 2: two (the 0-length row never)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_checkpoint_round_trip(tmp_path: Path, kind: str) -> None:
    config = HeadsConfig(kind=kind, num_heads=2, hidden_size=8, vocab_size=16,  # type: ignore[arg-type]
                         training={"fingerprint": "abc"}, heldout_top1=[0.5, 0.25])
    heads = build_heads(config)
    _randomize(heads)
    save_heads(tmp_path / "ck", config, heads)
    loaded_config, loaded = load_heads(tmp_path / "ck")
    assert loaded_config == config
    hidden, tokens = torch.randn(3, 8), torch.randn(3, 2, 8)
    assert torch.equal(loaded(hidden, tokens), heads(hidden, tokens))
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["architectures"] == [config.architecture]


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a specserve-heads"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="unknown head kind"):
        HeadsConfig(kind="eagle", num_heads=1, hidden_size=1, vocab_size=1)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="num_heads"):
        _config("medusa", heads=0)
    save_heads(tmp_path / "ck", _config("medusa", heads=2), build_heads(_config("medusa", heads=2)))
    bad = json.loads((tmp_path / "ck" / "config.json").read_text())
    bad["num_heads"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="do not match"):
        load_heads(tmp_path / "ck")


def test_warm_up_drafts_once_at_every_row_count_with_every_head() -> None:
    """A bf16 matmul's first call at a new number of rows builds its kernel on CPU: the
    proposer pays that at load time, for every batch size the engine can schedule."""
    from types import SimpleNamespace

    from specserve_vllm.heads.proposer import HeadsProposer

    heads = build_heads(HeadsConfig(kind="hydra", num_heads=3, hidden_size=8, vocab_size=16))
    calls: list[tuple[int, int]] = []

    def draft(hidden: torch.Tensor, first: torch.Tensor, lm_head: torch.Tensor, embed: torch.Tensor,
              k: int) -> torch.Tensor:
        calls.append((hidden.shape[0], k))
        return HydraHeads.draft(heads, hidden, first, lm_head, embed, k)

    stub = SimpleNamespace(heads=SimpleNamespace(draft=draft), lm_head=torch.randn(16, 8, dtype=torch.bfloat16),
                           embed=torch.randn(16, 8, dtype=torch.bfloat16), config=SimpleNamespace(hidden_size=8),
                           max_rows=5, chain_depth=3)
    heads.to(torch.bfloat16)
    HeadsProposer.warm_up(stub)  # type: ignore[arg-type]
    assert calls == [(n, 3) for n in range(1, 6)]
    calls.clear()
    stub.lm_head, stub.embed = stub.lm_head.float(), stub.embed.float()
    HeadsProposer.warm_up(stub)  # type: ignore[arg-type]
    assert calls == []  # fp32 builds no kernel per shape: nothing to warm
