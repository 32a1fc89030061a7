"""The gateway's pre-check of a request's structured-output constraints (:class:`SchemaPrecheck`).

It refuses, with a 400 that names the request parameter and the schema keyword's JSON pointer,
constraints that an engine would reject or that could tie it up: malformed envelopes, oversized or
deeply nested schemas, regexes whose automata explode, schema features vLLM's xgrammar backend
does not support, and anything that does not compile (tokenizer-free xgrammar compile with a time
limit, answers cached by content hash). Every tool's ``function.parameters`` gets the same
JSON-schema check, reported under ``tools[i].function.parameters`` with code
``invalid_function_parameters``.

A :class:`SchemaPrecheck` holds its compile cache, its compile worker processes and the threads
that wait for them: the gateway's state object owns one, and no module-level state is kept, so
the engine, which imports the grammar modules of this package, loads none of this.

Example:
    >>> check = SchemaPrecheck()
    >>> check.precheck({"response_format": {"type": "text"}}, "chat")  # nothing to compile
    False
    >>> try:
    ...     check.precheck({"structured_outputs": {"regex": "a{1,99999}"}}, "completions")
    ... except APIError as err:
    ...     print(err.param)
    structured_outputs.regex
    >>> check.close()
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from specserve.errors import APIError
from specserve.structured.compile import (
    COMPILE_WORKERS,
    CompileBusy,
    CompileRefused,
    CompileThrottled,
    GrammarChecker,
    load_xgrammar,
)
from specserve.structured.features import find_unsupported
from specserve.structured.request import Constraint, constraints, invalid_structured_output, mark_strict
from specserve.structured.schema_limits import SchemaLimits, check_regex, iter_patterns, json_depth
from specserve.structured.schema_refs import dangling_refs, unresolvable_refs
from specserve.structured.tools import tool_constraints
from specserve.structured.workers import CompileWorkers

__all__ = ["ROUTES", "TOOL_PARAMETERS_CODE", "SchemaPrecheck"]

TOOL_PARAMETERS_CODE = "invalid_function_parameters"

ROUTES = ("chat", "completions")


@dataclass(frozen=True)
class _Budget:
    """What one request may spend on compiles: until ``deadline``, as ``owner``, with ``checker``."""

    deadline: float
    owner: str
    checker: GrammarChecker


def _encoded_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _check_size(value: Any, param: str, limits: SchemaLimits) -> None:
    size = _encoded_size(value)
    if size > limits.max_schema_bytes:
        raise invalid_structured_output(f"{param} is too large ({size} > {limits.max_schema_bytes} bytes)", param)


def _check_json_schema(schema: Any, param: str, limits: SchemaLimits, budget: _Budget) -> None:
    if isinstance(schema, str):
        _check_size(schema, param, limits)
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as err:
            raise invalid_structured_output(f"{param} is not valid JSON: {err}", param) from err
    if not isinstance(schema, dict):
        raise invalid_structured_output(f"{param} must be a JSON object (a JSON schema)", param)
    _check_size(schema, param, limits)
    depth = json_depth(schema)
    if depth > limits.max_depth:
        raise invalid_structured_output(f"{param} is nested too deeply ({depth} > {limits.max_depth} levels)", param)
    for pointer, pattern in iter_patterns(schema):
        problem = check_regex(pattern, limits)
        if problem is not None:
            raise invalid_structured_output(f"unsupported schema at '{pointer}': {problem}", param)
    unsupported = find_unsupported(schema)
    if unsupported is not None:
        raise invalid_structured_output(f"unsupported schema at '{unsupported[0]}': {unsupported[1]}", param)
    dangling = dangling_refs(schema)
    if dangling:
        pointer, ref = dangling[0]
        raise invalid_structured_output(f"invalid schema at '{pointer}': $ref '{ref}' does not resolve to a subschema "
                   "of this schema", param)
    elsewhere = unresolvable_refs(schema)
    if elsewhere:
        pointer, ref = elsewhere[0]
        raise invalid_structured_output(f"unsupported schema at '{pointer}': $ref '{ref}' refers outside this schema; "
                   "references are not fetched: put the definition under '$defs' and refer to "
                   "it as '#/$defs/NAME'", param)
    try:
        _compile_check("json", schema, param, "invalid JSON schema", limits, budget)
    except APIError as err:
        if err.status != 400:
            raise
        place = _failing_pattern(schema, limits, budget)
        if place is not None:
            raise invalid_structured_output(f"unsupported schema at '{place}': {err.message}", param) from err
        raise


def _failing_pattern(schema: dict[str, Any], limits: SchemaLimits, budget: _Budget) -> str | None:
    """The place of the first ``pattern`` that fails on its own (a counted repetition the
    compiler cannot build, say), to name it in the refusal; ``None`` when none does or time is up."""
    checker = budget.checker
    for pointer, pattern in iter_patterns(schema):
        if not pointer.endswith("/pattern"):
            continue
        try:
            checker.check("json", {"type": "string", "pattern": pattern}, deadline=budget.deadline,
                          owner=budget.owner)
        except CompileRefused:
            return pointer
        except CompileBusy:
            return None
    return None


def _compile_check(kind: Any, value: Any, param: str, what: str, limits: SchemaLimits,
                   budget: _Budget) -> None:
    try:
        budget.checker.check(kind, value, deadline=budget.deadline, owner=budget.owner)
    except CompileRefused as err:
        raise invalid_structured_output(f"{what}: {err}", param) from err
    except CompileThrottled as err:
        raise APIError(
            429, f"Cannot check {param} now: {err}.", param=param,
            code="grammar_check_throttled", headers={"Retry-After": "1"},
        ) from err
    except CompileBusy as err:
        raise APIError(
            503, f"Cannot check {param} now: {err}", param=param,
            code="grammar_check_busy", headers={"Retry-After": "1"},
        ) from err


def _check_one(c: Constraint, limits: SchemaLimits, budget: _Budget) -> None:
    if c.kind == "json":
        _check_json_schema(c.value, c.param, limits, budget)
    elif c.kind == "json_object":
        if not isinstance(c.value, bool):
            raise invalid_structured_output(f"{c.param} must be a boolean", c.param)
    elif c.kind == "regex":
        if not isinstance(c.value, str):
            raise invalid_structured_output(f"{c.param} must be a string", c.param)
        problem = check_regex(c.value, limits)
        if problem is not None:
            raise invalid_structured_output(f"{c.param}: {problem}", c.param)
        _compile_check("regex", c.value, c.param, "invalid regex", limits, budget)
    elif c.kind == "choice":
        if not isinstance(c.value, list) or not c.value:
            raise invalid_structured_output(f"{c.param} must be a non-empty list of strings", c.param)
        if not all(isinstance(x, str) for x in c.value):
            raise invalid_structured_output(f"{c.param} must contain only strings", c.param)
        if len(c.value) > limits.max_choices:
            raise invalid_structured_output(f"{c.param} has too many choices (> {limits.max_choices})", c.param)
        _check_size(c.value, c.param, limits)
    elif c.kind == "grammar":
        if not isinstance(c.value, str) or not c.value.strip():
            raise invalid_structured_output(f"{c.param} must be a non-empty grammar string", c.param)
        _check_size(c.value, c.param, limits)
        _compile_check("grammar", c.value, c.param, "invalid grammar", limits, budget)
    else:  # structural_tag: the engine validates its shape; bound its size here
        _check_size(c.value, c.param, limits)
        value = c.value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as err:
                raise invalid_structured_output(f"{c.param} is not valid JSON: {err}", c.param) from err
        if json_depth(value) > limits.max_depth:
            raise invalid_structured_output(f"{c.param} is nested too deeply", c.param)


_COMPILED_KINDS = frozenset({"json", "json_object", "regex", "grammar"})
"""Constraint kinds whose served grammar :meth:`SchemaPrecheck.precheck` compiles (``json_object``
needs none)."""


def _waiters() -> ThreadPoolExecutor:
    """Threads that wait for compile workers on behalf of async handlers: waiting is all they do,
    and the event loop's default executor (DNS lookups, ...) is left alone."""
    return ThreadPoolExecutor(max_workers=32, thread_name_prefix="grammar-wait")


