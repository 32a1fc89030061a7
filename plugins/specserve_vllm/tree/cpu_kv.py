"""Read a request's K/V back from vLLM's CPU paged cache, whatever the ISA's block layout.

Tree rows are recomputed with dense attention (:mod:`specserve_vllm.tree.attention`) over the
request's K/V, which the CPU backend stores per block in an ISA-specific layout (with ``vec``,
K is transposed within each block and V is not). Rather than hard-coding layouts, a probe
writes known values with vLLM's own ``cpu_attn_reshape_and_cache`` into a scratch block and
reads back where each ``(token, dim)`` landed: a permutation per block, found once per
``(isa, dtype, block_size, head_dim)``. Probe values are small integers (token and dim
indices, at most 256), exact in fp32, fp16 and bf16. A layout that is not a permutation (e.g.
a quantised cache) raises, and the caller keeps chains.

Two layouts are common enough to skip the gather: a block stored as is (``[token, dim]``,
``vec``'s V) or transposed (``[dim, token]``, ``vec``'s K); :func:`layout_kind` names them from
the probed permutation and :func:`gather_kv` reads those through views. :func:`block_views`
goes one step further for the engine's tree rows: per-block views of K transposed and V, no
copy at all, which :func:`~specserve_vllm.tree.attention.side_rows_attention` multiplies
block by block.

KV compaction needs no read-back: it rewrites rows through the same op at new slots.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def block_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_index, value_index)``: ``[block_size * head_dim]`` int64 each, such that
    ``block.reshape(-1)[index].view(block_size, head_dim)`` is the block's natural
    ``[token, dim]`` view of one KV head."""
    from vllm import _custom_ops as ops

    if block_size > 256 or head_dim > 256:
        raise ValueError(f"probe values must be exact: block_size {block_size}, head_dim {head_dim} > 256")
    cache = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    slots = torch.arange(block_size)
    found = []
    for fill in (lambda t, d: t, lambda t, d: d):
        t, d = torch.meshgrid(torch.arange(block_size), torch.arange(head_dim), indexing="ij")
        probe = fill(t, d).to(dtype)[:, None, :] + 1  # [block, 1 head, dim]; 0 marks "unwritten"
        cache.zero_()
        ops.cpu_attn_reshape_and_cache(probe, probe, key_cache, value_cache, slots, isa)
        found.append((key_cache.reshape(-1).long() - 1, value_cache.reshape(-1).long() - 1))
    out = []
    for which in (0, 1):
        token, dim = found[0][which], found[1][which]
        flat = token * head_dim + dim  # natural index held by each stored element
        if sorted(flat.tolist()) != list(range(block_size * head_dim)):
            raise ValueError(f"the {('key', 'value')[which]} layout of isa {isa!r} is not a permutation of its block")
        index = torch.empty_like(flat)
        index[flat] = torch.arange(flat.numel())
        out.append(index)
    return out[0], out[1]


def layout_kind(index: torch.Tensor, block_size: int, head_dim: int) -> str:
    """``identity``, ``transposed`` or ``permuted``: how a probed ``index`` (see
    :func:`block_layout`) lays out one block's ``[token, dim]`` values.

    >>> layout_kind(torch.arange(6), 2, 3)
    'identity'
    >>> layout_kind(torch.arange(6).view(3, 2).T.reshape(-1), 2, 3)   # stored [dim, token]
    'transposed'
    >>> layout_kind(torch.tensor([1, 0, 2, 3, 4, 5]), 2, 3)
    'permuted'
    """
    natural = torch.arange(block_size * head_dim)
    if torch.equal(index, natural):
        return "identity"
    if torch.equal(index, natural.view(head_dim, block_size).T.reshape(-1)):
        return "transposed"
    return "permuted"


@functools.lru_cache(maxsize=16)
def _kinds(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> tuple[str, str]:
    k_index, v_index = block_layout(isa, dtype, block_size, head_dim)
    return layout_kind(k_index, block_size, head_dim), layout_kind(v_index, block_size, head_dim)


def gather_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor, length: int,
              isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's first ``length`` positions as ``[length, num_kv_heads, head_dim]`` K and V.

    ``key_cache``/``value_cache``: the backend's ``[num_blocks, num_kv_heads, block_size,
    head_dim]`` halves; ``block_table``: the request's block ids.
    """
    _, heads, block_size, head_dim = key_cache.shape
    k_index, v_index = block_layout(isa, key_cache.dtype, block_size, head_dim)
    k_kind, v_kind = _kinds(isa, key_cache.dtype, block_size, head_dim)
    blocks = block_table[: (length + block_size - 1) // block_size].long()

    def natural(cache: torch.Tensor, index: torch.Tensor, kind: str) -> torch.Tensor:
        raw = cache[blocks].reshape(len(blocks), heads, block_size * head_dim)  # [b, H, B*D]
        if kind == "identity":
            nat = raw.view(len(blocks), heads, block_size, head_dim)
        elif kind == "transposed":
            nat = raw.view(len(blocks), heads, head_dim, block_size).transpose(2, 3)
        else:
            nat = raw[:, :, index].view(len(blocks), heads, block_size, head_dim)
        return nat.permute(0, 2, 1, 3).reshape(-1, heads, head_dim)[:length]

    return natural(key_cache, k_index, k_kind), natural(value_cache, v_index, v_kind)


def block_views(key_cache: torch.Tensor, value_cache: torch.Tensor, block_ids: list[int], length: int,
                isa: str, full: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Per-block views (no copy) of one request's first ``length`` positions: K transposed,
    ``[kv_heads, head_dim, n]`` each, and V, ``[kv_heads, n, head_dim]`` each (``n`` = the
    block's used positions); None when the ISA's layout is neither as is nor transposed (the
    caller gathers instead). ``block_ids``: the request's block table as ints. ``full``: the
    views of whole blocks by block id, kept by the caller for these two caches (a block's view
    never changes, so only the request's last, partly used block is viewed anew each step)."""
    _, heads, block_size, head_dim = key_cache.shape
    k_kind, v_kind = _kinds(isa, key_cache.dtype, block_size, head_dim)
    if k_kind == "permuted" or v_kind == "permuted":
        return None

    def whole(block: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw_k, raw_v = key_cache[block], value_cache[block]  # [H, B, D] each, per-head contiguous
        kt = (raw_k.view(heads, head_dim, block_size) if k_kind == "transposed" else raw_k.transpose(1, 2))
        v = (raw_v.view(heads, head_dim, block_size).transpose(1, 2) if v_kind == "transposed" else raw_v)
        return kt, v

    keys, values = [], []
    for j in range((length + block_size - 1) // block_size):
        used = min(block_size, length - j * block_size)
        if used == block_size and full is not None:
            kt, v = full.get(block_ids[j]) or full.setdefault(block_ids[j], whole(block_ids[j]))
            keys.append(kt)
            values.append(v)
            continue
        kt, v = whole(block_ids[j])
        keys.append(kt[:, :, :used])
        values.append(v[:, :used])
    return keys, values
