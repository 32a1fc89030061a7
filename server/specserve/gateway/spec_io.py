"""Speculation fields on the wire: ``spec_k`` into request bodies, acceptance out of responses.

Requests carry their speculation length as ``vllm_xargs.spec_k`` (the engine plugin caps the
request's drafts at it). Responses of engines started with ``--per-request-spec-decode-metrics``
carry ``metrics.speculative_decoding`` (specserve starts them at the ``detailed`` level: with
per-step draft and acceptance counts): in the body of a unary response, and in the final usage
chunk of a stream (present only when the stream reports usage, ``stream_options.include_usage``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from specserve.gateway.goodput import SpecStats

_WHITESPACE = b" \t\r\n"


def spec_stats(response: Any) -> SpecStats | None:
    """The per-request acceptance in a parsed response or stream chunk, if it has one.

    Example:
        >>> spec_stats({"metrics": {"speculative_decoding": {
        ...     "mean_acceptance_length": 2.5, "draft_acceptance_rate": 0.75,
        ...     "acceptance_histogram": [1, 0, 3], "num_spec_steps": 4,
        ...     "num_accepted_draft_tokens": 6, "num_draft_tokens": 8, "num_spec_tokens": 2,
        ...     "per_step_drafted": [2, 2, 2, 2], "per_step_accepted": [2, 2, 0, 2]}}})
        SpecStats(accepted=6, drafted=8, steps=4, spec_tokens=2, mean_acceptance_length=2.5, \
histogram=(1, 0, 3), per_step_drafted=(2, 2, 2, 2), per_step_accepted=(2, 2, 0, 2))
        >>> spec_stats({"usage": {}}) is None, spec_stats({"metrics": {"speculative_decoding": {}}}) is None
        (True, True)
    """
    if not isinstance(response, Mapping):
        return None
    metrics = response.get("metrics")
    spec = metrics.get("speculative_decoding") if isinstance(metrics, Mapping) else None
    if not isinstance(spec, Mapping):
        return None
    try:
        histogram = spec.get("acceptance_histogram") or ()
        return SpecStats(
            accepted=int(spec["num_accepted_draft_tokens"]),
            drafted=int(spec["num_draft_tokens"]),
            steps=int(spec.get("num_spec_steps") or 0),
            spec_tokens=int(spec.get("num_spec_tokens") or 0),
            mean_acceptance_length=float(spec.get("mean_acceptance_length") or 1.0),
            histogram=tuple(int(c) for c in histogram),
            per_step_drafted=tuple(int(c) for c in spec.get("per_step_drafted") or ()),
            per_step_accepted=tuple(int(c) for c in spec.get("per_step_accepted") or ()),
        )
    except (KeyError, TypeError, ValueError):
        return None


def client_spec_k(body: Mapping[str, Any]) -> tuple[bool, int | None]:
    """``(present, value)`` of the client's own ``vllm_xargs.spec_k`` (value ``None`` if not an int).

    Example:
        >>> client_spec_k({"vllm_xargs": {"spec_k": 2}}), client_spec_k({"model": "m"})
        ((True, 2), (False, None))
        >>> client_spec_k({"vllm_xargs": {"spec_k": "x"}})
        (True, None)
    """
    xargs = body.get("vllm_xargs")
    if not isinstance(xargs, Mapping) or "spec_k" not in xargs:
        return False, None
    value = xargs["spec_k"]
    return True, value if isinstance(value, int) and not isinstance(value, bool) else None


def with_spec_k(body: bytes, k: int, has_xargs: bool) -> bytes | None:
    """``body`` (a JSON object) with ``vllm_xargs.spec_k = k``; ``None`` when it cannot be added.

    Without ``vllm_xargs`` in the body, the field is spliced in after the opening brace (the body
    is not parsed or copied twice); with one (and no ``spec_k``), the body is parsed and dumped.

    Example:
        >>> with_spec_k(b' {"model": "m"}', 3, has_xargs=False)
        b'{"vllm_xargs":{"spec_k":3},"model": "m"}'
        >>> json.loads(with_spec_k(b'{"model": "m", "vllm_xargs": {"a": 1}}', 0, has_xargs=True))
        {'model': 'm', 'vllm_xargs': {'a': 1, 'spec_k': 0}}
        >>> with_spec_k(b'[]', 1, has_xargs=False) is None
        True
    """
    if not has_xargs:
        start = len(body) - len(body.lstrip(_WHITESPACE))
        if body[start:start + 1] != b"{" or body[start + 1:].lstrip(_WHITESPACE)[:1] == b"}":
            return None
        return b'{"vllm_xargs":{"spec_k":%d},' % k + body[start + 1:]
    try:
        data = json.loads(body)
    except ValueError:
        return None
    xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
    if not isinstance(xargs, dict):
        return None
    xargs["spec_k"] = k
    return json.dumps(data).encode()


__all__ = ["client_spec_k", "spec_stats", "with_spec_k"]
