"""Per-step draft lengths: what a spec-length policy sees and decides, and the simple policies.

After each step the runner drafts for the next one. Before the drafter runs, a policy gets the
batch as :class:`StepRows` (each row's cap: the request's ``spec_k`` bounded by the engine's
``num_speculative_tokens``; ``0`` for rows that are not decoding, e.g. a prefill chunk) and
returns one draft length per row, ``0 <= length <= cap``. A plan of all zeros means the next
step runs without speculation (no drafting, no rejection sampler: see
:mod:`specserve_vllm.compat.no_spec_step`). It also gets, once per step, what the last step
verified (:class:`VerifiedRows`), from which adaptive policies learn acceptance.

Policies here are pure (numpy only, no vLLM):

    >>> rows = StepRows(req_ids=("a", "b", "c"), caps=np.array([4, 0, 2]), context=np.array([9, 5, 7]))
    >>> FixedPolicy().plan(rows).tolist(), OffPolicy().plan(rows).tolist()
    ([4, 0, 2], [0, 0, 0])
    >>> VerifiedRows(req_ids=("a",), drafted=np.array([3]), accepted=np.array([1])).positions()
    [('a', 3, 1)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np

PolicyName = Literal["fixed", "off", "goodput", "jitter"]
POLICIES: tuple[str, ...] = get_args(PolicyName)
"""``fixed``: every decode row drafts its cap. ``off``: never speculate. ``goodput``: the
per-step controller (:mod:`specserve_vllm.spec_control.goodput`). ``jitter``: a random length in
``[0, cap]`` per row and step (seeded; tests losslessness while k changes)."""

SERVED_POLICIES: tuple[str, ...] = ("goodput", "fixed", "off")
"""The policies offered on the command line (``jitter`` is for tests)."""


@dataclass(frozen=True)
class StepRows:
    """The batch as the policy sees it when drafting for the next step (one entry per row)."""

    req_ids: tuple[str, ...]
    caps: np.ndarray
    """``[n]`` int: the most this row may draft (0: not a decode row, or ``spec_k = 0``)."""
    context: np.ndarray
    """``[n]`` int: tokens in the row's sequence so far (prompt + output)."""
    classes: np.ndarray | None = None
    """``[n]`` int: each row's sampling class (:func:`~specserve_vllm.spec_control.acceptance.sampling_class`
    of its temperature); ``None``: all greedy."""
    prefill: int = 0
    """Prompt tokens the batch's rows still have to prefill after this step (a chunked prompt):
    the next step schedules them, up to the engine's token budget."""

    @property
    def decode_rows(self) -> int:
        """Rows that may speculate (cap > 0)."""
        return int(np.count_nonzero(self.caps))


PREFILL_ESTIMATES = ("next", "last")
"""How the next step's prefill tokens are estimated: ``next``, what the batch's chunked prompts
still have to prefill (:attr:`StepRows.prefill`), known when the plan is made; ``last``, the
last step's. A prompt prefilled whole in one step does not come back in the next, where the
drafts are verified, so ``last`` priced that step a prefill too slow and speculation looked
cheap after every arrival (the earlier behaviour, kept for comparison)."""


PlanKey = tuple[tuple[str, ...], tuple[int, ...]]
"""A batch as plans are reused for it: request ids and their caps, in batch order."""


def plan_key(req_ids: Any, caps: Any) -> PlanKey:
    """The :data:`PlanKey` of a batch (``caps``: any iterable of ints).

    >>> plan_key(["a", "b"], [4, 0])
    (('a', 'b'), (4, 0))
    """
    return tuple(req_ids), tuple(caps)


