"""Train Medusa or Hydra heads on a frozen target by self-distillation.

Each optimiser step samples ``batch_positions`` (sequence, position ``p``) pairs; head ``i``
learns the target's argmax at ``p + 1 + i`` (``"hard"``, the default: greedy acceptance is
top-1 agreement) or its whole distribution there (``"teacher"``, Hydra++'s teacher objective). Hydra heads are teacher-forced with the
sequence's own tokens ``x[p+1..p+1+i]``, which on greedy continuations are exactly the drafts a
fully accepted chain would feed them.

With ``prefix_attention`` (Hydra++) the heads read ``z_p`` of a causal block over the
sequence's hidden states ``h_0..h_p`` instead of ``h_p``: a step then samples
``PREFIX_SEQUENCES_PER_STEP`` sequences, runs the block once over each (causal mask, up to its
last sampled position) and takes ``batch_positions`` positions from them.

Evaluation on held-out sequences, generated region only: per-head top-1 agreement with the
target's argmax, and ``est_tau`` = 1 + mean length of the prefix of heads that are all right,
the τ a greedy chain draft of all heads would reach.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specserve.head_training.data import Distilled
from specserve.head_training.recipe import HeadsRecipe
from specserve.train_step import optimizer_step, smoothed
from specserve_vllm.heads.config import HeadsConfig
from specserve_vllm.heads.model import build_heads

logger = logging.getLogger(__name__)

PREFIX_SEQUENCES_PER_STEP = 32
"""Sequences per optimiser step with prefix attention (positions spread over them)."""


def gather(data: Distilled, seq: torch.Tensor, pos: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """``(hidden [B, d], next_tokens [B, H], teacher_hidden [B, H, d])`` at positions ``pos``.

    ``next_tokens[:, j] = x[p+1+j]``; ``teacher_hidden[:, j]`` is the target's state at
    ``p + 1 + j``, from which it predicts ``x[p+2+j]`` (head ``j``'s label).
    """
    ahead = pos[:, None] + 1 + torch.arange(num_heads)[None, :]  # [B, H]
    return data.hidden[seq, pos], data.tokens[seq[:, None], ahead], data.hidden[seq[:, None], ahead]


def all_head_inputs(heads: nn.Module, data: Distilled, chunk: int = 16) -> torch.Tensor:
    """The heads' input ``[N, T, d]`` at every position of ``data`` (no grad; ``data.hidden`` itself
    for heads without a prefix block)."""
    if getattr(heads, "prefix", None) is None:
        return data.hidden
    with torch.no_grad():
        return torch.cat([heads.head_inputs(data.hidden[i : i + chunk]) for i in range(0, data.hidden.shape[0], chunk)])


def sample_batch(heads: nn.Module, data: Distilled, batch_positions: int, num_heads: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One training batch ``(inputs [B, d], next_tokens [B, H], teacher_hidden [B, H, d])``.

    Without a prefix block: ``B`` independent (sequence, position) pairs. With one: positions
    spread over :data:`PREFIX_SEQUENCES_PER_STEP` sequences, the block run once per sequence
    over positions ``0..max p`` (causal, so ``z_p`` sees exactly ``h_0..h_p``).
    """
    n, t = data.tokens.shape
    if getattr(heads, "prefix", None) is None:
        seq = torch.randint(0, n, (batch_positions,), generator=gen)
        pos = torch.randint(0, t - num_heads, (batch_positions,), generator=gen)
        return gather(data, seq, pos, num_heads)
    per = max(1, batch_positions // PREFIX_SEQUENCES_PER_STEP)
    seqs = torch.randint(0, n, (PREFIX_SEQUENCES_PER_STEP,), generator=gen)
    pos = torch.randint(0, t - num_heads, (PREFIX_SEQUENCES_PER_STEP, per), generator=gen)
    z = heads.head_inputs(data.hidden[seqs, : int(pos.max()) + 1])  # [S, <=T, d]
    inputs = z[torch.arange(seqs.shape[0])[:, None], pos].reshape(-1, z.shape[-1])
    _, nxt, teacher_hidden = gather(data, seqs.repeat_interleave(per), pos.reshape(-1), num_heads)
    return inputs, nxt, teacher_hidden


def head_states(heads: nn.Module, hidden: torch.Tensor, next_tokens: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """``[B, H, d]`` head outputs (Hydra heads get the embeddings of ``next_tokens``)."""
    return heads(hidden, embed[next_tokens])


def warmup_fraction(steps: int) -> float:
    """Share of the one-cycle schedule spent warming up: 5%, at least 2 steps (short runs).

    >>> warmup_fraction(500), warmup_fraction(20)
    (0.05, 0.1)
    """
    return max(0.05, 2.0 / max(steps, 2))


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over positions and heads of the cross-entropy to the teacher (soft or argmax).

    >>> t = torch.tensor([[[0.0, 5.0]]]); s = torch.tensor([[[0.0, 5.0]]])
    >>> bool(distill_loss(s, t, "hard") < distill_loss(-s, t, "hard"))
    True
    """
    logp = torch.log_softmax(logits, dim=-1)
    if kind == "hard":
        return -logp.gather(-1, teacher_logits.argmax(-1, keepdim=True)).mean()
    return -(torch.softmax(teacher_logits, dim=-1) * logp).sum(-1).mean()


@torch.no_grad()
def evaluate(heads: nn.Module, data: Distilled, lm_head: torch.Tensor, embed: torch.Tensor,
             batch: int = 2048) -> dict[str, Any]:
    """Per-head top-1 agreement and ``est_tau`` on the generated part of ``data``."""
    heads.eval()
    n, t = data.tokens.shape
    h = heads.config.num_heads
    first = max(0, data.prompt_tokens - 1)
    seq, pos = torch.meshgrid(torch.arange(n), torch.arange(first, t - h), indexing="ij")
    seq, pos = seq.reshape(-1), pos.reshape(-1)
    inputs = all_head_inputs(heads, data)
    correct = []
    for i in range(0, seq.shape[0], batch):
        _, nxt, teacher = gather(data, seq[i : i + batch], pos[i : i + batch], h)
        hidden = inputs[seq[i : i + batch], pos[i : i + batch]]
        predicted = (head_states(heads, hidden, nxt, embed) @ lm_head.T).argmax(-1)
        correct.append(predicted == (teacher @ lm_head.T).argmax(-1))
    right = torch.cat(correct).float()  # [P, H]
    chain = torch.cumprod(right, dim=1).sum(1)
    return {"top1": [round(float(x), 4) for x in right.mean(0)], "est_tau": round(1.0 + float(chain.mean()), 3),
            "positions": int(right.shape[0])}


def train_heads(recipe: HeadsRecipe, train: Distilled, heldout: Distilled, lm_head: torch.Tensor,
                embed: torch.Tensor, progress: bool = True) -> tuple[nn.Module, HeadsConfig, dict[str, Any]]:
    """Train fresh heads; returns ``(heads, config, record)`` with held-out accuracy in both."""
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    d = train.hidden.shape[-1]
    config = HeadsConfig(kind=recipe.kind, num_heads=recipe.num_heads, hidden_size=d,
                         vocab_size=int(lm_head.shape[0]), num_layers=recipe.layers,
                         prefix_attention=recipe.prefix_attention)
    heads = build_heads(config)
    opt = torch.optim.AdamW(heads.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps,
                                                pct_start=warmup_fraction(recipe.steps))
    n, t = train.tokens.shape
    h = recipe.num_heads
    gen = torch.Generator().manual_seed(recipe.seed)
    untrained = evaluate(heads, heldout, lm_head, embed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=recipe.steps, desc=f"{recipe.kind} heads", unit="step", mininterval=2.0)
    curve = []
    ema: float | None = None
    t0 = time.monotonic()
    for step in range(recipe.steps):
        heads.train()
        hidden, nxt, teacher_hidden = sample_batch(heads, train, recipe.batch_positions, h, gen)
        with torch.no_grad():
            teacher = teacher_hidden @ lm_head.T
        loss = distill_loss(head_states(heads, hidden, nxt, embed) @ lm_head.T, teacher, recipe.loss)
        ema = smoothed(ema, optimizer_step(opt, loss, heads.parameters()), 0.95)
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % 50 == 0 or step + 1 == recipe.steps:
            curve.append({"step": step + 1, "loss": round(ema, 4)})
            logger.info("heads train progress", extra={"fields": {"kind": recipe.kind, "step": step + 1,
                                                                  "loss": round(ema, 4)}})
    if bar is not None:
        bar.close()
    seconds = round(time.monotonic() - t0, 1)
    result = evaluate(heads, heldout, lm_head, embed)
    record = {"recipe": recipe.__dict__, "fingerprint": recipe.fingerprint(), "train_seconds": seconds,
              "curve": curve, "untrained": untrained, "heldout": result,
              "train_sequences": int(n), "heldout_sequences": int(heldout.tokens.shape[0])}
    config = HeadsConfig(kind=config.kind, num_heads=config.num_heads, hidden_size=d,
                         vocab_size=config.vocab_size, num_layers=config.num_layers,
                         training=record, heldout_top1=result["top1"],
                         prefix_attention=config.prefix_attention, prefix_heads=config.prefix_heads)
    logger.info("heads trained", extra={"fields": {"kind": recipe.kind, "seconds": seconds, **result}})
    return heads.eval(), config, record


def target_info(model_dir: Path) -> dict[str, Any]:
    """What identifies the target: its directory name and, for the demo model, its recipe fingerprint."""
    import json

    info: dict[str, Any] = {"name": model_dir.name}
    record = model_dir / "record.json"
    if record.is_file():
        info["fingerprint"] = json.loads(record.read_text()).get("fingerprint")
    return info
