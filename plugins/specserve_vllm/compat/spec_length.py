"""Per-request and per-step speculation length inside vLLM 0.32's V1 runner.

Seams:

* ``GPUModelRunner.propose_draft_token_ids`` (also the CPU runner's) runs after each step's
  sampling to draft for the next step. Before the drafter runs, the runner's
  :class:`~specserve_vllm.spec_control.planner.StepPlanner` plans one draft length per row:
  the policy (``fixed``, ``off``, ``goodput``; see :mod:`specserve_vllm.spec_control`) chooses
  within each row's cap, the request's ``spec_k`` (``extra_args["spec_k"]``) bounded by the
  engine's k, 0 for rows that sampled nothing (prefill chunks). The policy first learns what
  this step verified (drafts scheduled vs tokens sampled per row). Then:

  - before a decision, a drafter that keeps hindsight (``enable_hindsight``, called when the
    policy learns from it) hands over its scores of the drafts that steps without drafts would
    have had (:mod:`specserve_vllm.drafters.hindsight`);
  - a plan of all zeros skips the drafter: every row gets an empty draft, so the next step has
    no scheduled drafts and takes the non-speculative path
    (:mod:`specserve_vllm.compat.no_spec_step`). The cheap state feeds are not here and keep
    running (Token Recycling's matrix in ``logits_feed``, the heads' prefix cache in
    ``hidden_feed``, whose wrap is outside this one);
  - otherwise a drafter with ``set_draft_lengths(lengths)`` is told the plan first (it drafts
    only rows with a length, each only that far), and every draft list is cut to its length
    afterwards (drafters without the method, e.g. vLLM's n-gram, draft in full and are cut).

  The runner hands the lists to the scheduler (``take_draft_token_ids`` ->
  ``Scheduler.update_draft_token_ids``), which accepts per-request lengths, so a row is
  scheduled, verified and counted in the per-request spec metrics with only its own drafts.
* ``InputProcessor._validate_params``: an invalid ``spec_k`` (not an int, negative) is rejected
  when the request is added, as a ``VLLMValidationError`` (HTTP 400 in vLLM's server), instead
  of reaching the engine loop. The runner side treats an invalid value as absent, so it can
  never crash the engine.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from specserve_vllm.compat.hidden_feed import TREE_LAST_ROWS_ATTR as TREE_ROWS_ATTR
from specserve_vllm.compat.upstream import (
    PROPOSE_DRAFT_TOKEN_IDS,
    RUNNER,
    SAMPLE_TOKENS,
    UpstreamFunction,
    argument_reader,
)

from specserve_vllm.spec_k import InvalidSpecK, cap_drafts, parse_spec_k, safe_spec_k
from specserve_vllm.spec_control.acceptance import sampling_class
from specserve_vllm.spec_control.export import publisher_path
from specserve_vllm.spec_control.plan import VerifiedRows
from specserve_vllm.spec_control.planner import StepPlanner, build_policy, settings_from

logger = logging.getLogger(__name__)

_MARK = "_specserve_spec_length"
PLANNER_ATTR = "_specserve_planner"
ARGUMENTS: tuple[str, ...] = ("scheduler_output", "sampled_token_ids")
"""Arguments of ``propose_draft_token_ids`` the wrap reads (checked by the drift test)."""

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: the drafts are cut after the drafter proposes.
    PROPOSE_DRAFT_TOKEN_IDS,
    # Relied on: per-request draft lists reach the scheduler as returned.
    UpstreamFunction(RUNNER, "GPUModelRunner._get_draft_token_ids_cpu",
                     "2f1324baa012de2d857b75f7e32c55caa8d34eff7f8e4822527b298ba287f0be"),
    UpstreamFunction(RUNNER, "GPUModelRunner.take_draft_token_ids",
                     "c16093bcaca3f827d960eb2c498d9015a22d8d28077bef455975d3cbedb2a22c"),
    # Relied on: list-sampling drafters run after ``_bookkeeping_sync``, so a request's
    # ``output_token_ids`` already hold this step's tokens when its room is read.
    SAMPLE_TOKENS,
    # Wrapped: spec_k is validated with the other sampling parameters.
    UpstreamFunction("vllm.v1.engine.input_processor", "InputProcessor._validate_params",
                     "37ae3e0f471fd44cbf72eb3dffa30cc5ec72b1e9784db5c9031d0e0a5330c0e8"),
)


KNOWN_CAPS_LIMIT = 1 << 14
"""Most request ids whose ``spec_k`` :func:`request_caps` keeps between steps."""


def request_caps(runner: Any, known: dict[str, int | None] | None = None) -> list[int | None]:
    """``spec_k`` of each request in the runner's batch order (``None``: engine default).

    ``known``: caps parsed at earlier steps, by request id (a request's parameters do not
    change while it runs); requests missing there are parsed and added. It is a cache: past
    :data:`KNOWN_CAPS_LIMIT` entries it starts over (a bound in case finishes go unseen; the
    step timer passes every step's finished ids to the planner, which drops theirs)."""
    if known is not None and len(known) > KNOWN_CAPS_LIMIT:
        known.clear()
    caps: list[int | None] = []
    for req_id in runner.input_batch.req_ids:
        if known is not None and req_id in known:
            caps.append(known[req_id])
            continue
        params = getattr(runner.requests.get(req_id), "sampling_params", None)
        cap = safe_spec_k(getattr(params, "extra_args", None))
        if known is not None and params is not None:
            known[req_id] = cap
        caps.append(cap)
    return caps


def request_room(runner: Any) -> list[int | None]:
    """Output tokens each request may still produce after this step's (``max_tokens`` less its
    output so far; ``None``: unbounded). Drafting runs after the step's bookkeeping, so the
    output already holds this step's tokens. The next step commits at most ``room`` tokens, one
    of them the target's own, so drafts past ``room - 1`` could never be kept."""
    rooms: list[int | None] = []
    for req_id in runner.input_batch.req_ids:
        state = runner.requests.get(req_id)
        limit = getattr(getattr(state, "sampling_params", None), "max_tokens", None)
        output = getattr(state, "output_token_ids", None)
        rooms.append(None if limit is None or output is None else int(limit) - len(output))
    return rooms


def prefill_left(runner: Any, scheduler_output: Any) -> int:
    """Prompt tokens the batch still has to prefill after this step (chunked prompts), at most
    the engine's token budget: what the next step will schedule for them. Read from the batch's
    prompt and computed-token counts (the latter as of the step's start) and the step's
    scheduled tokens."""
    batch = runner.input_batch
    scheduled = scheduler_output.num_scheduled_tokens
    left = 0
    for i, req_id in enumerate(batch.req_ids):
        left += max(0, int(batch.num_prompt_tokens[i]) - int(batch.num_computed_tokens_cpu[i])
                    - scheduled.get(req_id, 0))
    return min(left, int(getattr(runner, "max_num_tokens", left)))


def request_classes(runner: Any) -> np.ndarray:
    """Each request's sampling class (``acceptance.sampling_class`` of its temperature), in the
    runner's batch order; requests without sampling parameters count as greedy."""
    classes = []
    for req_id in runner.input_batch.req_ids:
        params = getattr(runner.requests.get(req_id), "sampling_params", None)
        classes.append(sampling_class(getattr(params, "temperature", 0.0) or 0.0))
    return np.array(classes, dtype=np.int64)


def _cap_runner_drafts(runner: Any, drafts: Any) -> Any:
    caps = request_caps(runner)
    if all(c is None for c in caps):
        return drafts
    rows = drafts.tolist() if hasattr(drafts, "tolist") else drafts
    if len(rows) != len(caps):
        logger.warning(
            "spec_k not applied: %d draft rows for %d requests", len(rows), len(caps)
        )
        return drafts
    return cap_drafts(rows, caps)


def runner_planner(runner: Any) -> StepPlanner:
    """The runner's planner, built on first use from its ``vllm_config``."""
    planner = getattr(runner, PLANNER_ATTR, None)
    if planner is None:
        settings = settings_from(getattr(runner.vllm_config, "additional_config", None))
        k = int(runner.speculative_config.num_speculative_tokens)
        drafter = getattr(runner, "drafter", None)
        policy = build_policy(settings, k, type(drafter).__name__, tree=getattr(drafter, "tree_shape", "chain"),
                              chain_depth=getattr(drafter, "chain_depth", None))
        planner = StepPlanner(policy, k, log_every=settings.log_every, time_plain_every=settings.time_plain_every)
        enable = getattr(drafter, "enable_hindsight", None)
        if settings.hindsight and callable(getattr(policy, "observe_hindsight", None)) and callable(enable):
            planner.hindsight = bool(enable())
            policy.learns_while_off = planner.hindsight  # type: ignore[attr-defined]
        path = publisher_path()
        if path is not None and _first_rank():
            planner.publish_to(path)
        setattr(runner, PLANNER_ATTR, planner)
        logger.info("speculation length policy", extra={"fields": {"policy": policy.name, "k": k}})
    return planner


def _first_rank() -> bool:
    """Whether this worker is the first of its tensor-parallel group (the one that publishes)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()) == 0
    except (ImportError, AssertionError, AttributeError):
        return True


def verified_rows(scheduler_output: Any, req_ids: list[str], sampled: list[list[int]],
                  tree_rows: Any = None) -> VerifiedRows:
    """Per row that verified drafts this step: drafts scheduled and how many were accepted
    (tokens sampled minus the bonus/correction token); ``tree_rows``: the batch indices of the
    rows that verified trees this step (``None``: none)."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    ids, drafted, accepted, trees = [], [], [], []
    for i, (req_id, tokens) in enumerate(zip(req_ids, sampled)):
        d = len(spec.get(req_id, ()))
        if d and tokens:
            ids.append(req_id)
            drafted.append(d)
            accepted.append(min(len(tokens) - 1, d))
            trees.append(bool(tree_rows) and i in tree_rows)
    return VerifiedRows(req_ids=tuple(ids), drafted=np.array(drafted, dtype=np.int64),
                        accepted=np.array(accepted, dtype=np.int64),
                        trees=np.array(trees, dtype=bool) if tree_rows else None)


def drafted_work(lengths: np.ndarray, k: int, planned: bool, chain_depth: int | None) -> tuple[int, int]:
    """``(drafts, depth)`` the drafter produced this step, for the drafting fit.

    A drafter told the plan drafts ``lengths`` (depth: the longest, at most its chain depth);
    one that cannot be told drafts ``k`` for every row and is capped afterwards, so it is timed
    for that work, not for what the plan keeps.

    >>> drafted_work(np.array([0, 2, 1]), 4, True, None), drafted_work(np.array([0, 2, 1]), 4, False, None)
    ((3, 2), (12, 4))
    >>> drafted_work(np.array([5, 3]), 5, True, 4)
    (8, 4)
    """
    if not planned:
        return len(lengths) * k, k
    return int(lengths.sum()), min(int(lengths.max()), chain_depth or k)


def plan_drafts(runner: Any, scheduler_output: Any, sampled: Any,
                propose: Callable[[], Any]) -> Any:
    """Plan this step's draft lengths, then draft (or not) accordingly; see the module docstring.

    A step where no row may draft (every decode row at ``spec_k = 0``, or only prefills) takes
    a short path: no policy call and no arrays, only the counters. This runs after every step
    with caches cold from the forward pass, where each extra call costs several times its
    warm price, so the path a speculation-off engine takes is kept this short on purpose.
    """
    planner = runner_planner(runner)
    req_ids = runner.input_batch.req_ids
    if not isinstance(sampled, list):  # a tensor of sampled ids: a GPU drafter, cap afterwards only
        return _cap_runner_drafts(runner, propose())
    if scheduler_output.scheduled_spec_decode_tokens:
        tree_rows = getattr(runner, TREE_ROWS_ATTR, None)  # set by tree verification this step
        planner.observe(verified_rows(scheduler_output, req_ids, sampled, tree_rows))
    n = len(req_ids)
    caps = planner.caps(request_caps(runner, planner.spec_ks), [len(t) for t in sampled[:n]], request_room(runner))
    if not any(caps):
        planner.plan_nothing()
        return [[] for _ in range(n)]
    lengths = planner.reuse(req_ids, caps)  # a held plan: no StepRows, no decision
    if lengths is None:
        if planner.hindsight:  # what steps without drafts would have accepted, before deciding
            planner.observe_hindsight(*runner.drafter.take_hindsight())
        lengths = planner.plan(planner.rows(req_ids, caps, runner.input_batch.num_tokens_no_spec[:n],
                                            request_classes(runner)[:n], prefill_left(runner, scheduler_output)))
    if not lengths.any():
        return [[] for _ in range(n)]
    drafter = getattr(runner, "drafter", None)
    set_lengths = getattr(drafter, "set_draft_lengths", None)
    if callable(set_lengths):
        if getattr(planner.policy, "chains_only", False):  # trees on, but chains pay this step
            set_lengths(lengths, chains=True)
        else:
            set_lengths(lengths)
    t0 = time.perf_counter()
    drafts = propose()
    made, deepest = drafted_work(lengths, planner.num_speculative_tokens, callable(set_lengths),
                                 getattr(planner.policy, "chain_depth", None))
    planner.record_drafting(made, deepest, (time.perf_counter() - t0) * 1e3)
    if bool((lengths == planner.num_speculative_tokens).all()):
        return drafts
    rows_out = drafts.tolist() if hasattr(drafts, "tolist") else drafts
    if len(rows_out) != n:
        logger.warning("draft plan not applied: %d draft rows for %d requests", len(rows_out), n)
        return drafts
    return cap_drafts(rows_out, lengths.tolist())


def apply() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner.propose_draft_token_ids, _MARK, False):
        return

    propose = GPUModelRunner.propose_draft_token_ids
    read = argument_reader(propose, ARGUMENTS)

    @functools.wraps(propose)
    def propose_draft_token_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        return plan_drafts(self, *read(args, kwargs), lambda: propose(self, *args, **kwargs))

    setattr(propose_draft_token_ids, _MARK, True)
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids  # type: ignore[method-assign]

    validate = InputProcessor._validate_params

    @functools.wraps(validate)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = validate(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams):
            try:
                parse_spec_k(params.extra_args)
            except InvalidSpecK as exc:
                raise VLLMValidationError(
                    str(exc), parameter="spec_k", value=(params.extra_args or {}).get("spec_k")
                ) from exc
        return result

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params  # type: ignore[method-assign]
    logger.debug("installed per-request spec_k patch")
