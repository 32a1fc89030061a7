"""Send the next step's drafts to the engine core with the step's output, not in a second call.

After every step of a speculative engine, vLLM 0.32's ``EngineCore.post_step`` asks the executor
for the drafts the worker just made (``take_draft_token_ids``). With a multiprocess executor
(the CPU engine's default, one worker process) that is a second round trip to the worker every
step, even when every draft is empty because the plan turned speculation off. On the demo
model it cost more than the drafter's own per-step work (see ``docs/speculation-control.md``).

Three wraps remove it for drafters whose drafts are CPU lists (``custom_class`` proposers, the
n-gram drafter) under synchronous scheduling:

* worker, ``GPUModelRunner.sample_tokens``: the returned ``ModelRunnerOutput`` carries what
  ``take_draft_token_ids()`` would answer, as an attribute the pickle to the engine core keeps;
* engine core, ``Scheduler.update_from_output``: takes that attribute off the output and keeps
  it on the scheduler;
* engine core, ``EngineCore.post_step``: when drafts were kept, upstream ``post_step`` runs with
  the executor's ``take_draft_token_ids`` answering them instead of calling the worker.

A step whose drafts are all empty (the plan turned speculation off) and that constrains no
request sends ``None`` instead: the scheduler would only set each request's drafts to the empty
list scheduling already left there, so ``post_step`` skips the update. With a constrained
request in the batch the empty lists still go through (jump-forward may add forced tokens).

Anything else (GPU drafters, whose drafts wait on a device copy; async scheduling; an output
rebuilt by a KV-connector aggregator, which drops the attribute) finds nothing kept and takes
upstream's path unchanged. The drafts are the same object the call would return: the worker
changes nothing between returning the output and that call.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from specserve_vllm.compat.upstream import RUNNER, SAMPLE_TOKENS, UpstreamFunction, argument_reader

logger = logging.getLogger(__name__)

_MARK = "_specserve_draft_handoff"
OUTPUT_ATTR = "_specserve_drafts"
"""Attribute of a ``ModelRunnerOutput`` holding the next step's ``DraftTokenIds``."""
_KEPT_ATTR = "_specserve_kept_drafts"
_MISSING = object()

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: returns the step's ModelRunnerOutput after drafting (synchronous scheduling).
    SAMPLE_TOKENS,
    # Relied on: answers the drafts from the runner's state, changing nothing.
    UpstreamFunction(RUNNER, "GPUModelRunner.take_draft_token_ids",
                     "c16093bcaca3f827d960eb2c498d9015a22d8d28077bef455975d3cbedb2a22c"),
    # Wrapped: receives each step's model output in the engine core, before post_step.
    UpstreamFunction("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
                     "920d0ea4ca1444e0d51a1019d18c1d3248eaf0a6fa23ccfb1a0f77bdb533cb2f"),
    # Wrapped: its only call to the worker is model_executor.take_draft_token_ids().
    UpstreamFunction("vllm.v1.engine.core", "EngineCore.post_step",
                     "c7eed852b0eeff42e94c409d6374f98b9bce211190212ec95fa69ae7b990dd1c"),
    # Relied on: update_from_output then post_step, once per step.
    UpstreamFunction("vllm.v1.engine.core", "EngineCore.step",
                     "6d0b2a0027cba8feb5897ed5437f1ee42f5bbd6e6b33b140c544fb093bfceec3"),
)


def attach_drafts(runner: Any, output: Any, constrained: bool = True) -> None:
    """Put the runner's drafts on ``output`` when they are CPU lists and scheduling is
    synchronous; ``None`` when every list is empty and no request is ``constrained`` (the
    step had no grammar output)."""
    from vllm.v1.outputs import ModelRunnerOutput

    if (runner.speculative_config is None or getattr(runner, "use_async_scheduling", False)
            or not isinstance(output, ModelRunnerOutput)
            or not isinstance(getattr(runner, "_draft_token_ids", None), list)):
        return
    drafts = runner.take_draft_token_ids()
    if not constrained and drafts is not None and not any(drafts.draft_token_ids):
        drafts = None
    setattr(output, OUTPUT_ATTR, drafts)


def keep_drafts(scheduler: Any, output: Any) -> None:
    """Move the drafts ``output`` carries (if any) onto ``scheduler`` for ``post_step``."""
    drafts = getattr(output, "__dict__", {}).pop(OUTPUT_ATTR, _MISSING)
    if drafts is not _MISSING:
        setattr(scheduler, _KEPT_ATTR, drafts)


def kept_drafts(scheduler: Any) -> Any:
    """The drafts kept for this step (taken once), or a sentinel when there are none."""
    return scheduler.__dict__.pop(_KEPT_ATTR, _MISSING)


def wrap_sample_tokens(sample: Any) -> Any:
    """``sample_tokens`` that attaches the drafts to its output (see :func:`attach_drafts`).
    Behind a wrap that hides ``grammar_output`` every step counts as constrained."""
    try:
        read = argument_reader(sample, ("grammar_output",))
    except ValueError:
        def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
            return (True,)

    @functools.wraps(sample)
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = sample(self, *args, **kwargs)
        attach_drafts(self, out, constrained=read(args, kwargs)[0] is not None)
        return out

    return sample_tokens


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(EngineCore.post_step, _MARK, False):
        return
    sample = GPUModelRunner.sample_tokens
    update = Scheduler.update_from_output
    post = EngineCore.post_step

    sample_tokens = wrap_sample_tokens(sample)

    @functools.wraps(update)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any,
                           *args: Any, **kwargs: Any) -> Any:
        keep_drafts(self, model_runner_output)
        return update(self, scheduler_output, model_runner_output, *args, **kwargs)

    @functools.wraps(post)
    def post_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        drafts = kept_drafts(self.scheduler)
        if drafts is _MISSING:
            return post(self, *args, **kwargs)
        executor = self.model_executor
        executor.take_draft_token_ids = lambda: drafts  # shadows the method for this call only
        try:
            return post(self, *args, **kwargs)
        finally:
            del executor.take_draft_token_ids

    for fn in (sample_tokens, update_from_output, post_step):
        setattr(fn, _MARK, True)
    GPUModelRunner.sample_tokens = sample_tokens  # type: ignore[method-assign]
    Scheduler.update_from_output = update_from_output  # type: ignore[method-assign]
    EngineCore.post_step = post_step  # type: ignore[method-assign]
    logger.debug("installed the draft hand-off with step outputs")
