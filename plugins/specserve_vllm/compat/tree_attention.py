"""Tree attention inside vLLM's CPU attention backend, for tree requests only.

vLLM 0.32's CPU kernel (``ops.cpu_attention_with_kv_cache``) knows causal masks only. The wrap
of ``CPUAttentionBackendImpl.forward`` lets the kernel compute every row as usual, then, when
the step's metadata carries a :class:`~specserve_vllm.tree.step.TreeStep` (attached by
:mod:`specserve_vllm.compat.tree_steps`), recomputes each tree request's side-branch rows: they
attend to the prefix, their ancestors and themselves over the request's K/V in the paged cache
(per-block views, layout probed through vLLM's own write op). Queries and keys already carry
RoPE at depth positions (the runner shifted
them). The rows' K/V and slots are stashed for KV compaction after verification. Chain requests
and steps without trees never reach the new code (one attribute lookup).

Wrapping ``forward`` rather than registering a replacement backend class keeps vLLM's builder,
scheduler metadata and ISA choice exactly as they are; the wrap runs inside vLLM's opaque
attention op, so it holds under compilation as well as eager mode.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from specserve_vllm.compat.upstream import UpstreamFunction

logger = logging.getLogger(__name__)

_MARK = "_specserve_tree_attention"
TREE_STEP_ATTR = "specserve_tree_step"
"""Attribute of a step's ``CPUAttentionMetadata`` holding its ``TreeStep`` (absent: no trees)."""
FULL_VIEWS_ATTR = "_specserve_full_block_views"
"""Attribute of an attention layer: ``(cache data pointer, {block id: (K transposed, V) views})``."""

CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: the kernel's rows of tree requests are replaced after it ran.
    UpstreamFunction(CPU_ATTN, "CPUAttentionBackendImpl.forward",
                     "d9b6897e901edae9938818e0e4f9a8f8f1be95ba6e42f5df2cf6e4dabf2f5e77"),
    # Relied on: K/V are written (at the step's slots) before forward runs, in this layout.
    UpstreamFunction(CPU_ATTN, "CPUAttentionBackendImpl.do_kv_cache_update",
                     "b72e09b4edafdcf0f12762285ce0a07ee97fa9172cfe42e6111942b962813953"),
    # Relied on: the metadata's seq_lens, block_table and slot_mapping per request.
    UpstreamFunction(CPU_ATTN, "CPUAttentionMetadataBuilder.build",
                     "cf526ae470cf456b5a3db5f701c791bc5570be26373afdf1672df2eb2d0bc8dc"),
)


def recompute_tree_rows(impl: Any, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any,
                        attn_metadata: Any, output: Any, step: Any) -> None:
    """Overwrite ``output``'s side-branch rows of every tree request in ``step`` with tree
    attention, and stash the rows' K/V (``query``/``output``: ``[T, heads, head]``,
    ``key``/``value``: ``[T, kv_heads, head]``, ``kv_cache``: ``[blocks, kv_heads, block, 2 * head]``).

    The root and the best path (the preorder prefix) see exactly a causal prefix, so the
    kernel's rows stay there. The side rows attend over per-block views of the paged cache
    (:func:`~specserve_vllm.tree.cpu_kv.block_views`); their mask and the request's block ids
    are built by the step's first layer and shared by the others. Layouts that are not plain
    or transposed blocks take the gather path (:func:`~specserve_vllm.tree.cpu_kv.gather_kv`).
    """
    from specserve_vllm.tree.attention import bias_by_block, side_rows_attention, side_rows_bias, tree_attention
    from specserve_vllm.tree.cpu_kv import block_views, gather_kv
    from specserve_vllm.tree.draft import best_path_length
    from specserve_vllm.tree.step import SideRows, StashedLayer

    num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
    key_cache, value_cache = kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1)).chunk(2, dim=2)
    full = _full_block_views(layer, kv_cache)
    for req in step.plan.requests:
        rows = len(req.tree) + 1
        start = req.row_start
        side = step.side_rows.get(req.req_index)
        if side is None:
            seq_len = int(attn_metadata.seq_lens[req.req_index])
            used = (seq_len + block_size - 1) // block_size
            side = step.side_rows[req.req_index] = SideRows(
                keep=1 + best_path_length(req.tree), seq_len=seq_len,
                block_ids=attn_metadata.block_table[req.req_index, :used].tolist(),
                bias=bias_by_block(side_rows_bias(req.tree, seq_len - rows, query.shape[1] // num_kv_heads),
                                   seq_len, block_size))
        keep, seq_len = side.keep, side.seq_len
        views = block_views(key_cache, value_cache, side.block_ids, seq_len, layer.isa, full)
        if views is not None:
            out = side_rows_attention(query[start + keep : start + rows], views[0], views[1], side.bias, impl.scale)
        else:
            k, v = gather_kv(key_cache, value_cache, attn_metadata.block_table[req.req_index], seq_len, layer.isa)
            q = query[start : start + rows].float()  # fp32 like the kernel's accumulation
            out = tree_attention(q, k.float(), v.float(), req.tree, impl.scale)[keep:]
        output[start + keep : start + rows] = out if out.dtype == output.dtype else out.to(output.dtype)
    if impl.kv_sharing_target_layer_name is None:
        step.stash.append(StashedLayer(
            key_cache=key_cache, value_cache=value_cache, isa=layer.isa, key=key, value=value,
            slots=attn_metadata.slot_mapping, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=impl.kv_cache_dtype,
        ))


def _full_block_views(layer: Any, kv_cache: Any) -> dict[int, Any]:
    """The layer's whole-block views by block id (:func:`~specserve_vllm.tree.cpu_kv.block_views`),
    kept on the layer for the cache they view (anew if the layer is given another cache)."""
    key = kv_cache.data_ptr()
    held = getattr(layer, FULL_VIEWS_ATTR, None)
    if held is None or held[0] != key:
        held = (key, {})
        setattr(layer, FULL_VIEWS_ATTR, held)
    return held[1]


def apply() -> None:
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    if getattr(CPUAttentionBackendImpl.forward, _MARK, False):
        return
    forward = CPUAttentionBackendImpl.forward

    @functools.wraps(forward)
    def _forward(self: Any, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any,
                 attn_metadata: Any, output: Any, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        step = getattr(attn_metadata, TREE_STEP_ATTR, None)
        if step is not None and self.attn_type == AttentionType.DECODER and key is not None:
            recompute_tree_rows(self, layer, query, key, value, kv_cache, attn_metadata, output, step)
        return out

    setattr(_forward, _MARK, True)
    CPUAttentionBackendImpl.forward = _forward  # type: ignore[method-assign]
    logger.debug("installed the tree attention patch")
