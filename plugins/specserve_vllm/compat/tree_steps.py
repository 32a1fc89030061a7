"""Tree verification steps in vLLM 0.32's V1 runner (the CPU runner inherits them).

A drafter that drafts trees (``last_trees`` per row, e.g. Token Recycling with the engine setting
``tree``) hands the scheduler each tree's nodes in preorder as ordinary draft tokens, so
scheduling, truncation (a preorder prefix is a tree) and KV allocation are vLLM's own. Four
wraps on ``GPUModelRunner`` turn a step's eligible requests into tree verifications:

* ``propose_draft_token_ids``: after drafting, remember each row's tree by request id;
* ``_prepare_inputs`` (outermost): plan the step (:func:`~specserve_vllm.tree.plan.plan_step`:
  eligible requests, :func:`~specserve_vllm.tree.step.tree_eligible`, whose scheduled drafts
  are a branching prefix of their tree), and shift the
  tree rows' positions to depth *after* upstream computed the slot mapping from the sequential
  ones, so each row keeps its own slot and RoPE follows depth;
* ``_build_attention_metadata``: attach the step's :class:`~specserve_vllm.tree.step.TreeStep`
  to the attention metadata, where :mod:`specserve_vllm.compat.tree_attention` finds it;
* ``_sample`` (outermost): on steps without trees, hand eligible chains to
  :mod:`~specserve_vllm.compat.chain_walk`; otherwise verify each tree request over its ``1 + N``
  logits rows with :func:`~specserve_vllm.tree.verify.verify_argmax` at temperature 0 and
  :func:`~specserve_vllm.tree.verify.verify_drawn` otherwise (over one draw per row from the law
  vLLM samples from: temperature, top-k, top-p; the request's generator seeds its rows), taken
  before vLLM's samplers see (and edit) the logits, let vLLM sample every row as usual (when
  every request verified a tree, its rejection sampler is replaced for the call by one that
  returns padding: each row is overwritten anyway), then overwrite the tree requests' rows of
  ``sampled_token_ids`` with the accepted path plus the bonus token, and move the accepted
  path's K/V to contiguous slots (:func:`~specserve_vllm.tree.compaction.kv_moves`, written with
  vLLM's ``cpu_attn_reshape_and_cache``) when it is not the preorder prefix.

The scheduler then counts ``len(tokens) - 1`` accepted drafts and rolls ``num_computed_tokens``
back to ``root + accepted path``, exact once the path's K/V sits in those rows; rows past it are
overwritten by the next step. Requests that are not eligible (penalties, min-p, logprobs) keep
their preorder drafts verified as a chain by vLLM's rejection sampler: lossless, only shorter;
so does every request of a step with a thinking budget tracked, or of an engine with custom
logits processors (:func:`~specserve_vllm.compat.chain_walk.plain_law`). Structured-output
requests verify the tree the engine core pruned with their grammar
(:mod:`~specserve_vllm.compat.tree_grammar`, sent on the ``SchedulerOutput``), over logits its
mask rows have masked. Engines without tree drafts pay one attribute lookup per wrap.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import numpy as np

from specserve_vllm.compat import chain_walk
from specserve_vllm.compat.hidden_feed import TREE_LAST_ROWS_ATTR
from specserve_vllm.compat.spec_length import PLANNER_ATTR
from specserve_vllm.compat.step_timer import RUNNER_TREE_STEP_ATTR
from specserve_vllm.compat.tree_grammar import DRAFTED_TREES_ATTR
from specserve_vllm.compat.tree_grammar import SCHEDULED_ATTR as GRAMMAR_TREES_ATTR
from specserve_vllm.compat.upstream import (
    PREPARE_INPUTS,
    PROPOSE_DRAFT_TOKEN_IDS,
    RUNNER,
    SAMPLE,
    SAMPLE_TOKENS,
    UpstreamFunction,
)

logger = logging.getLogger(__name__)

_MARK = "_specserve_tree_steps"
TREES_ATTR = DRAFTED_TREES_ATTR
"""Runner attribute: ``{req_id: DraftTree}`` of the last drafting step (absent: no tree drafter)."""
STEP_ATTR = RUNNER_TREE_STEP_ATTR
"""Runner attribute: the current step's ``TreeStep``, or None."""
COUNTERS_ATTR = "_specserve_tree_counters"
"""Runner attribute: :class:`~specserve_vllm.tree.step.TreeCounters`."""
CAPABLE_ATTR = "_specserve_tree_capable"
LAST_ROWS_ATTR = TREE_LAST_ROWS_ATTR
"""Runner attribute: ``{req_index: row}`` for this step's tree requests, the row within the
request's ``1 + N`` logits rows behind its last emitted token (the last accepted node's, or the
root's); ``compat.hidden_feed`` hands the heads that row's hidden state. None without trees."""

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: trees are recorded by request id after drafting.
    PROPOSE_DRAFT_TOKEN_IDS,
    # Wrapped: positions and slot mapping are computed inside; positions shifted after it.
    PREPARE_INPUTS,
    # Wrapped: returns the per-layer metadata the plan is attached to.
    UpstreamFunction(RUNNER, "GPUModelRunner._build_attention_metadata",
                     "505a8ae345b0e379694455c79489cc5a4d6071e8e94199bc55368e18b9129f30"),
    # Wrapped: logits rows are [root, node 0, ...] per request in batch order; it calls
    # self.rejection_sampler(metadata, draft_probs, logits, sampling_metadata) on spec steps.
    SAMPLE,
    # Relied on: _sample runs before bookkeeping and before the next step's forward.
    SAMPLE_TOKENS,
    # Relied on: accepted = generated - 1; num_computed_tokens rolled back by the rejected count.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
                     "920d0ea4ca1444e0d51a1019d18c1d3248eaf0a6fa23ccfb1a0f77bdb533cb2f"),
    # Relied on: -1 padding ends a row's generated tokens.
    UpstreamFunction("vllm.v1.sample.rejection_sampler", "RejectionSampler.parse_output",
                     "0abf650c3fe95e13d139fea96856516584d89f97e630282513f8f18dfbf7fae9"),
)


