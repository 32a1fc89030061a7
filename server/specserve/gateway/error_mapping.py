"""The OpenAI-shaped error for any exception leaving a gateway route, and its rendering.

Every error leaves a route through one handler (:func:`handle_error`); the middleware renders the
errors it raises itself (before a route runs) with :func:`render_error`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from specserve.errors import APIError

log = logging.getLogger(__name__)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Union branches add type names (e.g. "str", "list[...]") that mean nothing to a client.
    parts = [p for p in parts if not p.startswith(("list[", "function-", "tagged-union["))]
    return ".".join(parts) or None


_JSON_KINDS: dict[type, str] = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
                                float: "a number"}


def body_error(first: dict[str, Any]) -> APIError | None:
    """The error for a body that is not a JSON object at all (``None`` when the error is a field's).

    Bodies that do not parse (or are empty, or not sent as JSON) get ``invalid_json``; JSON that is
    not an object gets ``invalid_type``.

    Example:
        >>> body_error({"type": "json_invalid", "loc": ("body", 3)}).code
        'invalid_json'
        >>> body_error({"type": "model_attributes_type", "loc": ("body",), "input": [1]}).message
        'The request body must be a JSON object, not an array.'
        >>> body_error({"type": "missing", "loc": ("body", "messages")}) is None
        True
    """
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    if tuple(first.get("loc", ())) != ("body",):
        return None
    value = first.get("input")
    if first.get("type") == "missing":
        return APIError(400, "The request body is empty or null: a JSON object is expected.", code="invalid_json")
    if isinstance(value, bytes | bytearray):  # no JSON content type: FastAPI left the bytes unparsed
        return APIError(400, "The request body is not JSON: send a JSON object with "
                             "'Content-Type: application/json'.", code="invalid_json")
    kind = _JSON_KINDS.get(type(value), "a JSON value of another type")
    return APIError(400, f"The request body must be a JSON object, not {kind}.", code="invalid_type")


def to_api_error(exc: Exception) -> APIError:
    """Map any exception leaving a route to the OpenAI-shaped error a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        whole_body = body_error(first)
        if whole_body is not None:
            return whole_body
        param = _param_of(tuple(first.get("loc", ())))
        detail = first.get("msg", "invalid request")
        message = f"Invalid value for '{param}': {detail}." if param else f"Invalid request: {detail}."
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400:
            # FastAPI's only 400: reading the body as JSON failed (not UTF-8, nested too deep).
            return APIError(400, "The request body could not be parsed as JSON.", code="invalid_json")
        if exc.status_code == 404:
            return APIError(404, "Unknown route.", code="unknown_url")
        if exc.status_code == 405:
            return APIError(405, "Method not allowed.", type="invalid_request_error",
                            code="method_not_allowed")
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "Internal error in the gateway.", code="internal_error")


def render_error(err: APIError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    return err.status, headers, body


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler of the gateway; leaves the error in ``request.state.error``, where
    the middleware counts it if it is a rejection."""
    err = to_api_error(exc)
    request.state.error = err
    if err.status >= 500:
        log.warning("request failed", extra={"fields": {
            "request_id": request.state.request_id if hasattr(request.state, "request_id") else None,
            "status": err.status, "error": err.message}})
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
