"""Feed the target's top-k next-token candidates to drafters that learn from them.

vLLM 0.32's runner computes the target's logits at every sampled position (each verified draft
position plus the bonus position, or the last prompt position on prefill) and discards them
after sampling. Drafters such as Token Recycling need them, but the ``custom_class`` proposer
interface passes token ids only. Two wraps on ``GPUModelRunner`` (the CPU runner inherits them):

* ``_prepare_inputs`` remembers this step's ``logits_indices`` (row ``j`` of the logits is the
  model output at flattened input position ``logits_indices[j]``) and, for a drafter with
  ``observe_logits``, the input tokens at them (read before the forward pass, where each array
  operation costs its warm price, not several times it);
* ``_sample``: when the runner's ``drafter`` has ``observe_logits(input_tokens, logits)``, it is
  called before sampling with ``input_ids[logits_indices]`` (``[n]``: a numpy array on the CPU
  runner, whose input buffer has a numpy view, else a tensor) and the logits rows
  (``[n, vocab]``) themselves: the sampler edits them in place next, so the drafter copies
  what it keeps before returning; it takes the top-k when it needs it (Token Recycling
  batches the steps that do not draft). Otherwise, when it has
  ``observe_topk(input_tokens, topk_ids)`` and a ``topk_width``, that is called with the input tokens, the top ``topk_width`` ids of each logits row
  (``[n, topk_width]``), both CPU tensors, and the logits' width. Drafters with neither cost
  nothing.

On a step without drafts (``spec_decode_metadata`` None), a drafter that keeps hindsight
(its ``hindsight`` set, :mod:`specserve_vllm.drafters.hindsight`) also gets the step's requests
and temperatures (``rows=``): row ``i`` of the logits is then request ``i`` of the batch. Rows
whose sample is discarded (partial prefills) or whose sampler reshapes the distribution
(``top_p``, ``top_k``, penalties) get a NaN temperature: no evidence.

The logits are the ones the sampler sees: for structured-output requests the grammar bitmask
is already applied, so recorded candidates are grammar-valid ones (still the target's
predictions, only conditioned on the grammar).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from specserve_vllm.compat.upstream import PREPARE_INPUTS, SAMPLE, SAMPLE_TOKENS, UpstreamFunction

logger = logging.getLogger(__name__)

_MARK = "_specserve_logits_feed"
_INDICES_ATTR = "_specserve_logits_indices"
_TOKENS_ATTR = "_specserve_logits_input_tokens"

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: returns this step's logits_indices first, with the step's input_ids filled.
    PREPARE_INPUTS,
    # Wrapped: receives the logits of every sampled position.
    SAMPLE,
    # Relied on: calls _sample before the drafter proposes.
    SAMPLE_TOKENS,
    # Relied on (hindsight_rows): fills temperature_cpu and the sets named in _RESHAPED.
    UpstreamFunction("vllm.v1.worker.gpu_input_batch", "InputBatch.add_request",
                     "23cd0ab2f6485f2cfaa639074e3c8779750b77498dc79d9903c81a3b19b33217"),
)


def _take_indices(runner: Any, logits: Any) -> Any:
    """This step's ``logits_indices`` (used once), or None when they do not match ``logits``."""
    indices = getattr(runner, _INDICES_ATTR, None)
    setattr(runner, _INDICES_ATTR, None)
    return indices if indices is not None and indices.shape[0] == logits.shape[0] else None


_RESHAPED = ("top_p_reqs", "top_k_reqs", "frequency_penalties_reqs", "presence_penalties_reqs",
             "repetition_penalties_reqs")
"""Input-batch sets of requests whose sampler reshapes the distribution beyond temperature."""


