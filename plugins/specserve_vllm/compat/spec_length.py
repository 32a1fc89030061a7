"""Per-request speculation length (``extra_args["spec_k"]``) inside vLLM 0.32's V1 runner.

Two seams:

* ``GPUModelRunner.propose_draft_token_ids`` (also the CPU runner's): after the drafter
  proposes, each request's draft list is cut to its ``spec_k``. The runner hands these lists to
  the scheduler (``take_draft_token_ids`` -> ``Scheduler.update_draft_token_ids``), which already
  accepts per-request lengths, so a capped request is scheduled, verified and counted in the
  per-request spec metrics with only its own drafts; ``spec_k = 0`` drafts nothing.
  A drafter that returns a ``[num_reqs, k]`` tensor is turned into lists only when some request
  in the batch sets ``spec_k``.
* ``InputProcessor._validate_params``: an invalid ``spec_k`` (not an int, negative) is rejected
  when the request is added, as a ``VLLMValidationError`` (HTTP 400 in vLLM's server), instead
  of reaching the engine loop. The runner side treats an invalid value as absent, so it can
  never crash the engine.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from specserve_vllm.compat.upstream import PROPOSE_DRAFT_TOKEN_IDS, RUNNER, UpstreamFunction

from specserve_vllm.spec_k import InvalidSpecK, cap_drafts, parse_spec_k, safe_spec_k

logger = logging.getLogger(__name__)

_MARK = "_specserve_spec_length"

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: the drafts are cut after the drafter proposes.
    PROPOSE_DRAFT_TOKEN_IDS,
    # Relied on: per-request draft lists reach the scheduler as returned.
    UpstreamFunction(RUNNER, "GPUModelRunner._get_draft_token_ids_cpu",
                     "2f1324baa012de2d857b75f7e32c55caa8d34eff7f8e4822527b298ba287f0be"),
    UpstreamFunction(RUNNER, "GPUModelRunner.take_draft_token_ids",
                     "c16093bcaca3f827d960eb2c498d9015a22d8d28077bef455975d3cbedb2a22c"),
    # Wrapped: spec_k is validated with the other sampling parameters.
    UpstreamFunction("vllm.v1.engine.input_processor", "InputProcessor._validate_params",
                     "37ae3e0f471fd44cbf72eb3dffa30cc5ec72b1e9784db5c9031d0e0a5330c0e8"),
)


def request_caps(runner: Any) -> list[int | None]:
    """``spec_k`` of each request in the runner's batch order (``None``: engine default)."""
    caps: list[int | None] = []
    for req_id in runner.input_batch.req_ids:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        caps.append(safe_spec_k(getattr(params, "extra_args", None)))
    return caps


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


def apply() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner.propose_draft_token_ids, _MARK, False):
        return

    propose = GPUModelRunner.propose_draft_token_ids

    @functools.wraps(propose)
    def propose_draft_token_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _cap_runner_drafts(self, propose(self, *args, **kwargs))

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
