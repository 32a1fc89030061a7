"""Reference tree attention against vLLM's CPU attention kernel (fp32), and its tree property.

The kernel (``cpu_attention_with_kv_cache``, the op behind the CPU platform's ``CPU_ATTN``
backend) only does causal attention over a paged cache. On a chain the tree mask is causal,
so the two must agree; on a tree, each node's row must equal the kernel's last row for the
chain ``prefix, root, path to the node`` with consecutive RoPE positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specserve_vllm.tree.attention import rope_neox, tree_attention, tree_attention_mask
from specserve_vllm.tree.draft import (
    DraftTree,
    depth_positions,
    from_topological,
    leaf_paths,
)

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 64, 32
SCALE = DIM**-0.5


def _native_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU kernel: the last ``len(q)`` rows of causal attention over ``k``/``v`` (paged)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.float32, BLOCK, DIM, "auto")
    length, rows = k.shape[0], q.shape[0]
    blocks = (length + BLOCK - 1) // BLOCK + 1
    cache = torch.zeros(blocks, KV_HEADS, BLOCK * 2, DIM)  # the backend's view of its KV cache
    key_cache, value_cache = cache.chunk(2, dim=2)
    # Scatter into blocks in reverse order so the block table is not the identity.
    table = torch.arange(blocks - 1, -1, -1, dtype=torch.int32)
    pos = torch.arange(length)
    slots = table[pos // BLOCK].long() * BLOCK + pos % BLOCK
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    qsl = torch.tensor([0, rows], dtype=torch.int32)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, seq_lens=seq_lens,
        dtype=torch.float32, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    out = torch.empty(rows, HEADS, DIM)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl,
        seq_lens=seq_lens, scale=SCALE, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=table[None], softcap=0.0, scheduler_metadata=meta, s_aux=None)
    return out


@pytest.mark.parametrize("prefix_len,nodes", [(0, 0), (5, 4), (31, 1), (40, 16), (70, 7)])
def test_chain_tree_attention_equals_the_native_causal_kernel(prefix_len: int, nodes: int) -> None:
    gen = torch.Generator().manual_seed(prefix_len * 100 + nodes)
    length = prefix_len + 1 + nodes
    q = torch.randn(1 + nodes, HEADS, DIM, generator=gen)
    k = torch.randn(length, KV_HEADS, DIM, generator=gen)
    v = torch.randn(length, KV_HEADS, DIM, generator=gen)
    ours = tree_attention(q, k, v, DraftTree.chain(range(nodes)), SCALE)
    torch.testing.assert_close(ours, _native_causal(q, k, v), atol=2e-5, rtol=1e-5)


def test_every_tree_row_equals_the_native_kernel_on_its_path() -> None:
    gen = torch.Generator().manual_seed(1)
    tree = from_topological(list(range(10)), [-1, -1, -1, 0, 0, 1, 3, 3, 6, 2])[0]
    prefix_len, root_pos = 37, 37
    # One q/k/v per distinct *node* before RoPE: a token's projection depends only on the token.
    q_raw = torch.randn(1 + len(tree), HEADS, DIM, generator=gen)
    k_raw = torch.randn(prefix_len + 1 + len(tree), KV_HEADS, DIM, generator=gen)
    v_all = torch.randn(prefix_len + 1 + len(tree), KV_HEADS, DIM, generator=gen)
    tree_pos = torch.from_numpy(depth_positions(tree, root_pos))
    k_pos = torch.cat([torch.arange(prefix_len), tree_pos])
    ours = tree_attention(rope_neox(q_raw, tree_pos), rope_neox(k_raw, k_pos), v_all, tree, SCALE)
    checked = set()
    for path in leaf_paths(tree):
        rows = list(range(prefix_len)) + [prefix_len] + [prefix_len + 1 + i for i in path]
        chain_pos = torch.arange(len(rows))  # a chain's positions are consecutive
        k_chain = rope_neox(k_raw[rows], chain_pos)
        q_rows = [0] + [1 + i for i in path]
        q_chain = rope_neox(q_raw[q_rows], chain_pos[prefix_len:])
        native = _native_causal(q_chain, k_chain, v_all[rows])
        torch.testing.assert_close(ours[q_rows], native, atol=2e-5, rtol=1e-5)
        checked.update(path)
    assert checked == set(range(len(tree)))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10).flatmap(lambda n: st.tuples(*[st.integers(-1, i - 1) for i in range(n)])),
       st.integers(0, 6))
def test_a_node_sees_only_the_prefix_and_its_ancestors(parents: tuple[int, ...], prefix_len: int) -> None:
    tree = from_topological(list(range(len(parents))), list(parents))[0]
    gen = torch.Generator().manual_seed(len(parents) * 7 + prefix_len)
    n = len(tree)
    q = torch.randn(1 + n, HEADS, DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(prefix_len + 1 + n, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(prefix_len + 1 + n, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
    out = tree_attention(q, k, v, tree, SCALE)
    mask = tree_attention_mask(tree, prefix_len)
    assert mask[:, :prefix_len].all()
    for i in range(n):
        path = tree.node_path(i)
        sub = DraftTree.chain([tree.tokens[j] for j in path])  # the node as the tip of its chain
        rows = [0, *(1 + j for j in path)]
        kv_rows = list(range(prefix_len)) + [prefix_len + r for r in rows]
        alone = tree_attention(q[rows], k[kv_rows], v[kv_rows], sub, SCALE)
        torch.testing.assert_close(out[1 + i], alone[-1])
        assert np.array_equal(np.flatnonzero(mask[1 + i, prefix_len:].numpy()), np.array(rows))


def test_shape_errors() -> None:
    tree = DraftTree.chain([1, 2])
    with pytest.raises(ValueError, match="rows"):
        tree_attention(torch.zeros(2, HEADS, DIM), torch.zeros(5, KV_HEADS, DIM), torch.zeros(5, KV_HEADS, DIM), tree, SCALE)
    with pytest.raises(ValueError, match="cover"):
        tree_attention(torch.zeros(3, HEADS, DIM), torch.zeros(2, KV_HEADS, DIM), torch.zeros(2, KV_HEADS, DIM), tree, SCALE)


def _paged(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, block: int) -> tuple:
    """Write ``k``/``v`` through vLLM's op into a paged cache with a reversed block table."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block, k.shape[-1], "auto")
    blocks = (k.shape[0] + block - 1) // block + 1
    cache = torch.zeros(blocks, k.shape[1], block * 2, k.shape[-1], dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.arange(blocks - 1, -1, -1, dtype=torch.int32)
    pos = torch.arange(k.shape[0])
    slots = table[pos // block].long() * block + pos % block
    ops.cpu_attn_reshape_and_cache(k.to(dtype), v.to(dtype), key_cache, value_cache, slots, isa)
    return key_cache, value_cache, table, slots, isa


@pytest.mark.parametrize("dtype,block", [(torch.float32, 32), (torch.float32, 128), (torch.bfloat16, 128)])
def test_gather_reads_the_paged_cache_back_exactly(dtype: torch.dtype, block: int) -> None:
    from specserve_vllm.tree.cpu_kv import gather_kv

    gen = torch.Generator().manual_seed(block)
    k = torch.randn(block + 9, KV_HEADS, 32, generator=gen).to(dtype)
    v = torch.randn(block + 9, KV_HEADS, 32, generator=gen).to(dtype)
    key_cache, value_cache, table, _, isa = _paged(k, v, dtype, block)
    got_k, got_v = gather_kv(key_cache, value_cache, table, k.shape[0], isa)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_tree_rows_from_the_cache_and_compaction_through_vllms_op() -> None:
    """The engine path on a real cache: gather + tree attention on a chain equals the kernel;
    compacting an accepted side branch with vLLM's write op leaves it contiguous."""
    from vllm import _custom_ops as ops

    from specserve_vllm.tree import compaction
    from specserve_vllm.tree.cpu_kv import gather_kv

    gen = torch.Generator().manual_seed(5)
    prefix_len, nodes = 45, 6
    length = prefix_len + 1 + nodes
    q = torch.randn(1 + nodes, HEADS, DIM, generator=gen)
    k = torch.randn(length, KV_HEADS, DIM, generator=gen)
    v = torch.randn(length, KV_HEADS, DIM, generator=gen)
    key_cache, value_cache, table, slots, isa = _paged(k, v, torch.float32, BLOCK)
    gk, gv = gather_kv(key_cache, value_cache, table, length, isa)
    torch.testing.assert_close(tree_attention(q, gk, gv, DraftTree.chain(range(nodes)), SCALE),
                               _native_causal(q, k, v), atol=2e-5, rtol=1e-5)

    tree = from_topological(list(range(nodes)), [-1, 0, -1, 2, 3, 2])[0]  # 0-1 | 2-3-4, 2-5
    accepted = tree.node_path(4)  # a side branch: rows move
    row_slots = slots[prefix_len:].tolist()  # the request's 1 + N rows this step
    moves = compaction.kv_moves(tree, accepted)
    assert moves
    stash_k, stash_v = k[prefix_len:].clone(), v[prefix_len:].clone()  # the backend's per-layer stash
    src = torch.tensor([m.src for m in moves])
    dst = torch.tensor([d for _, d in compaction.slot_moves(moves, row_slots)])
    ops.cpu_attn_reshape_and_cache(stash_k[src], stash_v[src], key_cache, value_cache, dst, isa)
    kept = prefix_len + 1 + len(accepted)
    gk, gv = gather_kv(key_cache, value_cache, table, kept, isa)
    order = list(range(prefix_len + 1)) + [prefix_len + 1 + i for i in accepted]
    assert torch.equal(gk, k[order]) and torch.equal(gv, v[order])


@pytest.mark.parametrize("heads", [HEADS, KV_HEADS])  # grouped-query, and one query head per KV head
@pytest.mark.parametrize("dtype,block,prefix_len", [(torch.float32, 32, 45), (torch.float32, 128, 3),
                                                    (torch.float32, 32, 58), (torch.bfloat16, 128, 140)])
def test_side_rows_over_block_views_equal_the_reference(dtype: torch.dtype, block: int, prefix_len: int,
                                                        heads: int) -> None:
    """The engine's path (per-block views of the paged cache, side rows only, the mask split by
    block as the engine shares it across layers) computes what the dense reference computes for
    those rows. Where the machine's attention ISA packs blocks in a permuted layout (AMX's bf16
    blocks), there are no views and the engine gathers instead: that path is checked there."""
    from specserve_vllm.tree.attention import bias_by_block, side_rows_attention, side_rows_bias
    from specserve_vllm.tree.cpu_kv import _kinds, block_views, gather_kv
    from specserve_vllm.tree.draft import best_path_length

    gen = torch.Generator().manual_seed(prefix_len)
    tree = from_topological(list(range(9)), [-1, 0, 1, 0, -1, 4, 4, 6, -1])[0]
    length = prefix_len + 1 + len(tree)
    q = torch.randn(1 + len(tree), heads, DIM, generator=gen)
    k = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
    v = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
    key_cache, value_cache, table, _, isa = _paged(k, v, dtype, block)
    views = block_views(key_cache, value_cache, table.tolist(), length, isa)
    keep = 1 + best_path_length(tree)
    if "permuted" in _kinds(isa, dtype, block, DIM):
        assert views is None
        gk, gv = gather_kv(key_cache, value_cache, table, length, isa)
        got = tree_attention(q, gk.float(), gv.float(), tree, SCALE)[keep:]
    else:
        assert views is not None and sum(b.shape[2] for b in views[0]) == length
        bias = side_rows_bias(tree, prefix_len, heads // KV_HEADS)
        got = side_rows_attention(q[keep:], views[0], views[1], bias_by_block(bias, length, block), SCALE)
        whole = side_rows_attention(q[keep:], views[0], views[1], bias, SCALE)
        torch.testing.assert_close(whole, got, atol=0, rtol=0)
    want = tree_attention(q, k.float(), v.float(), tree, SCALE)[keep:]
    assert got.shape == want.shape == (len(tree) + 1 - keep, heads, DIM)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_whole_block_views_are_kept_and_read_what_fresh_views_read() -> None:
    """The engine keeps each layer's whole-block views across steps: they read the cache as
    fresh views do, also after the cache is written again, and a request's last, partly used
    block is viewed anew."""
    from specserve_vllm.tree.cpu_kv import block_views

    block, length = 32, 32 * 2 + 5
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(length, KV_HEADS, DIM, generator=gen)
    v = torch.randn(length, KV_HEADS, DIM, generator=gen)
    key_cache, value_cache, table, slots, isa = _paged(k, v, torch.float32, block)
    full: dict = {}
    first = block_views(key_cache, value_cache, table.tolist(), length, isa, full)
    if first is None:
        pytest.skip("this machine's attention ISA packs fp32 blocks in a permuted layout")
    assert sorted(full) == sorted(table[:2].tolist())  # the two whole blocks, not the partial one
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(-k, -v, key_cache, value_cache, slots, isa)  # the cache changes
    kept = block_views(key_cache, value_cache, table.tolist(), length, isa, full)
    fresh = block_views(key_cache, value_cache, table.tolist(), length, isa)
    assert kept is not None and fresh is not None
    for a, b in zip(kept[0] + kept[1], fresh[0] + fresh[1]):
        assert torch.equal(a, b)
    assert torch.equal(kept[0][0], (-k[:block]).permute(1, 2, 0))  # kept views read the cache as it is now
    assert torch.equal(kept[1][1], -v[block : 2 * block].transpose(0, 1))
    assert [t.shape[-1] for t in kept[0]] == [block, block, 5]
