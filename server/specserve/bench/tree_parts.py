"""``specserve bench tree-parts``: the cost of tree verification's parts by node count.

Per attention layer at the demo model's shapes (8 query and 8 KV heads of 32, fp32, the CPU
backend's block size 128) for one request with a ``--prefix``-token context: vLLM's native
causal kernel on the ``1 + N`` rows (what a chain costs), reading the request's K/V back from
the paged cache (``tree.cpu_kv.gather_kv``), and the dense tree attention over it; the engine's
path: the side rows only, over per-block views of the cache (``tree.cpu_kv.block_views`` +
``tree.attention.side_rows_attention``, what a tree step adds to a chain's kernel); plus the
per-step pure parts: greedy tree verification over ``[1 + N, vocab]`` logits and growing a
DySpec tree. Minimum over ``--reps`` runs (the least disturbed by other work on the machine).

JSON on stdout; one summary line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HEADS, KV_HEADS, HEAD_DIM, BLOCK, VOCAB = 8, 8, 32, 128, 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", default="4,8,16,32", help="node counts (comma-separated)")
    parser.add_argument("--prefix", type=int, default=256, help="tokens already in the cache")
    parser.add_argument("--reps", type=int, default=60, help="runs per figure (the minimum is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")


def _ms(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 4)


def measure(nodes: int, prefix: int, reps: int) -> dict[str, Any]:
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from specserve_vllm.tree.attention import side_rows_attention, side_rows_bias, tree_attention
    from specserve_vllm.tree.build import dynamic_tree, medusa_expander
    from specserve_vllm.tree.cpu_kv import block_views, gather_kv
    from specserve_vllm.tree.draft import best_path_length
    from specserve_vllm.tree.verify import verify_greedy

    isa = _get_attn_isa(torch.float32, BLOCK, HEAD_DIM, "auto")
    length, rows = prefix + 1 + nodes, 1 + nodes
    gen = torch.Generator().manual_seed(nodes)
    q = torch.randn(rows, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
    blocks = (length + BLOCK - 1) // BLOCK
    cache = torch.zeros(blocks, KV_HEADS, 2 * BLOCK, HEAD_DIM)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.arange(blocks, dtype=torch.int32)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(length), isa)
    qsl = torch.tensor([0, rows], dtype=torch.int32)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=seq_lens,
        dtype=torch.float32, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    out = torch.empty(rows, HEADS, HEAD_DIM)

    def native() -> None:
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl,
            seq_lens=seq_lens, scale=HEAD_DIM**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=table[None], softcap=0.0, scheduler_metadata=meta, s_aux=None)

    rng = np.random.default_rng(nodes)
    expand = medusa_expander(np.array([rng.permutation(VOCAB)[:4] for _ in range(nodes)]),
                             np.log(np.array([[0.5, 0.2, 0.1, 0.05]] * nodes)))
    tree = dynamic_tree(expand, nodes)
    gk, gv = gather_kv(key_cache, value_cache, table, length, isa)
    logits = rng.standard_normal((rows, VOCAB)).astype(np.float32)
    keep = 1 + best_path_length(tree)
    bias = side_rows_bias(tree, prefix, HEADS // KV_HEADS)
    ids = table.tolist()

    def side_rows() -> None:
        views = block_views(key_cache, value_cache, ids, length, isa)
        assert views is not None, f"isa {isa!r} stores blocks permuted"
        side_rows_attention(q[keep:], views[0], views[1], bias, HEAD_DIM**-0.5)

    return {
        "nodes": nodes,
        "depth": max(tree.depths()),
        "native_kernel_ms": _ms(native, reps),
        "gather_kv_ms": _ms(lambda: gather_kv(key_cache, value_cache, table, length, isa), reps),
        "tree_attention_ms": _ms(lambda: tree_attention(q, gk, gv, tree, HEAD_DIM**-0.5), reps),
        "side_rows": rows - keep,
        "side_rows_ms": _ms(side_rows, reps),
        "verify_greedy_ms": _ms(lambda: verify_greedy(tree, logits), reps),
        "dynamic_tree_ms": _ms(lambda: dynamic_tree(expand, nodes), reps),
    }


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    counts = [int(n) for n in str(args.nodes).split(",") if n.strip()]
    rows = [measure(n, args.prefix, args.reps) for n in counts]
    report = {"prefix": args.prefix, "threads": args.threads, "reps": args.reps,
              "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block": BLOCK,
                         "vocab": VOCAB, "dtype": "float32"}, "rows": rows}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    parts = [f"N={r['nodes']}: native {r['native_kernel_ms']} ms, gather+tree "
             f"{round(r['gather_kv_ms'] + r['tree_attention_ms'], 3)} ms, side rows {r['side_rows_ms']} ms"
             for r in rows]
    sys.stderr.write("per layer, prefix %d: " % args.prefix + "; ".join(parts) + "\n")
    return 0