def narrowed(held: PlanKey, plan: np.ndarray, key: PlanKey) -> np.ndarray | None:
    """``plan``, made for the batch ``held``, as it applies to the batch ``key``: the same
    requests with no cap raised (a row nearing ``max_tokens`` loses a cap a step), each length
    cut to its new cap; ``None`` when the requests differ or a cap rose. A decision stays right
    under lower caps: not speculating stays best when the speculating plans left are fewer, and
    a speculating plan only loses the slots no row may draft any more.

    >>> narrowed((("a", "b"), (4, 4)), np.array([3, 4]), (("a", "b"), (4, 2))).tolist()
    [3, 2]
    >>> narrowed((("a", "b"), (4, 2)), np.array([3, 2]), (("a", "b"), (4, 3))) is None  # a cap rose
    True
    >>> narrowed((("a", "b"), (4, 4)), np.array([0, 0]), (("a", "c"), (4, 4))) is None  # another request
    True
    """
    if held[0] != key[0] or any(c > h for c, h in zip(key[1], held[1])):
        return None
    return np.minimum(plan, np.array(key[1], dtype=plan.dtype))


@dataclass(frozen=True)
class VerifiedRows:
    """What the last step verified: for each row that had drafts, how many and how many held."""

    req_ids: tuple[str, ...]
    drafted: np.ndarray
    """``[m]`` drafts verified this step (> 0)."""
    accepted: np.ndarray
    """``[m]`` of them accepted (a prefix: ``0 <= accepted <= drafted``)."""
    trees: np.ndarray | None = None
    """``[m]`` bool: the row verified a tree (its drafts were nodes, the accepted ones a path);
    ``None``: every row verified a chain."""

    def positions(self) -> list[tuple[str, int, int]]:
        """``(req_id, drafted, accepted)`` per row."""
        return [(r, int(d), int(a)) for r, d, a in zip(self.req_ids, self.drafted, self.accepted)]


class SpecLengthPolicy(Protocol):
    """Chooses each row's draft length for the next step."""

    name: str

    def plan(self, rows: StepRows) -> np.ndarray:
        """``[n]`` draft lengths, ``0 <= plan[i] <= rows.caps[i]``."""
        ...

    def observe(self, verified: VerifiedRows) -> None:
        """Learn from the drafts the last step verified."""
        ...

    def finished(self, req_ids: frozenset[str]) -> None:
        """Forget requests that left the engine."""
        ...


class FixedPolicy:
    """Every decode row drafts its cap (the request's ``spec_k`` or the engine's k)."""

    name = "fixed"

    def plan(self, rows: StepRows) -> np.ndarray:
        return np.asarray(rows.caps, dtype=np.int64)

    def observe(self, verified: VerifiedRows) -> None:
        return None

    def finished(self, req_ids: frozenset[str]) -> None:
        return None


class OffPolicy(FixedPolicy):
    """No row ever drafts: every step runs without speculation."""

    name = "off"

    def plan(self, rows: StepRows) -> np.ndarray:
        return np.zeros(len(rows.caps), dtype=np.int64)


class JitterPolicy(FixedPolicy):
    """A seeded random length in ``[0, cap]`` per row, and a whole step off one time in three.

    Exists to test that outputs do not depend on how k changes from step to step.

    >>> p = JitterPolicy(seed=1)
    >>> rows = StepRows(req_ids=("a", "b"), caps=np.array([4, 0]), context=np.array([3, 3]))
    >>> all(0 <= p.plan(rows)[0] <= 4 and p.plan(rows)[1] == 0 for _ in range(20))
    True
    """

    name = "jitter"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def plan(self, rows: StepRows) -> np.ndarray:
        caps = np.asarray(rows.caps, dtype=np.int64)
        if self._rng.random() < 1 / 3:
            return np.zeros_like(caps)
        return np.floor(self._rng.random(caps.shape) * (caps + 1)).astype(np.int64)


def clip_plan(plan: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """A policy's plan forced into ``[0, caps]`` (a policy bug must not exceed a cap).

    >>> clip_plan(np.array([5, -1, 2]), np.array([4, 3, 2])).tolist()
    [4, 0, 2]
    """
    return np.clip(np.asarray(plan, dtype=np.int64), 0, np.asarray(caps, dtype=np.int64))
