"""Hand the target's last hidden state of each request to drafters that draft from it.

vLLM 0.32 gives hidden states only to its built-in Medusa/EAGLE proposers; a ``custom_class``
proposer sees token ids. One wrap on ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner
inherits it): when the runner's drafter has ``observe_hidden(hidden)``, it is called first with
``hidden [num_reqs, d]``, row ``r`` being the final-norm hidden state at the position from which
request ``r``'s last sampled token was sampled (the last accepted draft position, the bonus
position, or the last prompt position), chosen exactly as vLLM's own Medusa branch does. Then
the original method runs and calls the drafter's ``propose``. Drafters without
``observe_hidden`` cost nothing.

Drafters that keep per-position state (Hydra++'s prefix attention,
:mod:`specserve_vllm.heads.prefix_cache`) also get, when they have
``observe_positions(feed: CommittedPositions)`` and ``needs_positions`` is true, every
request's hidden states of the positions that became committed in this step (before
``observe_hidden``): all scheduled prompt positions of a prefill chunk, and in a decode step
the positions of the last sampled token and of the accepted drafts, i.e. the first
``num_sampled`` rows of the request's block (the rows a rejected draft produced are left out;
see :func:`committed_counts`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from specserve_vllm.compat.upstream import (
    PREPARE_INPUTS,
    PROPOSE_DRAFT_TOKEN_IDS,
    RUNNER,
    UpstreamFunction,
    argument_reader,
)

logger = logging.getLogger(__name__)

TREE_LAST_ROWS_ATTR = "_specserve_tree_last_rows"
"""Set by :mod:`specserve_vllm.compat.tree_steps` on steps that verified trees."""

_MARK = "_specserve_hidden_feed"

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Wrapped: the argument names below, and the Medusa branch whose row choice
    # last_hidden_rows mirrors.
    PROPOSE_DRAFT_TOKEN_IDS,
    # Relied on (committed_positions): rows of hidden_states follow input_batch.req_ids,
    # num_scheduled_tokens each; input_batch.num_computed_tokens_cpu holds the count before
    # this step.
    PREPARE_INPUTS,
    UpstreamFunction(RUNNER, "GPUModelRunner._update_states",
                     "95e379e122d7fc0cf27d3f7571f56eb6181874d848a2489c03a4f31a8cc5276d"),
)

ARGUMENTS: tuple[str, ...] = ("sampled_token_ids", "sample_hidden_states", "spec_decode_metadata")
POSITION_ARGUMENTS: tuple[str, ...] = ("scheduler_output", "sampled_token_ids", "hidden_states")


@dataclass(frozen=True)
class CommittedPositions:
    """Hidden states of the positions each request committed in one step.

    ``hidden[i]`` (``[n_i, d]``) holds request ``req_ids[i]``'s states at positions
    ``starts[i] .. starts[i] + n_i - 1``; ``tokens[i]`` its token ids at positions
    ``0 .. starts[i] + n_i - 1`` at least; ``finished`` the ids vLLM dropped since the last step.
    """

    req_ids: list[str]
    starts: list[int]
    hidden: list[Any]
    tokens: list[Any]
    finished: frozenset[str]



def last_hidden_rows(num_draft_tokens: list[int], num_sampled: list[int],
                     tree_rows: dict[int, int] | None = None) -> list[int]:
    """Row of ``sample_hidden_states`` behind each request's last sampled token.

    Request ``r`` owns ``num_draft_tokens[r] + 1`` consecutive rows (its drafts plus the bonus
    position); with ``num_sampled[r]`` tokens accepted and sampled, the last one came from row
    ``num_sampled[r] - 1`` of its block. A request that sampled nothing gets its block's first
    row (its drafter output is discarded anyway). A request that verified a tree
    (``tree_rows[r]``, from :mod:`specserve_vllm.compat.tree_steps`) gets the row of its last
    accepted node within its block instead.

    >>> last_hidden_rows([2, 0, 3], [3, 1, 1])
    [2, 3, 4]
    >>> last_hidden_rows([1, 1], [0, 2])
    [0, 3]
    >>> last_hidden_rows([3, 2], [2, 2], tree_rows={0: 3})   # request 0 accepted node 2 of 3
    [3, 5]
    """
    rows: list[int] = []
    offset = 0
    for r, (drafted, sampled) in enumerate(zip(num_draft_tokens, num_sampled)):
        in_block = tree_rows[r] if tree_rows and r in tree_rows else max(sampled, 1) - 1
        rows.append(offset + in_block)
        offset += drafted + 1
    return rows


def committed_counts(num_scheduled: list[int], num_spec: list[int], num_sampled: list[int]) -> list[int]:
    """How many of each request's scheduled rows are committed positions.

    A request scheduled ``n`` tokens of which ``s`` are drafts: the ``n - s`` others (a prompt
    chunk, or the last sampled token in a decode step) are committed, and so are the drafts
    the target accepted, ``num_sampled - 1`` of them (the last sampled token is the bonus or
    the correction, not yet fed to the target).

    >>> committed_counts([16, 3, 5, 1], [0, 2, 4, 0], [0, 2, 1, 1])  # chunk, 1 of 2, 0 of 4, plain
    [16, 2, 1, 1]
    """
    return [n - s + max(k - 1, 0) for n, s, k in zip(num_scheduled, num_spec, num_sampled)]


def committed_positions(runner: Any, scheduler_output: Any, sampled_token_ids: Any,
                        hidden_states: Any) -> CommittedPositions | None:
    """This step's :class:`CommittedPositions` from the runner's state (``None``: not a list step)."""
    if not isinstance(sampled_token_ids, list):
        return None
    batch = runner.input_batch
    req_ids = list(batch.req_ids)[: len(sampled_token_ids)]
    scheduled = [int(scheduler_output.num_scheduled_tokens[r]) for r in req_ids]
    spec = scheduler_output.scheduled_spec_decode_tokens
    counts = committed_counts(scheduled, [len(spec.get(r, ())) for r in req_ids],
                              [len(t) for t in sampled_token_ids])
    starts, hidden, tokens = [], [], []
    offset = 0
    for i, (n, c) in enumerate(zip(scheduled, counts)):
        start = int(batch.num_computed_tokens_cpu[i])
        starts.append(start)
        hidden.append(hidden_states[offset : offset + c])
        tokens.append(batch.token_ids_cpu[i, : start + c])
        offset += n
    return CommittedPositions(req_ids=req_ids, starts=starts, hidden=hidden, tokens=tokens,
                              finished=frozenset(scheduler_output.finished_req_ids))


def _hidden_per_request(sampled_token_ids: Any, sample_hidden_states: Any, spec_decode_metadata: Any,
                        tree_rows: dict[int, int] | None = None) -> Any:
    import torch

    if not isinstance(sampled_token_ids, list):
        return None
    if sample_hidden_states.shape[0] == len(sampled_token_ids):
        return sample_hidden_states
    if spec_decode_metadata is None:
        return None
    rows = last_hidden_rows(list(spec_decode_metadata.num_draft_tokens), [len(t) for t in sampled_token_ids],
                            tree_rows)
    index = torch.tensor(rows, dtype=torch.long, device=sample_hidden_states.device)
    return sample_hidden_states.index_select(0, index)


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    current = GPUModelRunner.propose_draft_token_ids
    if getattr(current, _MARK, False):
        return
    read_positions = argument_reader(current, POSITION_ARGUMENTS)
    read = argument_reader(current, ARGUMENTS)

    @functools.wraps(current)
    def propose_draft_token_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        drafter = getattr(self, "drafter", None)
        observe_positions = getattr(drafter, "observe_positions", None)
        if callable(observe_positions) and getattr(drafter, "needs_positions", False):
            feed = committed_positions(self, *read_positions(args, kwargs))
            if feed is not None:
                observe_positions(feed)
        observe = getattr(drafter, "observe_hidden", None)
        if callable(observe):
            observe(_hidden_per_request(*read(args, kwargs), getattr(self, TREE_LAST_ROWS_ATTR, None)))
        return current(self, *args, **kwargs)

    setattr(propose_draft_token_ids, _MARK, True)
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids  # type: ignore[method-assign]
    logger.debug("installed hidden feed patch")
