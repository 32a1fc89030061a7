"""A step with no drafts runs exactly like an engine without a drafter.

vLLM 0.32's runner takes its speculative branch whenever a speculative config exists
(``use_spec_decode = self.speculative_config is not None`` in ``_prepare_inputs``): it builds
``spec_decode_metadata`` even when no request has drafts, and ``_sample`` then runs the
rejection sampler instead of the plain sampler (the cost vLLM's V0 removed with its
``_run_no_spec``). When the per-step plan gives every row ``k = 0``
(:mod:`specserve_vllm.compat.spec_length`), the scheduler schedules no drafts, and this wrap
makes ``_prepare_inputs`` take its non-speculative branch: it runs the upstream function with
``speculative_config`` hidden for the duration of the call, so the branch taken is upstream's
own (``logits_indices = query_start_loc[1:] - 1``, ``spec_decode_metadata = None``, one sampled
token per row). Everything downstream keys on ``spec_decode_metadata is None``:

* ``_sample`` calls the plain sampler (greedy: the argmax, the same token the rejection sampler
  emits as the bonus token of a row with no drafts);
* ``_bookkeeping_sync`` reads ``[num_reqs, 1]`` sampled ids as the plain path does;
* ``propose_draft_token_ids`` still runs (``spec_decode_common_attn_metadata`` is built from
  the speculative config in ``execute_model``, untouched here), so the drafters' state feeds
  keep running and the plan can switch speculation back on at the next step.

Only ``_prepare_inputs`` reads ``speculative_config`` in that window (checked by the drift
test). Hybrid (recurrent) models are left alone: their kernels read a per-row draft count that
only the speculative branch fills.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from specserve_vllm.compat.upstream import PREPARE_INPUTS, RUNNER, SAMPLE, SAMPLE_TOKENS, UpstreamFunction

logger = logging.getLogger(__name__)

_MARK = "_specserve_no_spec_step"
NO_SPEC_STEPS_ATTR = "_specserve_no_spec_steps"
"""Runner attribute counting steps that took the non-speculative branch."""

# sha256 of the upstream source this wrap relies on (see tests/unit/test_no_spec_step.py):
# the branch in _prepare_inputs, the plain/rejection choice in _sample, the sampled-ids parsing in
# _bookkeeping_sync, and sample_tokens passing spec_decode_metadata on to them and the drafter.
UPSTREAM: tuple[UpstreamFunction, ...] = (
    PREPARE_INPUTS,
    SAMPLE,
    SAMPLE_TOKENS,
    UpstreamFunction(RUNNER, "GPUModelRunner._bookkeeping_sync",
                     "3ed5aaf644257e9643c9440e31042cf82bb2114a47ea56a94ca8bf2b4a6972b3"),
)



def has_drafts(scheduler_output: Any) -> bool:
    """Whether any request in the step has drafts to verify."""
    return any(scheduler_output.scheduled_spec_decode_tokens.values())


def takes_plain_path(runner: Any, scheduler_output: Any) -> bool:
    """A speculative engine's step that should run as a plain one: no drafts, not hybrid."""
    return (
        runner.speculative_config is not None
        and not has_drafts(scheduler_output)
        and not runner.model_config.is_hybrid
    )


def prepare_inputs(runner: Any, prepare: Callable[..., Any], scheduler_output: Any,
                   *args: Any, **kwargs: Any) -> Any:
    """``prepare(runner, scheduler_output, ...)``, with ``speculative_config`` hidden for the
    call when the step should run as a plain one (and counted in ``NO_SPEC_STEPS_ATTR``)."""
    if not takes_plain_path(runner, scheduler_output):
        return prepare(runner, scheduler_output, *args, **kwargs)
    spec_config = runner.speculative_config
    runner.speculative_config = None
    try:
        out = prepare(runner, scheduler_output, *args, **kwargs)
    finally:
        runner.speculative_config = spec_config
    setattr(runner, NO_SPEC_STEPS_ATTR, getattr(runner, NO_SPEC_STEPS_ATTR, 0) + 1)
    return out


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._prepare_inputs, _MARK, False):
        return
    prepare = GPUModelRunner._prepare_inputs

    @functools.wraps(prepare)
    def _prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        return prepare_inputs(self, prepare, scheduler_output, *args, **kwargs)

    setattr(_prepare_inputs, _MARK, True)
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    logger.debug("installed the no-speculation step patch")
