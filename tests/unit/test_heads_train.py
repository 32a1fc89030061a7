"""Head training pieces: data gathering, and that training learns a learnable target."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specserve.head_training.data import Distilled
from specserve.head_training.recipe import HeadsRecipe
from specserve.head_training.train import evaluate, gather, train_heads

def test_gather_aligns_heads_with_future_positions() -> None:
    tokens = torch.arange(20).reshape(2, 10)
    hidden = torch.arange(20.0).reshape(2, 10, 1)
    data = Distilled(tokens=tokens, hidden=hidden, prompt_tokens=2)
    h, nxt, teacher = gather(data, torch.tensor([1]), torch.tensor([3]), num_heads=3)
    assert h.tolist() == [[13.0]]  # the state at p = 3 of sequence 1
    assert nxt.tolist() == [[14, 15, 16]]  # x[p+1], x[p+2], x[p+3]
    assert teacher[..., 0].tolist() == [[14.0, 15.0, 16.0]]  # states predicting x[p+2..p+4]


def _synthetic(n: int, t: int, vocab: int, d: int, seed: int) -> tuple[Distilled, torch.Tensor, torch.Tensor]:
    """A 'target' whose state at p is the embedding of x[p] and which predicts x[p] + 1 (mod vocab)."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.linalg.qr(torch.randn(d, d, generator=gen))[0][:vocab]  # orthonormal rows
    lm = torch.roll(emb, shifts=1, dims=0) * 8.0  # logits peak at x + 1
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    tokens = (start + torch.arange(t)[None, :]) % vocab
    return Distilled(tokens=tokens, hidden=emb[tokens], prompt_tokens=2), lm, emb


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_training_learns_a_learnable_target(kind: str) -> None:
    data, lm, emb = _synthetic(n=64, t=24, vocab=12, d=16, seed=0)
    recipe = replace(HeadsRecipe(kind=kind), num_heads=2, steps=150, batch_positions=128, lr=1e-2)  # type: ignore[arg-type]
    heads, config, record = train_heads(recipe, data, data, lm, emb, progress=False)
    assert record["untrained"]["top1"][1] < 0.2  # untrained heads predict x + 1, not x + 3
    assert min(record["heldout"]["top1"]) > 0.9
    assert config.heldout_top1 == record["heldout"]["top1"]
    assert record["heldout"]["est_tau"] > 2.8
    assert evaluate(heads, data, lm, emb)["top1"] == record["heldout"]["top1"]
