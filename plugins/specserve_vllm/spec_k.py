"""Per-request speculation length: the ``spec_k`` request argument and the draft cap it implies.

A request may carry ``SamplingParams.extra_args["spec_k"]`` (over HTTP: ``vllm_xargs``): an int
``>= 0`` capping that request's draft length for every drafter; ``0`` turns speculation off for
the request; absent means the engine's ``num_speculative_tokens``. A drafter learns each step's
planned lengths through ``set_draft_lengths`` (:class:`PlannedLengths`). Pure, no vLLM.

    >>> parse_spec_k({"spec_k": 2}), parse_spec_k(None), parse_spec_k({})
    (2, None, None)
    >>> cap_drafts([[1, 2, 3], [4, 5, 6], [7]], [2, None, 0])
    [[1, 2], [4, 5, 6], []]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPEC_K_KEY = "spec_k"
"""The ``extra_args`` / ``vllm_xargs`` key."""


class InvalidSpecK(ValueError):
    """``spec_k`` is present but not an int >= 0."""


def parse_spec_k(extra_args: Mapping[str, Any] | None) -> int | None:
    """The request's draft cap, or ``None`` when it sets none; raises :class:`InvalidSpecK`.

    Booleans and floats are rejected even when integral (``2.0``): the value is a count.
    ``None`` as the value means "engine default", like an absent key.
    """
    if not extra_args or SPEC_K_KEY not in extra_args:
        return None
    value = extra_args[SPEC_K_KEY]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpecK(
            f"{SPEC_K_KEY} must be an integer >= 0 (the request's maximum draft length), "
            f"got {value!r} of type {type(value).__name__}"
        )
    if value < 0:
        raise InvalidSpecK(f"{SPEC_K_KEY} must be >= 0, got {value}")
    return value


def safe_spec_k(extra_args: Mapping[str, Any] | None) -> int | None:
    """Like :func:`parse_spec_k` but an invalid value counts as absent (engine-side fallback)."""
    try:
        return parse_spec_k(extra_args)
    except InvalidSpecK:
        return None


def cap_drafts(drafts: Sequence[Sequence[int]], caps: Sequence[int | None]) -> list[list[int]]:
    """Truncate ``drafts[i]`` to ``caps[i]`` tokens (``None``: unchanged). Lengths must match."""
    if len(drafts) != len(caps):
        raise ValueError(f"{len(drafts)} drafts but {len(caps)} caps")
    return [list(d) if c is None else list(d[:c]) for d, c in zip(drafts, caps)]


class PlannedLengths:
    """A drafter's per-step plan: the lengths handed in by ``set_draft_lengths``, used once.

    The runner's planner calls ``set_draft_lengths`` right before ``propose``; ``propose`` takes
    the plan (``None`` when none was set or it does not fit the batch) and drafts each row only
    that far, skipping rows at 0.

    >>> p = PlannedLengths()
    >>> p.set([2, 0, 4]); p.take(3).tolist(), p.take(3)
    ([2, 0, 4], None)
    >>> p.set([1]); p.take(2) is None
    True
    >>> p.set([3], chains=True); p.shape("dynamic"), p.take(1).tolist(), p.shape("dynamic")
    ('chain', [3], 'dynamic')
    """

    def __init__(self) -> None:
        self._lengths: np.ndarray | None = None
        self._chains = False

    def set(self, lengths: Sequence[int] | np.ndarray, chains: bool = False) -> None:
        """``chains``: draft chains this step although the drafter drafts trees (the controller
        found chains pay more)."""
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._chains = chains

    def shape(self, drafter_shape: str) -> str:
        """The draft shape of the next ``propose``: the drafter's, or ``chain`` if the plan says so
        (read before :meth:`take`)."""
        return "chain" if self._chains else drafter_shape

    def take(self, num_reqs: int) -> np.ndarray | None:
        lengths, self._lengths, self._chains = self._lengths, None, False
        return lengths if lengths is not None and lengths.shape[0] == num_reqs else None


def bounded_room(room: np.ndarray, planned: np.ndarray | None) -> np.ndarray:
    """Each row's drafting room (model length, engine k) further bounded by the plan.

    >>> bounded_room(np.array([4, 4, 1]), np.array([2, 0, 3])).tolist()
    [2, 0, 1]
    """
    return room if planned is None else np.minimum(room, planned)