def hindsight_rows(runner: Any, n: int) -> Any:
    """The :class:`~specserve_vllm.drafters.hindsight.HindsightRows` of a step without drafts
    whose logits have ``n`` rows, or None when they are not one per request."""
    from specserve_vllm.drafters.hindsight import HindsightRows

    batch = runner.input_batch
    req_ids = batch.req_ids
    if len(req_ids) != n:
        return None
    temps = batch.temperature_cpu[:n].astype(np.float64)
    discard = getattr(getattr(runner, "discard_request_mask", None), "np", None)
    if discard is not None:
        temps[discard[:n]] = np.nan
    for name in _RESHAPED:
        reshaped = getattr(batch, name, None)
        if reshaped:
            temps[[i for i, r in enumerate(req_ids) if r in reshaped]] = np.nan
    return HindsightRows(tuple(req_ids), temps)


def _observe_logits(runner: Any, logits: Any, plain: bool = False) -> bool:
    """Hand a drafter with ``observe_logits`` the logits rows and their input tokens (it copies
    what it keeps and takes the top-k itself, batched); False when the drafter has no such
    method. ``plain``: the step verified no drafts (hindsight rows go with it). The runner
    samples in inference mode, so no autograd state is set up here: this runs every step,
    with speculation off too."""
    drafter = getattr(runner, "drafter", None)
    observe = getattr(drafter, "observe_logits", None)
    if logits is None or not callable(observe):
        return False
    tokens = getattr(runner, _TOKENS_ATTR, None)
    setattr(runner, _TOKENS_ATTR, None)
    indices = _take_indices(runner, logits)
    if indices is None:
        return True
    tokens = _input_tokens(runner.input_ids, indices) if tokens is None else tokens
    if plain and getattr(drafter, "hindsight", None) is not None:
        observe(tokens, logits, rows=hindsight_rows(runner, int(logits.shape[0])))
    else:
        observe(tokens, logits)
    return True


def _input_tokens(input_ids: Any, indices: Any) -> Any:
    """The input token at each index: numpy (a new array) when the runner's device buffer is
    its CPU one (the CPU runner), else a tensor on the device. Each torch call here costs
    several times its warm price right after the forward pass, so the CPU path makes none."""
    if input_ids.gpu is getattr(input_ids, "cpu", None) and getattr(input_ids, "np", None) is not None:
        return input_ids.np[indices.numpy()]
    return input_ids.gpu[indices]


def _observed_topk(runner: Any, logits: Any) -> tuple[Any, Any, int] | None:
    """``(input_tokens [n], topk_ids [n, w], logits width)``, CPU tensors, for the runner's
    drafter, or None."""
    import torch

    drafter = getattr(runner, "drafter", None)
    if logits is None or not callable(getattr(drafter, "observe_topk", None)):
        return None
    indices = _take_indices(runner, logits)
    if indices is None:
        return None
    width = min(int(drafter.topk_width), logits.shape[-1])
    with torch.no_grad():
        topk = torch.topk(logits, width, dim=-1).indices  # [n, width]
        tokens = runner.input_ids.gpu[indices]  # [n]
    return tokens.cpu(), topk.cpu(), int(logits.shape[-1])


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._sample, _MARK, False):
        return

    prepare = GPUModelRunner._prepare_inputs

    @functools.wraps(prepare)
    def _prepare_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = prepare(self, *args, **kwargs)
        setattr(self, _INDICES_ATTR, out[0])
        if callable(getattr(getattr(self, "drafter", None), "observe_logits", None)):
            # Read before the forward pass, where array operations cost their warm price.
            setattr(self, _TOKENS_ATTR, _input_tokens(self.input_ids, out[0]))
        return out

    sample = GPUModelRunner._sample

    @functools.wraps(sample)
    def _sample(self: Any, logits: Any, *args: Any, **kwargs: Any) -> Any:
        metadata = args[0] if args else kwargs.get("spec_decode_metadata")
        observed = None if _observe_logits(self, logits, metadata is None) else _observed_topk(self, logits)
        out = sample(self, logits, *args, **kwargs)
        if observed is not None:
            self.drafter.observe_topk(*observed)
        return out

    for fn in (_prepare_inputs, _sample):
        setattr(fn, _MARK, True)
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    GPUModelRunner._sample = _sample  # type: ignore[method-assign]
    logger.debug("installed logits feed patch")