def counters(runner: Any) -> Any:
    """The runner's tree counters (created on first use)."""
    from specserve_vllm.tree.step import TreeCounters

    found = getattr(runner, COUNTERS_ATTR, None)
    if found is None:
        found = TreeCounters()
        setattr(runner, COUNTERS_ATTR, found)
    return found


def tree_capable(runner: Any) -> bool:
    """Whether every attention layer can run tree rows: vLLM's CPU backend without sliding
    windows, ALiBi, sinks, soft-capping or a quantised cache, no M-RoPE, and synchronous
    scheduling (vLLM's default with ``custom_class`` drafters; checked once)."""
    found = getattr(runner, CAPABLE_ATTR, None)
    if found is not None:
        return bool(found)
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    layers = get_layers_from_vllm_config(runner.vllm_config, Attention)
    ok = bool(layers) and not runner.uses_mrope and not runner.use_async_scheduling and all(
        isinstance(layer.impl, CPUAttentionBackendImpl)
        and layer.impl.sliding_window == -1 and layer.impl.alibi_slopes is None
        and layer.impl.sinks is None and not layer.impl.logits_soft_cap
        and not layer.impl.is_fp8_kv_cache
        for layer in layers.values()
    )
    if not ok:
        logger.warning("tree drafts run as chains: the attention layers do not support tree rows",
                       extra={"fields": {"layers": len(layers)}})
    setattr(runner, CAPABLE_ATTR, ok)
    return ok


def tree_of(params: Any, drafted: Any, pruned: Any) -> Any:
    """The tree a request may verify: the drafter's, or for a structured-output request the
    one the engine core pruned with its grammar (None: the request verifies a chain)."""
    from specserve_vllm.tree.step import tree_eligible

    if not tree_eligible(params):
        return None
    return pruned if params.structured_outputs is not None else drafted


def plan(runner: Any, scheduler_output: Any) -> Any:
    """This step's ``TreeStep`` (None without tree requests); shifts the tree rows' positions."""
    import torch

    from specserve_vllm.tree.plan import plan_step, position_deltas
    from specserve_vllm.tree.step import TreeStep

    trees = getattr(runner, TREES_ATTR, None)
    if (not trees or not scheduler_output.scheduled_spec_decode_tokens or not tree_capable(runner)
            or not chain_walk.plain_law(runner)):
        return None
    num_reqs = runner.input_batch.num_reqs
    req_ids = runner.input_batch.req_ids[:num_reqs]
    pruned = getattr(scheduler_output, GRAMMAR_TREES_ATTR, None) or {}
    eligible = [tree_of(runner.requests[r].sampling_params, trees.get(r), pruned.get(r)) for r in req_ids]
    drafts = [scheduler_output.scheduled_spec_decode_tokens.get(r, ()) for r in req_ids]
    step_plan = plan_step(eligible, drafts, runner.query_start_loc.np[: num_reqs + 1].tolist())
    if not step_plan.requests:
        return None
    total = scheduler_output.total_num_scheduled_tokens
    runner.positions[:total] += torch.from_numpy(position_deltas(step_plan, total))
    return TreeStep(plan=step_plan)


