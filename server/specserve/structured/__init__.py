"""Structured outputs: request pre-checks for response_format / regex / choice / grammar.

:func:`precheck` runs in the gateway before a request is forwarded. It refuses, with a 400 that
names the request parameter and the schema keyword's JSON pointer, constraints that an engine
would reject or that could tie it up: malformed envelopes, oversized or deeply nested schemas,
regexes whose automata explode, schema features vLLM's xgrammar backend does not support, and
anything that does not compile (tokenizer-free xgrammar compile with a time limit, answers cached
by content hash).

Example:
    >>> precheck({"response_format": {"type": "text"}}, "chat") is None
    True
    >>> try:
    ...     precheck({"structured_outputs": {"regex": "a{1,99999}"}}, "completions")
    ... except APIError as err:
    ...     print(err.param)
    structured_outputs.regex
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from specserve.errors import APIError
from specserve.structured.compile import CompileBusy, CompileRefused, GrammarChecker, warm_up
from specserve.structured.features import find_unsupported
from specserve.structured.schema_limits import SchemaLimits, check_regex, iter_patterns, json_depth
from specserve.structured.request import (
    Constraint,
    asks_strict,
    constraints,
    mark_strict,
    normalize_legacy,
)
from specserve.structured.schema_refs import dangling_refs

__all__ = ["SchemaLimits", "aprecheck", "asks_strict", "configure", "mark_strict", "normalize_legacy",
           "precheck", "warm_up"]

ROUTES = ("chat", "completions")

_STATE_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"limits": SchemaLimits(), "checker": None}


def configure(limits: SchemaLimits) -> None:
    """Set the limits :func:`precheck` uses by default (drops the compile cache)."""
    with _STATE_LOCK:
        _STATE["limits"] = limits
        _STATE["checker"] = None


def _checker(limits: SchemaLimits) -> GrammarChecker:
    with _STATE_LOCK:
        checker = _STATE["checker"]
        if checker is None or (checker.cache_size, checker.timeout_s) != (
            limits.cache_size,
            limits.compile_timeout_s,
        ):
            checker = GrammarChecker(limits.cache_size, limits.compile_timeout_s)
            _STATE["checker"] = checker
        return checker


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_structured_output")


def _encoded_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _check_size(value: Any, param: str, limits: SchemaLimits) -> None:
    size = _encoded_size(value)
    if size > limits.max_schema_bytes:
        raise _bad(f"{param} is too large ({size} > {limits.max_schema_bytes} bytes)", param)


def _check_json_schema(schema: Any, param: str, limits: SchemaLimits) -> None:
    if isinstance(schema, str):
        _check_size(schema, param, limits)
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as err:
            raise _bad(f"{param} is not valid JSON: {err}", param) from err
    if not isinstance(schema, dict):
        raise _bad(f"{param} must be a JSON object (a JSON schema)", param)
    _check_size(schema, param, limits)
    depth = json_depth(schema)
    if depth > limits.max_depth:
        raise _bad(f"{param} is nested too deeply ({depth} > {limits.max_depth} levels)", param)
    for pointer, pattern in iter_patterns(schema):
        problem = check_regex(pattern, limits)
        if problem is not None:
            raise _bad(f"unsupported schema at '{pointer}': {problem}", param)
    unsupported = find_unsupported(schema)
    if unsupported is not None:
        raise _bad(f"unsupported schema at '{unsupported[0]}': {unsupported[1]}", param)
    dangling = dangling_refs(schema)
    if dangling:
        pointer, ref = dangling[0]
        raise _bad(f"invalid schema at '{pointer}': $ref '{ref}' does not resolve to a subschema "
                   "of this schema", param)
    _compile_check("json", schema, param, "invalid JSON schema", limits)


def _compile_check(kind: Any, value: Any, param: str, what: str, limits: SchemaLimits) -> None:
    try:
        _checker(limits).check(kind, value)
    except CompileRefused as err:
        raise _bad(f"{what}: {err}", param) from err
    except CompileBusy as err:
        raise APIError(
            503, f"Cannot check {param} now: {err}", param=param,
            code="grammar_check_busy", headers={"Retry-After": "1"},
        ) from err


def _check_one(c: Constraint, limits: SchemaLimits) -> None:
    if c.kind == "json":
        _check_json_schema(c.value, c.param, limits)
    elif c.kind == "json_object":
        if not isinstance(c.value, bool):
            raise _bad(f"{c.param} must be a boolean", c.param)
    elif c.kind == "regex":
        if not isinstance(c.value, str):
            raise _bad(f"{c.param} must be a string", c.param)
        problem = check_regex(c.value, limits)
        if problem is not None:
            raise _bad(f"{c.param}: {problem}", c.param)
        _compile_check("regex", c.value, c.param, "invalid regex", limits)
    elif c.kind == "choice":
        if not isinstance(c.value, list) or not c.value:
            raise _bad(f"{c.param} must be a non-empty list of strings", c.param)
        if not all(isinstance(x, str) for x in c.value):
            raise _bad(f"{c.param} must contain only strings", c.param)
        if len(c.value) > limits.max_choices:
            raise _bad(f"{c.param} has too many choices (> {limits.max_choices})", c.param)
        _check_size(c.value, c.param, limits)
    elif c.kind == "grammar":
        if not isinstance(c.value, str) or not c.value.strip():
            raise _bad(f"{c.param} must be a non-empty grammar string", c.param)
        _check_size(c.value, c.param, limits)
        _compile_check("grammar", c.value, c.param, "invalid grammar", limits)
    else:  # structural_tag: the engine validates its shape; bound its size here
        _check_size(c.value, c.param, limits)
        value = c.value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as err:
                raise _bad(f"{c.param} is not valid JSON: {err}", c.param) from err
        if json_depth(value) > limits.max_depth:
            raise _bad(f"{c.param} is nested too deeply", c.param)


def precheck(
    body: dict[str, Any], route: str, *, limits: SchemaLimits | None = None
) -> None:
    """Validate a request's structured-output constraints before it reaches an engine.

    Raises :class:`specserve.errors.APIError` (400) naming the offending parameter. ``route`` is
    ``"chat"`` or ``"completions"``.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    active = limits or _STATE["limits"]
    for c in constraints(body):
        _check_one(c, active)


async def aprecheck(
    body: dict[str, Any], route: str, *, limits: SchemaLimits | None = None
) -> None:
    """:func:`precheck` for async handlers: the compile wait (up to the compile time limit) and
    xgrammar's one-time import run in a worker thread, so the event loop keeps serving.

    Requests without constraints are answered inline.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if not constraints(body):
        return
    await asyncio.to_thread(precheck, body, route, limits=limits)
