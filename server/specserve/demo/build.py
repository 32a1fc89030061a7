"""Build the demo model end to end: corpus -> tokenizer -> training -> HF directory + record.

The output directory is what vLLM loads (``config.json``, ``model.safetensors``, tokenizer files
with a chat template, ``generation_config.json``) plus ``record.json``: the recipe fingerprint,
held-out split, losses, bits per byte and greedy samples.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from specserve.demo.corpus import (
    is_heldout,
    json_documents,
    maybe_chat,
    python_sources,
)
from specserve.demo.spec import DemoSpec

logger = logging.getLogger(__name__)

SAMPLE_PROMPTS: tuple[str, ...] = (
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "def fibonacci(n):\n",
    '{\n  "name": "',
)


def _encode_docs(tok: Any, docs: list[str], eos_id: int) -> "Any":
    import numpy as np

    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.uint16)


def _greedy_samples(model: Any, tok: Any, max_new: int = 64) -> list[dict[str, str]]:
    import torch

    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            for _ in range(max_new):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        out.append({"prompt": prompt, "completion": tok.decode(ids[0].tolist()[len(tok.encode(prompt).ids) :])})
    return out


def build(out_dir: Path, spec: DemoSpec, progress: bool = True) -> dict[str, Any]:
    """Train the demo model into ``out_dir`` (written atomically via a temp dir); returns the record."""
    import numpy as np

    from specserve.demo.tokenizer import byte_lengths, save_tokenizer, train_tokenizer
    from specserve.demo.train import Corpus, train

    t0 = time.monotonic()
    rng = random.Random(spec.seed)
    sources = list(python_sources())
    heldout = [s for s in sources if is_heldout(s.relpath, spec.heldout_modulus)]
    train_src = [s for s in sources if not is_heldout(s.relpath, spec.heldout_modulus)]
    jdocs = json_documents(spec.json_documents, spec.seed)
    n_json_eval = max(50, len(jdocs) // 20)
    json_eval, json_train = jdocs[:n_json_eval], jdocs[n_json_eval:]
    logger.info(
        "corpus",
        extra={
            "fields": {
                "train_files": len(train_src),
                "heldout_files": len(heldout),
                "train_mb": round(sum(len(s.text) for s in train_src) / 1e6, 1),
                "json_docs": len(jdocs),
            }
        },
    )

    code_docs = [maybe_chat(s.text, "code", rng, spec.chat_fraction * 0.1) for s in train_src]
    json_docs = [maybe_chat(d, "json", rng, spec.chat_fraction) for d in json_train]
    tok = train_tokenizer(code_docs + json_docs, spec.vocab_size)
    eos_id = tok.token_to_id("<|endoftext|>")
    end_id = tok.token_to_id("<|end|>")
    logger.info("tokenizer trained", extra={"fields": {"vocab": tok.get_vocab_size()}})

    corpus = Corpus(
        code_train=_encode_docs(tok, code_docs, eos_id),
        json_train=_encode_docs(tok, json_docs, eos_id),
        code_eval=_encode_docs(tok, [s.text for s in heldout], eos_id),
        json_eval=_encode_docs(tok, json_eval, eos_id),
    )
    logger.info(
        "corpus tokenized",
        extra={"fields": {"code_train_tokens": len(corpus.code_train), "json_train_tokens": len(corpus.json_train)}},
    )
    byte_len = np.asarray(byte_lengths(tok), dtype=np.int64)
    model, record = train(spec, corpus, byte_len, eos_id=end_id, bos_id=eos_id, progress=progress)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.eos_token_id = [end_id, eos_id]
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tok, tmp, spec.context)
    gen_config = {"bos_token_id": eos_id, "eos_token_id": [end_id, eos_id], "pad_token_id": eos_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2) + "\n")

    record.update(
        {
            "spec": {k: v for k, v in spec.__dict__.items()},
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "heldout_files": [s.relpath for s in heldout],
            "samples": _greedy_samples(model, tok),
            "build_seconds": round(time.monotonic() - t0, 1),
        }
    )
    record["fingerprint"] = spec.base_fingerprint()
    (tmp / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    if spec.tool_steps > 0:
        record = tool_stage(tmp, spec, model=model, progress=progress)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    logger.info("demo model built", extra={"fields": {"dir": str(out_dir), "heldout": record["heldout"]}})
    return record


def _base_corpus(tok: Any, spec: DemoSpec) -> tuple["Any", list[str], list[str]]:
    """Training windows of the first stage's corpus (replayed during tool tuning), and short JSON
    documents and Python snippets (the answers of chats that ask for them rather than a call)."""
    import numpy as np

    sources = [s for s in python_sources() if not is_heldout(s.relpath, spec.heldout_modulus)]
    jdocs = json_documents(spec.json_documents, spec.seed)
    json_train = jdocs[max(50, len(jdocs) // 20):]
    eos_id = tok.token_to_id("<|endoftext|>")
    code = _encode_docs(tok, [s.text for s in sources], eos_id)
    js = _encode_docs(tok, json_train, eos_id)
    rng = np.random.default_rng(spec.tool_seed)
    # The first stage's mix: json_fraction of the windows from JSON (by token share here).
    n_json = int(len(code) * spec.json_fraction / (1 - spec.json_fraction))
    start = int(rng.integers(0, max(1, len(js) - n_json)))
    tokens = np.concatenate([code, js[start : start + n_json]])
    snippets = [s.text[: s.text.find("\n\n", 120) + 1 or 300] for s in sources[::25] if len(s.text) > 400]
    return tokens, [d for d in json_train if len(d) < 300][:400], [c for c in snippets if 80 < len(c) < 500]


def heldout_losses(model: Any, tok: Any, spec: DemoSpec) -> dict[str, Any]:
    """The first stage's held-out evaluation (code files, generated JSON) for ``model``."""
    import numpy as np

    from specserve.demo.tokenizer import byte_lengths
    from specserve.demo.train import evaluate

    heldout = [s for s in python_sources() if is_heldout(s.relpath, spec.heldout_modulus)]
    jdocs = json_documents(spec.json_documents, spec.seed)
    eos_id = tok.token_to_id("<|endoftext|>")
    byte_len = np.asarray(byte_lengths(tok), dtype=np.int64)
    code = _encode_docs(tok, [s.text for s in heldout], eos_id)
    js = _encode_docs(tok, jdocs[: max(50, len(jdocs) // 20)], eos_id)
    return {"code": evaluate(model, code, byte_len, spec, spec.eval_batches),
            "json": evaluate(model, js, byte_len, spec, max(2, spec.eval_batches // 4))}


def tool_stage(directory: Path, spec: DemoSpec, model: Any = None, progress: bool = True) -> dict[str, Any]:
    """Tune the first-stage model saved in ``directory`` on tool chats, in place; returns the record."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from specserve.demo.tool_tuning import tune

    t0 = time.monotonic()
    record = json.loads((directory / "record.json").read_text())
    if record.get("fingerprint") != spec.base_fingerprint():
        raise ValueError(f"{directory} is not the first stage of this recipe "
                         f"({record.get('fingerprint')} != {spec.base_fingerprint()})")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    if model is None:
        model = LlamaForCausalLM.from_pretrained(directory, dtype="float32")
    base_tokens, json_answers, code_answers = _base_corpus(tokenizer.backend_tokenizer, spec)
    tools = tune(model, tokenizer, spec, base_tokens, json_answers, code_answers, progress=progress)
    tools["heldout_before"] = record.get("heldout")
    tools["heldout_after"] = heldout_losses(model, tokenizer.backend_tokenizer, spec)
    model.save_pretrained(directory, safe_serialization=True)
    record.update({
        "heldout": tools["heldout_after"],
        "fingerprint": spec.fingerprint(),
        "base_fingerprint": spec.base_fingerprint(),
        "spec": {k: v for k, v in spec.__dict__.items()},
        "tool_tuning": tools,
        "samples": _greedy_samples(model, tokenizer.backend_tokenizer),
        "tool_stage_seconds": round(time.monotonic() - t0, 1),
    })
    (directory / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def build_from_base(base_dir: Path, out_dir: Path, spec: DemoSpec, progress: bool = True) -> dict[str, Any]:
    """The second stage alone: copy the first-stage model in ``base_dir`` and tune it into ``out_dir``."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp)
    record = tool_stage(tmp, spec, progress=progress)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    logger.info("demo model tuned", extra={"fields": {"dir": str(out_dir), "tools": record["tool_tuning"]["after"]}})
    return record
