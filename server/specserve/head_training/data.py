"""Self-distillation data: sequences the target itself generates, with its hidden states.

Prompts are ``prompt_tokens``-long windows of a corpus (by default the demo model's training
split: stdlib files not held out, plus generated JSON; the held-out files give the evaluation
prompts). The target continues each greedily for ``new_tokens`` tokens, so the heads learn the
continuations the target really produces at temperature 0. Stored per sequence: token ids
``[T]`` and the target's final-norm hidden states ``[T, d]``; the target's next-token
distribution at any position is ``softmax(hidden @ W.T)``, computed on the fly from the hidden
states (cheaper than storing ``[T, vocab]``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".py", ".txt", ".md", ".json", ".rst")


@dataclass
class Distilled:
    """``tokens [N, T]`` (prompt + greedy continuation) and final hidden states ``[N, T, d]``."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    prompt_tokens: int


def windows(token_lists: Iterable[list[int]], length: int, count: int, seed: int) -> list[list[int]]:
    """Up to ``count`` windows of exactly ``length`` tokens, at most one per document, shuffled.

    >>> windows([[1, 2, 3, 4], [5, 6], [7, 8, 9]], 3, 5, seed=0)
    [[7, 8, 9], [2, 3, 4]]
    """
    rng = random.Random(seed)
    out = []
    for ids in token_lists:
        if len(ids) >= length:
            start = rng.randrange(0, len(ids) - length + 1)
            out.append(ids[start : start + length])
    rng.shuffle(out)
    return out[:count]


def demo_corpus(heldout: bool) -> list[str]:
    """Texts of the demo model's training (or held-out) split."""
    from specserve.demo.corpus import is_heldout, json_documents, python_sources
    from specserve.demo.spec import DemoSpec

    spec = DemoSpec()
    code = [s.text for s in python_sources() if is_heldout(s.relpath, spec.heldout_modulus) == heldout]
    docs = json_documents(spec.json_documents, spec.seed)
    n_eval = max(50, len(docs) // 20)
    return code + (docs[:n_eval] if heldout else docs[n_eval:])


def directory_corpus(root: Path, heldout: bool, modulus: int = 20) -> list[str]:
    """Text files under ``root``; every ``modulus``-th file (sorted) is held out."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if root.is_file():
        paths = [root]
    texts = []
    for i, path in enumerate(paths):
        if (i % modulus == modulus - 1) != heldout and len(paths) > 1:
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def load_target(model_dir: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the target in fp32 eval mode, frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(model_dir))


@torch.no_grad()
def generate(model: Any, prompts: list[list[int]], new_tokens: int, batch_size: int = 32,
             progress: Any = None) -> torch.Tensor:
    """Greedy continuations: ``[len(prompts), len(prompt) + new_tokens]`` (prompts of equal length)."""
    rows = []
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i : i + batch_size], dtype=torch.long)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        rows.append(out[:, : ids.shape[1] + new_tokens])
        if progress is not None:
            progress.update(ids.shape[0])
    return torch.cat(rows)


@torch.no_grad()
def hidden_states(model: Any, tokens: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Final-norm hidden states ``[N, T, d]`` of the target on ``tokens [N, T]``."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return torch.cat([inner(input_ids=tokens[i : i + batch_size]).last_hidden_state
                      for i in range(0, tokens.shape[0], batch_size)])


def distill(model: Any, tokenizer: Any, texts: list[str], count: int, prompt_tokens: int,
            new_tokens: int, seed: int, progress: bool = True, desc: str = "heads data") -> Distilled:
    """Generate ``count`` self-distillation sequences from ``texts``."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    encoded: list[list[int]] = []
    for i in order:  # encode only as many documents as needed (encoding a whole corpus is slow)
        ids = tokenizer.encode(texts[i][: prompt_tokens * 64])
        if len(ids) >= prompt_tokens:
            encoded.append(ids)
            if len(encoded) == count:
                break
    prompts = windows(encoded, prompt_tokens, count, seed)
    if not prompts:
        raise ValueError(f"no document has {prompt_tokens} tokens; nothing to train on")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="seq", mininterval=2.0)
    tokens = generate(model, prompts, new_tokens, progress=bar)
    if bar is not None:
        bar.close()
    logger.info("distilled sequences", extra={"fields": {"sequences": tokens.shape[0], "length": tokens.shape[1]}})
    return Distilled(tokens=tokens, hidden=hidden_states(model, tokens), prompt_tokens=prompt_tokens)
