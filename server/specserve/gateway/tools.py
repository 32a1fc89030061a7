"""Tool calls in engine responses: collected (whole or streamed), checked, counted.

A request that offers tools is counted by its ``tool_choice`` (``specserve_gateway_tool_requests``);
the calls in its answer are counted (``tool_calls``) and each failure to produce a usable call
(``tool_call_failures``, by reason):

* ``no_call``: ``tool_choice`` named or ``required`` and the answer holds no call;
* ``unknown_tool``: a call names a function that was not offered;
* ``arguments``: the arguments are not a JSON object;
* ``schema``: the arguments do not validate against the function's ``parameters``.

Streams are read as they pass through (only for tool requests): SSE events that carry
``tool_calls`` are parsed and their argument fragments joined per call.

Example:
    >>> c = StreamedCalls()
    >>> c.feed(b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a",'
    ...        b' "function": {"name": "f", "arguments": "{\\\\"x\\\\""}}]}}]}\\n\\n')
    >>> c.feed(b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,'
    ...        b' "function": {"arguments": ": 1}"}}]}}]}\\n\\ndata: [DONE]\\n\\n')
    >>> c.calls(), c.done
    ([Call(name='f', arguments='{"x": 1}')], True)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

FAILURE_REASONS = ("no_call", "unknown_tool", "arguments", "schema")


@dataclass(frozen=True)
class Call:
    """One function call of an answer."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ToolRequest:
    """What a request offered: its tool_choice kind and each function's parameters schema."""

    kind: str
    parameters: dict[str, dict[str, Any] | None]


def tool_request(body: dict[str, Any]) -> ToolRequest | None:
    """The tools ``body`` offers (``None`` without tools).

    >>> tool_request({"tools": [{"type": "function", "function": {"name": "f"}}]})
    ToolRequest(kind='auto', parameters={'f': None})
    """
    from specserve.structured.tools import tool_choice_kind

    tools = body.get("tools")
    if not tools:
        return None
    params: dict[str, dict[str, Any] | None] = {}
    for tool in tools:
        function = tool.get("function") or {}
        params[str(function.get("name"))] = function.get("parameters")
    return ToolRequest(tool_choice_kind(body), params)


def calls_in_response(data: Any) -> list[list[Call]]:
    """The calls of each choice of a non-streaming chat completion."""
    out: list[list[Call]] = []
    choices = data.get("choices") if isinstance(data, dict) else None
    for choice in choices or []:
        message = choice.get("message") or {} if isinstance(choice, dict) else {}
        calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            calls.append(Call(str(function.get("name")), str(function.get("arguments") or "")))
        out.append(calls)
    return out


@dataclass
class _Partial:
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class StreamedCalls:
    """Joins the tool-call deltas of an SSE stream (fed chunk by chunk, events may be split)."""

    def __init__(self) -> None:
        self._pending = b""
        self._calls: dict[tuple[int, int], _Partial] = {}
        self._choices: set[int] = set()
        self.done = False
        """The stream's ``data: [DONE]`` event was fed: the answer is whole, whether or not the
        response's end is read (a client that has its answer may leave before it comes)."""

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        events = data.split(b"\n\n")
        self._pending = events.pop()
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        if not event.startswith(b"data: {"):
            self.done = self.done or event.strip() == b"data: [DONE]"
            return
        has_calls = b'"tool_calls"' in event
        if not has_calls and b'"choices"' not in event:
            return
        try:
            payload = json.loads(event[6:])
        except ValueError:
            return
        for choice in payload.get("choices") or []:
            index = choice.get("index", 0)
            self._choices.add(index)
            if not has_calls:
                continue
            for delta in (choice.get("delta") or {}).get("tool_calls") or []:
                part = self._calls.setdefault((index, delta.get("index", 0)), _Partial())
                function = delta.get("function") or {}
                if function.get("name"):
                    part.name = function["name"]
                if function.get("arguments"):
                    part.arguments.append(function["arguments"])

    def calls(self, choice: int = 0) -> list[Call]:
        return [Call(p.name, "".join(p.arguments))
                for (c, _), p in sorted(self._calls.items()) if c == choice]

    def by_choice(self) -> list[list[Call]]:
        return [self.calls(i) for i in sorted(self._choices)] or [[]]


def failures(request: ToolRequest, calls: list[Call]) -> list[str]:
    """The failure reasons (see the module doc) of one choice's calls, one per failed call."""
    found: list[str] = []
    if not calls and request.kind in ("named", "required"):
        return ["no_call"]
    for call in calls:
        if call.name not in request.parameters:
            found.append("unknown_tool")
            continue
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            found.append("arguments")
            continue
        if not isinstance(arguments, dict):
            found.append("arguments")
            continue
        schema = request.parameters[call.name]
        if schema and not _valid(arguments, schema):
            found.append("schema")
    return found


def _valid(instance: Any, schema: dict[str, Any]) -> bool:
    import jsonschema

    from specserve.structured.engine_grammar import STRICT_KEYWORD

    schema = {k: v for k, v in schema.items() if k != STRICT_KEYWORD}
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        return bool(cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(instance))
    except (jsonschema.SchemaError, jsonschema.exceptions.RefResolutionError, ValueError,
            RecursionError) as exc:
        log.warning("tool schema not checkable", extra={"fields": {"error": type(exc).__name__}})
        return True
