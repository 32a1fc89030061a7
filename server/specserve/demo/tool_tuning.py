"""The demo model's second stage: tuning on tool-call chats so that ``tool_choice: "auto"`` calls.

Chats from :mod:`.tool_chats` are rendered with the model's own chat template (the server's
rendering), and only the assistant turns are trained (the tool list, the asks and tool results
are context). Each step also trains on windows of the base corpus, so the model keeps what it
knew. A held-out set of chats (another seed) measures how often the model calls the right tool
with the right arguments, and how often it calls when nobody asked.

Example of the assistant-span mask (pure):
    >>> assistant_mask([(0, 3), (5, 8), (8, 9)], [(3, 9)])
    [False, True, True]
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from specserve.demo.tool_chats import ToolChat, tool_chats
from specserve.demo.train import lr_at
from specserve.train_step import optimizer_step, smoothed

if TYPE_CHECKING:
    import numpy as np
    import torch

    from specserve.demo.spec import DemoSpec

logger = logging.getLogger(__name__)

IGNORE = -100


def assistant_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token (character ``offsets``), whether it starts inside an assistant span."""
    return [any(a <= start < b for a, b in spans) for start, _ in offsets]


@dataclass
class Row:
    ids: list[int]
    trained: list[bool]


def render(tokenizer: Any, chat: ToolChat) -> tuple[str, list[tuple[int, int]]]:
    """The chat as the server renders it, and the character spans of its assistant turns."""
    def text(messages: list[dict[str, Any]], prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, tools=chat.tools, tokenize=False,
                                                 add_generation_prompt=prompt))

    full = text(chat.messages, False)
    spans = []
    for i, message in enumerate(chat.messages):
        if message["role"] == "assistant":
            start = len(text(chat.messages[:i], True))
            end = len(text(chat.messages[: i + 1], False))
            spans.append((start, end))
    return full, spans


def encode(tokenizer: Any, chat: ToolChat) -> Row:
    full, spans = render(tokenizer, chat)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return Row(list(enc["input_ids"]), assistant_mask(enc["offset_mapping"], spans))


def _chat_batch(rows: list[Row], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        labels[i, : len(row.ids)] = torch.tensor([t if m else IGNORE for t, m in zip(row.ids, row.trained)])
    return ids, labels


def _masked_loss(model: "torch.nn.Module", ids: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def evaluate_calls(model: Any, tokenizer: Any, chats: list[ToolChat], max_new: int = 64) -> dict[str, Any]:
    """Greedy answers to the first user turn of each chat: calls made, right tool, exact calls."""
    import torch

    from specserve.demo.spec import TOOL_CALL_END, TOOL_CALL_START

    model.eval()
    end_ids = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    asked = right = exact = false_calls = not_asked = 0
    samples = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat.messages[:1], tools=chat.tools, tokenize=False,
                                               add_generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=end_ids,
                                 pad_token_id=end_ids[1])
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        called = TOOL_CALL_START in answer
        if chat.calls:
            asked += 1
            want_name, want_args = chat.calls[0]
            head = answer.split(TOOL_CALL_END)[0].removeprefix(TOOL_CALL_START)
            try:
                got = json.loads(head)
            except ValueError:
                got = None
            if isinstance(got, dict) and got.get("name") == want_name:
                right += 1
                exact += got.get("arguments") == json.loads(want_args)
        else:
            not_asked += 1
            false_calls += called
        if len(samples) < 6:
            samples.append({"ask": chat.messages[0]["content"], "answer": answer[:160]})
    model.train()
    return {"asked": asked, "right_tool": right, "exact_calls": exact, "not_asked": not_asked,
            "calls_not_asked": false_calls, "samples": samples}


def tune(
    model: "torch.nn.Module",
    tokenizer: Any,
    spec: "DemoSpec",
    base_tokens: "np.ndarray",
    json_answers: list[str],
    code_answers: list[str],
    progress: bool = True,
) -> dict[str, Any]:
    """Tune ``model`` in place on tool chats mixed with base-corpus windows; returns the record."""
    import numpy as np
    import torch

    from specserve.demo.train import lm_batch, lm_loss

    torch.manual_seed(spec.tool_seed)
    torch.set_num_threads(spec.threads)
    gen = np.random.default_rng(spec.tool_seed)
    train_chats = tool_chats(spec.tool_chats, spec.tool_seed, spec.tool_call_share, json_answers, code_answers)
    held_out = tool_chats(spec.tool_eval_chats, spec.tool_seed + 1, spec.tool_call_share, json_answers,
                          code_answers)
    rows = [encode(tokenizer, c) for c in train_chats]
    rows = [r for r in rows if len(r.ids) <= spec.tool_max_tokens]
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    record: dict[str, Any] = {"train_chats": len(rows), "eval_chats": len(held_out),
                              "mean_tokens": round(sum(len(r.ids) for r in rows) / len(rows), 1), "curve": []}
    record["before"] = evaluate_calls(model, tokenizer, held_out)
    logger.info("tool tuning: before", extra={"fields": {k: v for k, v in record["before"].items() if k != "samples"}})
    opt = torch.optim.AdamW(model.parameters(), lr=spec.tool_lr, betas=(0.9, 0.95), weight_decay=0.0)
    picker = random.Random(spec.tool_seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.tool_steps, desc="demo-model tool tuning", unit="step", mininterval=2.0)
    t0 = time.monotonic()
    ema = None
    model.train()
    for step in range(spec.tool_steps):
        lr = lr_at(step, steps=spec.tool_steps, warmup=10, peak=spec.tool_lr, min_ratio=0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = _chat_batch(picker.sample(rows, spec.tool_batch), pad_id)
        loss = _masked_loss(model, ids, labels)
        if spec.tool_base_rows:
            base = lm_batch((base_tokens, base_tokens), 0.0, spec.tool_base_rows, spec.train_context, gen)
            loss = loss + spec.tool_base_weight * lm_loss(model, base)
        ema = smoothed(ema, optimizer_step(opt, loss, model.parameters()), 0.9)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % 25 == 0 or step + 1 == spec.tool_steps:
            record["curve"].append({"step": step + 1, "loss": round(ema, 4)})
            logger.info("tool tuning progress", extra={"fields": {"step": step + 1, "loss": round(ema, 4)}})
    if bar is not None:
        bar.close()
    record["train_seconds"] = round(time.monotonic() - t0, 1)
    record["after"] = evaluate_calls(model, tokenizer, held_out)
    logger.info("tool tuning: after", extra={"fields": {k: v for k, v in record["after"].items() if k != "samples"}})
    model.eval()
    return record