def verify(runner: Any, step: Any, logits: Any, spec_decode_metadata: Any) -> dict[int, Any]:
    """``{req_index: TreeVerdict}`` of every tree request, over its ``1 + N`` logits rows: one
    token per row for the whole step (:func:`~specserve_vllm.compat.chain_walk.row_tokens`: the
    argmax, or one draw from the law vLLM samples from), then per request the argmax walk
    (greedy) or the lossless walk over the draws."""
    from specserve_vllm.tree.step import GREEDY_EPS
    from specserve_vllm.tree.verify import verify_argmax, verify_drawn

    counts = list(spec_decode_metadata.num_draft_tokens)
    starts = np.concatenate([[0], np.cumsum(np.asarray(counts) + 1)])
    tokens = chain_walk.row_tokens(logits, counts, runner.input_batch.sampling_metadata)
    verdicts = {}
    for req in step.plan.requests:
        start = int(starts[req.req_index])
        rows = tokens[start : start + len(req.tree) + 1]
        params = runner.requests[runner.input_batch.req_ids[req.req_index]].sampling_params
        walk = verify_argmax if params.temperature < GREEDY_EPS else verify_drawn
        verdicts[req.req_index] = walk(req.tree, rows)
    return verdicts


def compact(step: Any, verdicts: dict[int, Any]) -> int:
    """Rewrite each accepted side branch's K/V at the rows after the root, in every layer.

    Returns how many requests needed moves. Sources are the stashed rows, so the order of
    the writes does not matter."""
    import torch
    from vllm import _custom_ops as ops

    from specserve_vllm.tree.compaction import kv_moves

    src: list[int] = []
    dst: list[int] = []
    moved = 0
    for req in step.plan.requests:
        found = kv_moves(req.tree, verdicts[req.req_index].accepted)
        moved += bool(found)
        src += [req.row_start + m.src for m in found]  # rows of the step's flattened tokens
        dst += [req.row_start + m.dst for m in found]
    if not src:
        return 0
    src_rows, dst_rows = torch.tensor(src), torch.tensor(dst)
    for layer in step.stash:  # one write per layer for every request's moves
        ops.cpu_attn_reshape_and_cache(
            layer.key[src_rows], layer.value[src_rows], layer.key_cache, layer.value_cache,
            layer.slots[dst_rows], layer.isa, k_scale=layer.k_scale, v_scale=layer.v_scale,
            kv_cache_dtype=layer.kv_cache_dtype,
        )
    return moved


def covers_batch(runner: Any, verdicts: dict[int, Any]) -> bool:
    """Whether every request of the step verified a tree and none asks for logprobs: then
    :func:`finish` overwrites every row of the rejection sampler's output, which need not run."""
    return (len(verdicts) == runner.input_batch.num_reqs
            and runner.input_batch.sampling_metadata.max_num_logprobs is None)


def padding_sampler(metadata: Any, draft_probs: Any, logits: Any, sampling_metadata: Any) -> Any:
    """Stands in for vLLM's rejection sampler on a step :func:`covers_batch`: its output shape
    (``[num_reqs, max_spec_len + 1]`` int32), all padding (-1), no logprobs. It draws nothing,
    so the requests' generators feed only the tree verifier."""
    import torch
    from vllm.v1.outputs import SamplerOutput

    rows = (len(metadata.num_draft_tokens), metadata.max_spec_len + 1)
    return SamplerOutput(sampled_token_ids=torch.full(rows, -1, dtype=torch.int32, device=logits.device),
                         logprobs_tensors=None)


