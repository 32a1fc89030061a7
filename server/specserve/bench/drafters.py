"""``specserve bench drafters``: acceptance (τ) and speed of each drafter on the real engine.

For each drafter (``none``, vLLM's ``ngram`` and ``vllm-medusa`` — vLLM's own Medusa proposer fed
our Medusa heads converted to its format — and specserve's ``recycling``, ``medusa``, ``hydra``) an
in-process vLLM engine runs the same prompts — windows of the demo model's held-out stdlib files ("continue this
code file"), ``--prompts`` per batch size and different for each — greedy, ``--max-tokens`` new tokens, at batch 1
(one request at a time) and batch 8.
Reports per drafter and batch: τ = mean tokens emitted per verification step (1 + accepted drafts
per step), acceptance rate per draft position, output tokens/s, speedup vs ``none`` in the same
run, and whether the outputs equal ``none``'s token for token. JSON on stdout, one summary line on stderr.

τ example: 10 verification steps that accepted 12 drafts in all emit 10 + 12 tokens, τ = 2.2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def tau(num_steps: int, num_accepted: int) -> float:
    """Mean tokens per verification step: ``(steps + accepted) / steps`` (1.0 when no step).

    >>> tau(10, 12)
    2.2
    >>> tau(0, 0)
    1.0
    """
    return 1.0 if num_steps == 0 else round((num_steps + num_accepted) / num_steps, 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--drafters", default="none,ngram,vllm-medusa,recycling,medusa,hydra")
    parser.add_argument("--medusa-heads", default=None, help="Medusa head checkpoint (default: the demo model's)")
    parser.add_argument("--hydra-heads", default=None, help="Hydra head checkpoint (default: the demo model's)")
    parser.add_argument("--vllm-medusa-heads", default=None,
                        help="Medusa heads in vLLM's format (`specserve heads convert`; default: the demo model's)")
    parser.add_argument("--k", type=int, default=4, help="tokens drafted per step")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts per batch size (each batch size its own)")
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--dtype", default="auto",
                        help="model dtype: auto (vLLM's choice, bfloat16 for a float32 model on CPU, where near-tied "
                             "logits can resolve differently in a verification step) or float32")


def window_starts(length: int, n_tokens: int, windows: int) -> list[int]:
    """Start offsets of up to ``windows`` prompt windows of ``n_tokens`` in a file of ``length``
    tokens, each window followed by a gap as long as itself, so no window is the text that
    follows another.

    >>> window_starts(1000, 192, 4), window_starts(100, 192, 4)
    ([0, 384, 768], [])
    """
    return [w * 2 * n_tokens for w in range(windows) if w * 2 * n_tokens + n_tokens <= length]


def held_out_prompts(model_dir: Path, n: int, n_tokens: int, *, windows_per_file: int = 1) -> list[list[int]]:
    """``n`` distinct prompts of ``n_tokens`` from the demo model's held-out stdlib files
    ("continue this code file"): every file's first window, then every file's second, and so
    on up to ``windows_per_file``, so a benchmark that needs more distinct prompts than there
    are files gets later parts of them instead of repeating one. A window equal to an earlier
    one (files that open with the same header) is skipped. Fewer than ``n`` when the files run
    out (how many there are depends on the Python install's stdlib)."""
    from transformers import AutoTokenizer

    from specserve.demo.corpus import stdlib_dir

    record = json.loads((model_dir / "record.json").read_text()) if (model_dir / "record.json").exists() else {}
    files = record.get("heldout_files") or sorted(p.relative_to(stdlib_dir()).as_posix() for p in stdlib_dir().glob("*.py"))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [tok.encode(path.read_text(encoding="utf-8", errors="replace"))
             for path in (stdlib_dir() / rel for rel in files) if path.is_file()]
    starts = [window_starts(len(ids), n_tokens, windows_per_file) for ids in texts]
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for w in range(windows_per_file):
        for ids, s in zip(texts, starts):
            if w < len(s) and (key := tuple(ids[s[w] : s[w] + n_tokens])) not in seen:
                seen.add(key)
                out.append(list(key))
    return out[:n]


def _counters(llm: Any) -> dict[str, Any]:
    """vLLM's speculative counters; ``...per_pos`` is a list (one count per draft position)."""
    found: dict[str, Any] = {}
    for metric in llm.get_metrics():
        name = metric.name
        if name.startswith("vllm:spec_decode_num") and hasattr(metric, "value"):
            found[name] = float(metric.value)
        elif name.startswith("vllm:spec_decode_num") and hasattr(metric, "values"):
            found[name] = [float(v) for v in metric.values]
    return found


def per_position_rates(steps: float, accepted_per_pos: list[float]) -> list[float]:
    """Share of verification steps whose draft at each position was accepted.

    >>> per_position_rates(10, [8, 5, 1])
    [0.8, 0.5, 0.1]
    """
    return [round(a / steps, 3) if steps else 0.0 for a in accepted_per_pos]


def _run_one(model_dir: Path, drafter: str, k: int, prompts: dict[int, list[list[int]]], warm: list[int],
             max_tokens: int, heads: str | None = None, dtype: str = "auto") -> dict[str, Any]:
    """One drafter's engine: warmed up on ``warm``, then each batch size on its own prompts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.speculative_config import HEAD_DRAFTERS, speculative_config

    spec = speculative_config(drafter, k, heads=heads)  # type: ignore[arg-type]
    heads_dir = heads if drafter in HEAD_DRAFTERS and heads else settings.current().heads_dir
    with settings.override(heads_dir=heads_dir):  # the proposer reads it as the engine builds it
        llm = local_llm(model_dir, max_num_seqs=8, kv_cache_memory_bytes=256 << 20, dtype=dtype,
                        speculative_config=spec, disable_log_stats=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    result: dict[str, Any] = {}
    try:
        llm.generate([TokensPrompt(prompt_token_ids=warm)], params, use_tqdm=False)  # warm-up
        for bs, batch_prompts in prompts.items():
            before = _counters(llm)
            outputs: list[list[int]] = []
            t0 = time.perf_counter()
            for i in range(0, len(batch_prompts), bs):
                batch = [TokensPrompt(prompt_token_ids=p) for p in batch_prompts[i : i + bs]]
                outs = llm.generate(batch, params, use_tqdm=False)
                outputs.extend(list(o.outputs[0].token_ids) for o in outs)
            elapsed = time.perf_counter() - t0
            after = _counters(llm)
            steps = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
            acc = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get(
                "vllm:spec_decode_num_accepted_tokens", 0
            )
            n_tokens = sum(len(o) for o in outputs)
            per_pos_name = "vllm:spec_decode_num_accepted_tokens_per_pos"
            now, was = after.get(per_pos_name, []), before.get(per_pos_name, [])
            per_pos = [a - (was[i] if i < len(was) else 0.0) for i, a in enumerate(now)]
            result[str(bs)] = {
                "tau": tau(int(steps), int(acc)) if spec else 1.0,
                "accepted_per_position": per_position_rates(steps, per_pos),
                "tokens_per_s": round(n_tokens / elapsed, 1),
                "outputs": outputs,
            }
            logger.info("bench drafters", extra={"fields": {"drafter": drafter, "batch": bs,
                                                            "tau": result[str(bs)]["tau"],
                                                            "tok_s": result[str(bs)]["tokens_per_s"]}})
    finally:
        del llm
        gc.collect()
    return result


def _heads(args: argparse.Namespace, drafters: list[str], is_demo: bool) -> dict[str, str]:
    """Head checkpoint per head drafter in ``drafters`` (given, or the demo model's)."""
    from specserve.head_training import resolve_heads

    given = {"medusa": args.medusa_heads, "hydra": args.hydra_heads, "vllm-medusa": args.vllm_medusa_heads}
    out: dict[str, str] = {}
    for d in drafters:
        path = resolve_heads(d, given.get(d), is_demo)
        if path:
            out[d] = path
    return out


def run(args: argparse.Namespace) -> int:
    from specserve.demo import demo_model_dir

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON
    model_dir = args.model or demo_model_dir()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    from specserve.bench.trees import run_prompts

    # each batch size its own prompts, and a warm-up prompt of its own: Token Recycling learns
    # from what it serves, so a prompt served twice would be drafted from its own earlier output
    cells, warm = run_prompts(model_dir, args.prompts, args.prompt_tokens, 1, [0.0], batch_sizes)
    prompts = {bs: cells[(0, 0.0, bs)] for bs in batch_sizes}
    drafters = [d.strip() for d in args.drafters.split(",")]
    if "none" not in drafters:
        drafters.insert(0, "none")
    heads = _heads(args, drafters, is_demo=args.model is None)
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for d in drafters:
        try:
            runs[d] = _run_one(model_dir, d, args.k, prompts, warm, args.max_tokens, heads.get(d), args.dtype)
        except Exception as exc:  # one drafter failing must not lose the others' figures
            if d == "none":
                raise
            logger.exception("bench drafters: drafter failed", extra={"fields": {"drafter": d}})
            failed[d] = f"{type(exc).__name__}: {exc}"
    report: dict[str, Any] = {"model": str(model_dir), "dtype": args.dtype, "k": args.k, "prompts": args.prompts,
                              "distinct_prompts": args.prompts * len(batch_sizes),
                              "max_tokens": args.max_tokens, "drafters": {}, "failed": failed}
    for d, res in runs.items():
        report["drafters"][d] = {}
        for bs, r in res.items():
            base = runs["none"][bs]
            report["drafters"][d][bs] = {
                "tau": r["tau"],
                "accepted_per_position": r["accepted_per_position"],
                "tokens_per_s": r["tokens_per_s"],
                "speedup": round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                "identical_to_none": r["outputs"] == base["outputs"],
                "identical_outputs": f"{sum(a == b for a, b in zip(r['outputs'], base['outputs']))}/{len(base['outputs'])}",
            }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"{d}@bs{bs}: tau={v['tau']} x{v['speedup']}" for d, per in report["drafters"].items()
             for bs, v in per.items() if d != "none"]
    sys.stderr.write("drafters: " + "; ".join(parts) + "\n")
    return 0
