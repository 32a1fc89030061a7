"""Structured outputs: request pre-checks for response_format / regex / choice / grammar."""

from __future__ import annotations

from typing import Any


def precheck(body: dict[str, Any], route: str) -> None:
    """Validate a request's structured-output constraints before it reaches an engine.

    Raises :class:`specserve.errors.APIError` (400) naming the offending parameter. ``route`` is
    ``"chat"`` or ``"completions"``.
    """
    return None
