"""Training loop for the demo model (a small Hugging Face ``LlamaForCausalLM``, from scratch).

Rows are random windows of ``context + 1`` tokens from the tokenized corpus (code or JSON, mixed
by ``json_fraction``); AdamW with warmup and cosine decay; fp32 (CPUs without AVX-512 emulate bf16
slowly); optional ``torch.compile``. Held-out loss is reported in nats per token and bits per byte.

Example of the schedule (pure):
    >>> round(lr_at(0, steps=100, warmup=10, peak=1.0, min_ratio=0.1), 3)
    0.1
    >>> round(lr_at(10, steps=100, warmup=10, peak=1.0, min_ratio=0.1), 3)
    1.0
    >>> round(lr_at(100, steps=100, warmup=10, peak=1.0, min_ratio=0.1), 3)
    0.1
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from specserve.train_step import optimizer_step, smoothed

if TYPE_CHECKING:
    import numpy as np
    import torch

    from specserve.demo.spec import DemoSpec

logger = logging.getLogger(__name__)


def lr_at(step: int, *, steps: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warmup from ``min_ratio*peak`` to ``peak``, then cosine decay back to it."""
    floor = peak * min_ratio
    if step < warmup:
        return floor + (peak - floor) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Corpus:
    """Token arrays (uint16) for training and evaluation; documents separated by EOS."""

    code_train: "np.ndarray"
    json_train: "np.ndarray"
    code_eval: "np.ndarray"
    json_eval: "np.ndarray"


def make_model(spec: "DemoSpec", eos_id: int, bos_id: int) -> "torch.nn.Module":
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=bos_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.02,
        dtype="float32",
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def lm_batch(
    arrays: tuple["np.ndarray", "np.ndarray"],
    json_fraction: float,
    rows: int,
    context: int,
    gen: "np.random.Generator",
) -> "torch.Tensor":
    import numpy as np
    import torch

    code, js = arrays
    out = np.empty((rows, context + 1), dtype=np.int64)
    for r in range(rows):
        src = js if gen.random() < json_fraction else code
        start = int(gen.integers(0, len(src) - context - 1))
        out[r] = src[start : start + context + 1]
    return torch.from_numpy(out)


def lm_loss(model: "torch.nn.Module", batch: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def evaluate(
    model: "torch.nn.Module",
    tokens: "np.ndarray",
    byte_len: "np.ndarray",
    spec: "DemoSpec",
    batches: int,
) -> dict[str, float]:
    """Mean held-out loss (nats/token) and bits per byte over fixed, evenly spaced windows."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    model.eval()
    ctx = spec.train_context
    rows = spec.batch_size
    n_windows = batches * rows
    starts = np.linspace(0, len(tokens) - ctx - 2, n_windows).astype(np.int64)
    total_nats = 0.0
    total_tokens = 0
    total_bytes = 0
    with torch.no_grad():
        for b in range(batches):
            idx = starts[b * rows : (b + 1) * rows]
            batch = torch.from_numpy(np.stack([tokens[s : s + ctx + 1] for s in idx]).astype(np.int64))
            logits = model(input_ids=batch[:, :-1]).logits
            targets = batch[:, 1:]
            nats = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nats += float(nats)
            total_tokens += targets.numel()
            total_bytes += int(byte_len[targets.numpy()].sum())
    model.train()
    loss = total_nats / total_tokens
    return {
        "loss": round(loss, 4),
        "bits_per_byte": round(total_nats / math.log(2) / max(1, total_bytes), 4),
        "bytes_per_token": round(total_bytes / total_tokens, 3),
    }


def train(
    spec: "DemoSpec",
    corpus: Corpus,
    byte_len: "np.ndarray",
    eos_id: int,
    bos_id: int,
    progress: bool = True,
) -> tuple["torch.nn.Module", dict[str, Any]]:
    """Train from scratch; returns the (uncompiled) model and a record of the run."""
    import numpy as np
    import torch

    torch.manual_seed(spec.seed)
    torch.set_num_threads(spec.threads)
    gen = np.random.default_rng(spec.seed)
    model = make_model(spec, eos_id=eos_id, bos_id=bos_id)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model", extra={"fields": {"params": n_params}})

    record: dict[str, Any] = {"params": n_params, "curve": []}
    record["untrained"] = {
        "code": evaluate(model, corpus.code_eval, byte_len, spec, 2),
    }
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    step_fn = torch.compile(lm_loss) if spec.compile else lm_loss
    arrays = (corpus.code_train, corpus.json_train)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.steps, desc="demo-model train", unit="step", mininterval=2.0)
    t0 = time.monotonic()
    ema = None
    for step in range(spec.steps):
        lr = lr_at(step, steps=spec.steps, warmup=spec.warmup_steps, peak=spec.lr, min_ratio=spec.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = lm_batch(arrays, spec.json_fraction, spec.batch_size, spec.train_context, gen)
        loss = step_fn(model, batch)
        ema = smoothed(ema, optimizer_step(opt, loss, model.parameters()), 0.95)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}")
        if (step + 1) % 25 == 0 or step + 1 == spec.steps:
            elapsed = time.monotonic() - t0
            tok_s = (step + 1) * spec.batch_size * spec.train_context / elapsed
            record["curve"].append({"step": step + 1, "train_loss": round(ema, 4), "tok_s": round(tok_s)})
            logger.info(
                "train progress",
                extra={"fields": {"step": step + 1, "loss": round(ema, 4), "tok_s": round(tok_s)}},
            )
    if bar is not None:
        bar.close()
    record["train_seconds"] = round(time.monotonic() - t0, 1)
    record["train_tokens"] = spec.steps * spec.batch_size * spec.train_context
    record["heldout"] = {
        "code": evaluate(model, corpus.code_eval, byte_len, spec, spec.eval_batches),
        "json": evaluate(model, corpus.json_eval, byte_len, spec, max(2, spec.eval_batches // 4)),
    }
    return model, record
