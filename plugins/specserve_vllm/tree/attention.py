"""Reference tree attention (torch, dense): what the engine's tree rows must compute.

In a verification step a request's ``1 + N`` query rows (root, then nodes in preorder) attend
to the committed prefix (``prefix_len`` tokens already in the KV cache) and, among the new
rows, only to themselves and their ancestors (:func:`~specserve_vllm.tree.draft.ancestor_mask`).
RoPE positions follow depth (:func:`~specserve_vllm.tree.draft.depth_positions`), so node ``i``
sees exactly what it would see as the last token of the chain ``prefix, root, path to i``.

vLLM's CPU kernel (``cpu_attention_with_kv_cache``) only knows causal masks; the planned
engine path recomputes tree rows with this dense form over K/V gathered from the cache (see
docs/trees.md). Tests check it against the kernel on chains and on every root-to-leaf path.

    >>> from specserve_vllm.tree.draft import DraftTree
    >>> tree_attention_mask(DraftTree((5, 9, 7), (-1, 0, -1)), prefix_len=2).int().tolist()
    [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]
"""

from __future__ import annotations

import numpy as np
import torch

from specserve_vllm.tree.draft import DraftTree, ancestor_mask, best_path_length


def tree_attention_mask(tree: DraftTree, prefix_len: int) -> torch.Tensor:
    """``[1+N, prefix_len+1+N]`` bool: every row sees the prefix, then its ancestors and itself."""
    rows = len(tree) + 1
    prefix = torch.ones(rows, prefix_len, dtype=torch.bool)
    return torch.cat([prefix, torch.from_numpy(ancestor_mask(tree))], dim=1)


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tree: DraftTree,
                   scale: float) -> torch.Tensor:
    """Masked attention of one request's tree rows.

    ``query``: ``[1+N, num_heads, head_dim]`` (RoPE applied at depth positions);
    ``key``/``value``: ``[prefix_len+1+N, num_kv_heads, head_dim]``, the prefix then the tree
    rows in the same order as ``query``. Returns ``[1+N, num_heads, head_dim]``.
    """
    rows, heads, _ = query.shape
    if rows != len(tree) + 1:
        raise ValueError(f"query has {rows} rows, a {len(tree)}-node tree has {len(tree) + 1}")
    prefix_len = key.shape[0] - rows
    if prefix_len < 0 or value.shape[0] != key.shape[0]:
        raise ValueError(f"key/value rows {key.shape[0]}/{value.shape[0]} do not cover {rows} query rows")
    group = heads // key.shape[1]  # grouped-query attention: kv head h serves q heads h*g..h*g+g-1
    k = key.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    v = value.repeat_interleave(group, dim=1).transpose(0, 1)
    mask = tree_attention_mask(tree, prefix_len)  # [1+N, L]
    out = torch.nn.functional.scaled_dot_product_attention(query.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def side_rows_bias(tree: DraftTree, prefix_len: int, group: int = 1) -> torch.Tensor:
    """``[group * S, prefix_len + 1 + N]`` float32 additive mask of a tree's side rows (the
    ``S`` rows after the root and the best path, which the causal kernel gets wrong): 0 where a
    row sees a key (the prefix, its ancestors, itself), ``-inf`` elsewhere; repeated ``group``
    times for grouped-query attention.

    >>> side_rows_bias(DraftTree((5, 9, 7), (-1, 0, -1)), prefix_len=1).tolist()   # node 7
    [[0.0, 0.0, -inf, -inf, 0.0]]
    """
    keep = 1 + best_path_length(tree)
    unseen = ~ancestor_mask(tree)[keep:]  # [S, 1 + N]; numpy: built once a step, inside the forward pass
    bias = np.zeros((len(unseen), prefix_len + unseen.shape[1]), dtype=np.float32)
    bias[:, prefix_len:][unseen] = -np.inf
    return torch.from_numpy(np.tile(bias, (group, 1)) if group > 1 else bias)


def side_rows_attention(query: torch.Tensor, keys_t: list[torch.Tensor], values: list[torch.Tensor],
                        bias: torch.Tensor | tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
    """Attention of a tree's side rows over K/V held in blocks: what :func:`tree_attention`
    computes for those rows, without gathering the cache.

    ``query``: ``[S, heads, D]``; ``keys_t``/``values``: per block ``[kv_heads, D, n_j]`` /
    ``[kv_heads, n_j, D]`` (see :func:`~specserve_vllm.tree.cpu_kv.block_views`), together the
    ``prefix_len + 1 + N`` positions; ``bias``: :func:`side_rows_bias` for the same group, or
    its columns already split by block (:func:`bias_by_block`, shared by a step's layers).
    Returns ``[S, heads, D]`` in float32. Run once per layer and tree request inside the
    forward pass, where each torch call costs several µs: fp32 inputs are not converted, a
    query group of one is a view, and the scale and the mask go in with the first product.
    """
    rows, heads, dim = query.shape
    kv_heads = keys_t[0].shape[0]
    group = heads // kv_heads
    q = _f32(query)
    # Rows of one KV head's query group side by side: [kv_heads, group * S, D].
    q = q.transpose(0, 1) if group == 1 else q.view(rows, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(
        kv_heads, group * rows, dim)
    chunks = bias if isinstance(bias, tuple) else bias.split([k.shape[2] for k in keys_t], dim=1)
    parts = [torch.baddbmm(b, q, _f32(k), alpha=scale) for b, k in zip(chunks, keys_t)]  # scale * q k + mask
    scores = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    weights = torch.softmax(scores, dim=-1)
    if len(values) == 1:
        out = torch.bmm(weights, _f32(values[0]))
    else:
        split = weights.split([v.shape[1] for v in values], dim=2)
        out = torch.bmm(split[0], _f32(values[0]))
        for w, v in zip(split[1:], values[1:]):
            out.baddbmm_(w, _f32(v))
    return out.transpose(0, 1) if group == 1 else out.view(kv_heads, group, rows, dim).permute(2, 0, 1, 3).reshape(
        rows, heads, dim)


def bias_by_block(bias: torch.Tensor, length: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """:func:`side_rows_bias`'s columns split as :func:`~specserve_vllm.tree.cpu_kv.block_views`
    splits ``length`` positions into blocks of ``block_size``.

    >>> [b.shape[1] for b in bias_by_block(torch.zeros(2, 300), 300, 128)]
    [128, 128, 44]
    """
    sizes = [min(block_size, length - start) for start in range(0, length, block_size)]
    return tuple(bias.split(sizes, dim=1))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def rope_neox(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding in the GPT-NeoX layout (halves rotated) at ``positions``: ``[T, H, D]``.

    A reference for tests; the engine keeps the model's own rotary embedding and only changes
    the positions it is given.
    """
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [D/2]
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