def finish(runner: Any, step: Any, verdicts: dict[int, Any], sampled: Any, whole_batch: bool = False) -> None:
    """Write the verdicts into ``sampled`` (``[num_reqs, width]``), compact, count
    (``whole_batch``: every request verified a tree, :func:`covers_batch`)."""
    import torch

    width = sampled.shape[1]
    for req_index, verdict in verdicts.items():
        row = torch.full((width,), -1, dtype=sampled.dtype)
        row[: len(verdict.tokens)] = torch.tensor(verdict.tokens, dtype=sampled.dtype)
        sampled[req_index] = row
    setattr(runner, LAST_ROWS_ATTR, {r: 1 + v.accepted[-1] if v.accepted else 0 for r, v in verdicts.items()})
    moved = compact(step, verdicts)
    count = counters(runner)
    planner = getattr(runner, PLANNER_ATTR, None)
    with planner.lock if planner is not None else contextlib.nullcontext():
        count.steps += 1
        count.verified += len(verdicts)
        count.accepted_nodes += sum(len(v.accepted) for v in verdicts.values())
        count.compacted += moved
        count.whole_batch += whole_batch
        count.grammar += sum(runner.requests[runner.input_batch.req_ids[r]].sampling_params.structured_outputs
                             is not None for r in verdicts)
        for req in step.plan.requests:
            count.record_depths(max(req.tree.depths(), default=0), len(verdicts[req.req_index].accepted))
        if planner is not None:  # exported on /metrics with the plan statistics
            planner.trees = count


def count_walk(runner: Any) -> None:
    """Count a chain step verified by :mod:`~specserve_vllm.compat.chain_walk`."""
    count = counters(runner)
    planner = getattr(runner, PLANNER_ATTR, None)
    with planner.lock if planner is not None else contextlib.nullcontext():
        count.walked_chains += 1
        if planner is not None:
            planner.trees = count


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from specserve_vllm.compat.tree_attention import TREE_STEP_ATTR

    if getattr(GPUModelRunner._sample, _MARK, False):
        return
    propose = GPUModelRunner.propose_draft_token_ids
    prepare = GPUModelRunner._prepare_inputs
    build = GPUModelRunner._build_attention_metadata
    sample = GPUModelRunner._sample

    @functools.wraps(propose)
    def propose_draft_token_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        drafter = getattr(self, "drafter", None)
        if getattr(drafter, "tree_shape", "chain") == "chain":
            return propose(self, *args, **kwargs)
        drafter.last_trees = []  # a step whose plan skips the drafter leaves no trees
        out = propose(self, *args, **kwargs)
        setattr(self, TREES_ATTR, {r: t for r, t in zip(self.input_batch.req_ids, drafter.last_trees)
                                   if t is not None})
        return out

    @functools.wraps(prepare)
    def _prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = prepare(self, scheduler_output, *args, **kwargs)
        setattr(self, STEP_ATTR, plan(self, scheduler_output) if getattr(self, TREES_ATTR, None) else None)
        return out

    @functools.wraps(build)
    def _build_attention_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = build(self, *args, **kwargs)
        step = getattr(self, STEP_ATTR, None)
        if step is not None and not kwargs.get("for_cudagraph_capture", False):
            per_layer = out[0] if isinstance(out[0], list) else [out[0]]
            for layers in per_layer:
                for metadata in layers.values():
                    setattr(metadata, TREE_STEP_ATTR, step)
        return out

    @functools.wraps(sample)
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        step = getattr(self, STEP_ATTR, None)
        setattr(self, STEP_ATTR, None)
        setattr(self, LAST_ROWS_ATTR, None)
        if logits is None or spec_decode_metadata is None:
            return sample(self, logits, spec_decode_metadata, *args, **kwargs)
        if step is None:  # chains: walked where the batch allows, else vLLM's rejection sampler
            if not chain_walk.walkable(self):
                return sample(self, logits, spec_decode_metadata, *args, **kwargs)
            real = self.rejection_sampler
            self.rejection_sampler = chain_walk.walk_sampler(real, lambda: count_walk(self))
            try:
                return sample(self, logits, spec_decode_metadata, *args, **kwargs)
            finally:
                self.rejection_sampler = real
        verdicts = verify(self, step, logits, spec_decode_metadata)
        whole = covers_batch(self, verdicts)
        if not whole:
            out = sample(self, logits, spec_decode_metadata, *args, **kwargs)
        else:  # every row is a verdict's: the wraps inside still run, the rejection sampler does not
            real, self.rejection_sampler = self.rejection_sampler, padding_sampler
            try:
                out = sample(self, logits, spec_decode_metadata, *args, **kwargs)
            finally:
                self.rejection_sampler = real
        finish(self, step, verdicts, out.sampled_token_ids, whole)
        return out

    for fn in (propose_draft_token_ids, _prepare_inputs, _build_attention_metadata, _sample):
        setattr(fn, _MARK, True)
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids  # type: ignore[method-assign]
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    GPUModelRunner._build_attention_metadata = _build_attention_metadata  # type: ignore[method-assign]
    GPUModelRunner._sample = _sample  # type: ignore[method-assign]
    logger.debug("installed the tree verification patch")
