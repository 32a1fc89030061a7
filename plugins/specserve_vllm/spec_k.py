"""Per-request speculation length: the ``spec_k`` request argument and the draft cap it implies.

A request may carry ``SamplingParams.extra_args["spec_k"]`` (over HTTP: ``vllm_xargs``): an int
``>= 0`` capping that request's draft length for every drafter; ``0`` turns speculation off for
the request; absent means the engine's ``num_speculative_tokens``. Pure functions, no vLLM.

    >>> parse_spec_k({"spec_k": 2}), parse_spec_k(None), parse_spec_k({})
    (2, None, None)
    >>> cap_drafts([[1, 2, 3], [4, 5, 6], [7]], [2, None, 0])
    [[1, 2], [4, 5, 6], []]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