def _tool_constraints(body: dict[str, Any]) -> list[Constraint]:
    """:func:`~specserve.structured.tools.tool_constraints`; its refusals count as ``invalid_tools``."""
    try:
        return tool_constraints(body)
    except APIError as err:
        err.reason = "invalid_tools"
        raise


class SchemaPrecheck:
    """Pre-checks requests under ``limits``; holds the compile cache and ``workers`` compile processes.

    The processes start on first use (or :meth:`warm_up`); :meth:`close` stops them.
    """

    def __init__(self, limits: SchemaLimits | None = None, *, workers: int = COMPILE_WORKERS) -> None:
        self.limits = limits or SchemaLimits()
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: CompileWorkers | None = None
        self._checker: GrammarChecker | None = None
        self._closed = False
        self._waiters = _waiters()

    def checker(self) -> GrammarChecker:
        """The compile checker (created on first use, with its worker processes when xgrammar is
        installed; importing it takes seconds, once)."""
        with self._lock:
            if self._checker is None:
                if load_xgrammar() is not None and not self._closed:
                    self._pool = CompileWorkers(size=self.workers)
                self._checker = GrammarChecker(self.limits.cache_size, self.limits.compile_timeout_s,
                                               workers=self._pool)
            return self._checker

    def prepare(self, timeout_s: float = 300.0) -> None:
        """Import xgrammar and wait (at most ``timeout_s``) for the compile workers to start."""
        self.checker().prepare(timeout_s)

    def warm_up(self) -> threading.Thread:
        """Import xgrammar and start the compile workers in a background thread, so the first
        request does not wait for them."""
        thread = threading.Thread(target=self.checker, name="xgrammar-import", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the compile workers and the waiting threads."""
        with self._lock:  # after a warm-up still creating the pool: it is then closed here
            self._closed = True
            pool, self._pool, self._checker = self._pool, None, None
        if pool is not None:
            pool.close()
        waiters, self._waiters = self._waiters, _waiters()
        waiters.shutdown(wait=False)

    def precheck(self, body: dict[str, Any], route: str, *, owner: str = "") -> bool:
        """Validate a request's structured-output constraints before it reaches an engine; return
        whether every constraint's served grammar was compiled here (xgrammar installed, only
        json / regex / grammar constraints, no tools), so the engine need not compile it again
        (:data:`~specserve.structured.engine_grammar.CHECKED_HEADER`).

        Raises :class:`specserve.errors.APIError` (400) naming the offending parameter. ``route``
        is ``"chat"`` or ``"completions"``. The schema checked is the one the engine gets (with the
        strict keyword when the request asks for strict mode). All compiles of one request share
        ``compile_timeout_s``; ``owner`` (the client) has one compile running at a time (429 when
        its earlier ones hold it past the request's time; 503 when no compile worker frees up in
        time).
        """
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        found = constraints(mark_strict(body))
        tool_found = _tool_constraints(body)
        if not found and not tool_found:
            return False
        checker = self.checker()
        checker.prepare()  # one-time start-up: not part of any request's time
        budget = _Budget(time.monotonic() + self.limits.compile_timeout_s, owner, checker)
        for c in found:
            _check_one(c, self.limits, budget)
        for c in tool_found:
            try:
                _check_one(c, self.limits, budget)
            except APIError as err:
                err.reason = "invalid_tools"
                if err.status == 400:
                    err.code = TOOL_PARAMETERS_CODE
                raise
        return (not tool_found and all(c.kind in _COMPILED_KINDS for c in found)
                and load_xgrammar() is not None)

    async def aprecheck(self, body: dict[str, Any], route: str, *, owner: str = "") -> bool:
        """:meth:`precheck` for async handlers: the compile wait (up to the compile time limit) and
        xgrammar's one-time import run in a waiting thread, so the event loop keeps serving.

        Requests without constraints are answered inline.
        """
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if not constraints(body) and not _tool_constraints(body):
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._waiters, lambda: self.precheck(body, route, owner=owner))
