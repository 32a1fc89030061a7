"""OpenAI-shaped errors.

Every user-facing failure is raised as :class:`APIError` and rendered in exactly one place (the
gateway's exception handler) as ``{"error": {"message", "type", "param", "code"}}``. An error that
refuses a request before it reaches an engine carries its ``reason``, the label under which the
gateway counts it (the ``rejected_requests`` counter of :mod:`specserve.gateway.metrics`).

Example:
    >>> err = APIError(400, "temperature must be <= 2", param="temperature")
    >>> err.body()["error"]["type"]
    'invalid_request_error'
"""

from __future__ import annotations

from typing import Any

_DEFAULT_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error with an HTTP status that the client caused or must be told about.

    ``reason``: the rejection metric's label, or ``None`` for errors not counted as rejections.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # noqa: A002 - the OpenAI field is called "type"
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.reason = reason

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
