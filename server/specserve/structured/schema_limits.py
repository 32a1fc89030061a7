"""Bounds checked on a constraint before anything compiles it.

A schema or pattern that passes these checks compiles in bounded time and memory, so a hostile
request is refused by cheap, pure functions instead of by a grammar compiler that may run for
seconds (xgrammar needs ~5 s for ``[a-z]{1,5000}``) or allocate without limit.

Example:
    >>> limits = SchemaLimits()
    >>> json_depth({"a": [{"b": 1}]})
    3
    >>> regex_cost("^(ab){1,3}c$")
    7
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from specserve.structured.schema_walk import escape_pointer_part, pointer, schema_nodes


@dataclass(frozen=True)
class SchemaLimits:
    """Upper bounds for one request's structured-output constraint."""

    max_schema_bytes: int = 256 * 1024
    """Largest JSON schema (compact JSON encoding), grammar or structural tag, in bytes."""
    max_depth: int = 48
    """Deepest nesting of objects/arrays in the schema document (vLLM itself refuses > 64)."""
    max_pattern_length: int = 1000
    """Longest regular expression (``pattern``, ``patternProperties`` key, ``regex``), in chars."""
    max_regex_cost: int = 1000
    """Largest regex size after expanding counted repetitions (see :func:`regex_cost`)."""
    max_choices: int = 1024
    """Most alternatives in a ``choice`` constraint."""
    compile_timeout_s: float = 3.0
    """Wall-clock limit for one compile; a slower constraint is refused with a 400."""
    cache_size: int = 1024
    """Compiled (or refused) constraints remembered by content hash."""


def json_depth(value: Any) -> int:
    """Nesting depth of objects and arrays (iterative, so hostile depth cannot overflow the stack).

    >>> json_depth(1), json_depth([]), json_depth({"a": {"b": [1]}})
    (0, 1, 3)
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in node)
    return deepest


def iter_patterns(schema: Any) -> Iterator[tuple[str, str]]:
    """Yield ``(json_pointer, regex)`` for every ``pattern`` and ``patternProperties`` key of the
    schema's subschemas (not of ``enum``/``const`` data).

    >>> list(iter_patterns({"properties": {"a": {"pattern": "x+"}}}))
    [('#/properties/a/pattern', 'x+')]
    """
    for node, path in schema_nodes(schema):
        at = pointer(path)
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            yield f"{at}/pattern", pattern
        pattern_props = node.get("patternProperties")
        if isinstance(pattern_props, dict):
            for key in pattern_props:
                yield f"{at}/patternProperties/{escape_pointer_part(key)}", key


def regex_cost(pattern: str) -> int:
    """Size of ``pattern`` with counted repetitions expanded: a bound on its automaton's size.

    Each atom (character, escape, class) costs 1, a group costs the sum of its contents, and a
    counted quantifier ``{n}``, ``{n,}``, ``{n,m}`` multiplies the preceding atom's cost by its
    largest count; ``*``, ``+`` and ``?`` add nothing. ``(ab){1,3}c`` costs 2*3 + 1 = 7;
    ``((a{1,30}){1,30}){1,10}`` costs 9000.

    >>> regex_cost("[a-z]{1,5000}"), regex_cost("((a{1,30}){1,30}){1,10}")
    (5000, 9000)
    """
    # Each frame: [sum of finished atoms in this group, cost of the last atom]
    stack: list[list[int]] = [[0, 0]]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        frame = stack[-1]
        if c == "\\":
            frame[0] += frame[1]
            frame[1] = 1
            i += 2
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            frame[0] += frame[1]
            frame[1] = 1
            i = j + 1
        elif c == "(":
            stack.append([0, 0])
            i += 1
        elif c == ")":
            inner = stack.pop() if len(stack) > 1 else [0, 0]
            frame = stack[-1]
            frame[0] += frame[1]
            frame[1] = inner[0] + inner[1]
            i += 1
        elif c == "{":
            j = pattern.find("}", i)
            count = _max_count(pattern[i + 1 : j]) if j > 0 else None
            if count is None:  # a literal brace
                frame[0] += frame[1]
                frame[1] = 1
                i += 1
            else:
                frame[1] *= max(count, 1)
                i = j + 1
        elif c in "*+?|^$":
            i += 1
        else:
            frame[0] += frame[1]
            frame[1] = 1
            i += 1
    total = 0
    for done, last in stack:
        total += done + last
    return total


def _max_count(body: str) -> int | None:
    """``"3"`` -> 3, ``"2,"`` -> 3, ``"1,5"`` -> 5; None unless ``body`` is a repetition count."""
    parts = body.split(",")
    if len(parts) > 2 or not parts[0].strip().isdigit():
        return None
    low = int(parts[0])
    if len(parts) == 1:
        return low
    high = parts[1].strip()
    if high == "":
        return low + 1
    return int(high) if high.isdigit() else None


def check_regex(pattern: str, limits: SchemaLimits) -> str | None:
    """Why ``pattern`` is refused, or None if it is within ``limits``.

    >>> check_regex("[a-z]{1,5000}", SchemaLimits())
    'regex is too complex (expands to 5000 > 1000 elements)'
    """
    if "\x00" in pattern:
        return "regex must not contain a NUL character"
    if len(pattern) > limits.max_pattern_length:
        return f"regex is too long ({len(pattern)} > {limits.max_pattern_length} characters)"
    cost = regex_cost(pattern)
    if cost > limits.max_regex_cost:
        return f"regex is too complex (expands to {cost} > {limits.max_regex_cost} elements)"
    return None
