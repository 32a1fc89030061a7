"""Measure each engine step and hand it to the spec-length planner (speculative engines only).

vLLM 0.32's V1 runner runs a step as ``execute_model(scheduler_output)`` (forward) followed by
``sample_tokens(grammar_output)`` (sampling, bookkeeping and drafting for the next step). Two
wraps on ``GPUModelRunner`` (the CPU runner inherits them) time that pair with
``time.perf_counter`` and describe the step (:class:`StepRecord`): rows, scheduled tokens,
context tokens, whether it verified drafts (the speculative path), drafts verified, prefill
tokens, logits rows drawn from a sampling law, and the drafting time the planner measured
around the drafter. The planner's policy uses
it to correct its step-time model; the planner's stats keep predicted vs measured.
``execute_model`` returning early (nothing scheduled) leaves a stale start that the next call
overwrites; ``sample_tokens`` without a pending start records nothing. Long runs of plain decode
steps are sampled (``StepPlanner.times``): describing and fitting a step costs 20-50 µs right
after the forward pass, and a run without drafts repeats the same few shapes.

The same wrap tells the planner which requests finished (``finished_req_ids``) at every step,
including steps that schedule nothing: vLLM does not call ``sample_tokens`` after those, so a
request aborted while nothing was scheduled would otherwise stay in the planner's per-request
state for the life of the engine.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from specserve_vllm.compat.spec_length import runner_planner
from specserve_vllm.compat.upstream import RUNNER, SAMPLE_TOKENS, UpstreamFunction
from specserve_vllm.spec_control.acceptance import GREEDY_EPS

RUNNER_TREE_STEP_ATTR = "_specserve_tree_step"
"""Runner attribute :mod:`~specserve_vllm.compat.tree_steps` sets to the step's tree plan."""

logger = logging.getLogger(__name__)

_MARK = "_specserve_step_timer"
_START_ATTR = "_specserve_step_start"

# sha256 of the upstream source the wraps rely on (see tests/unit/test_goodput_engine_parts.py):
# a step is execute_model then sample_tokens, and sample_tokens drafts before returning.
UPSTREAM: tuple[UpstreamFunction, ...] = (
    UpstreamFunction(RUNNER, "GPUModelRunner.execute_model",
                     "d2d938ab66d17641ea6d80b04602377db31782252f238ec52325359c8b511467"),
    SAMPLE_TOKENS,
    # Relied on (describe): temperature_cpu holds each row's temperature, 0 for greedy rows.
    UpstreamFunction("vllm.v1.worker.gpu_input_batch", "InputBatch.add_request",
                     "23cd0ab2f6485f2cfaa639074e3c8779750b77498dc79d9903c81a3b19b33217"),
)



@dataclass(frozen=True)
class StepRecord:
    """One measured step (times in ms; ``total_ms`` includes ``draft_ms``)."""

    rows: int
    tokens: int
    ctx_tokens: int
    spec: bool
    drafts_verified: int
    prefill_tokens: int
    total_ms: float
    drafts: int
    """Tokens drafted for the next step."""
    draft_ms: float
    trees: int = 0
    """Requests that verified a tree this step (engine setting ``tree``)."""
    draft_depth: int = 0
    """The longest row's draft for the next step (a tree's: at most the drafter's chain depth)."""
    sampled: int = 0
    """Logits rows drawn from a sampling law (rows at temperature > 0: a decode row's token and
    each draft it verifies, a prefill row's token) rather than taken by argmax."""

    @property
    def step_ms(self) -> float:
        """Forward and sampling (the step without drafting for the next one)."""
        return max(self.total_ms - self.draft_ms, 0.0)


def describe(scheduler_output: Any, req_ids: list[str], ctx_tokens: int,
             temperatures: Sequence[float] | None = None) -> dict[str, Any]:
    """Rows, tokens, spec flag, verified drafts, prefill tokens and sampled logits rows of a
    scheduled step (``temperatures``: each row's, in ``req_ids`` order; ``None``: all greedy).

    A decode row schedules ``1 + drafts`` tokens; everything else scheduled is prefill.

    >>> from types import SimpleNamespace as NS
    >>> out = NS(num_scheduled_tokens={"a": 3, "b": 1, "c": 40}, scheduled_spec_decode_tokens={"a": [7, 8]},
    ...          total_num_scheduled_tokens=44)
    >>> d = describe(out, ["a", "b", "c"], 300, temperatures=[0.7, 0.0, 1.0])
    >>> d["drafts_verified"], d["prefill_tokens"], d["sampled"]
    (2, 40, 4)
    """
    scheduled = scheduler_output.num_scheduled_tokens
    spec = scheduler_output.scheduled_spec_decode_tokens
    drafts = decode_tokens = sampled = 0
    for i, r in enumerate(req_ids):
        d = len(spec.get(r, ()))
        drafts += d
        if scheduled.get(r, 0) == 1 + d:
            decode_tokens += 1 + d
        if temperatures is not None and temperatures[i] > GREEDY_EPS:
            sampled += 1 + d
    tokens = int(scheduler_output.total_num_scheduled_tokens)
    return {"rows": len(req_ids), "tokens": tokens, "ctx_tokens": ctx_tokens, "spec": drafts > 0,
            "drafts_verified": drafts, "prefill_tokens": tokens - decode_tokens, "sampled": sampled}


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner.sample_tokens, _MARK, False):
        return
    execute = GPUModelRunner.execute_model
    sample = GPUModelRunner.sample_tokens

    @functools.wraps(execute)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if self.speculative_config is not None:
            if scheduler_output.finished_req_ids:
                runner_planner(self).finished(frozenset(scheduler_output.finished_req_ids))
            setattr(self, _START_ATTR, (time.perf_counter(), scheduler_output))
        return execute(self, scheduler_output, *args, **kwargs)

    @functools.wraps(sample)
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        pending = getattr(self, _START_ATTR, None)
        setattr(self, _START_ATTR, None)
        if pending is not None:
            scheduled = pending[1]
            planner = runner_planner(self)
            if not planner.times(bool(scheduled.scheduled_spec_decode_tokens),
                                 scheduled.total_num_scheduled_tokens == len(scheduled.num_scheduled_tokens)):
                out = sample(self, *args, **kwargs)
                planner.skip_step()
                return out
            # Described before sampling: the batch's rows and context are still this step's.
            req_ids = list(self.input_batch.req_ids)
            ctx = int(self.input_batch.num_tokens_no_spec[: len(req_ids)].sum())
            step = describe(pending[1], req_ids, ctx, self.input_batch.temperature_cpu[: len(req_ids)].tolist())
            tree_step = getattr(self, RUNNER_TREE_STEP_ATTR, None)  # cleared while sampling
            step["trees"] = len(tree_step.plan.requests) if tree_step is not None else 0
        out = sample(self, *args, **kwargs)
        if pending is not None:
            drafts, depth, draft_ms = planner.take_draft_timing()
            planner.observe_step(StepRecord(total_ms=(time.perf_counter() - pending[0]) * 1e3,
                                            drafts=drafts, draft_ms=draft_ms, draft_depth=depth, **step))
        return out

    for fn in (execute_model, sample_tokens):
        setattr(fn, _MARK, True)
    GPUModelRunner.execute_model = execute_model  # type: ignore[method-assign]
    GPUModelRunner.sample_tokens = sample_tokens  # type: ignore[method-assign]
    logger.debug("installed the step timer")
