"""The tool definitions of a chat request, checked like ``response_format`` before forwarding.

Each tool's ``function.parameters`` is a JSON schema the engine compiles into a grammar when
``tool_choice`` forces a call (named or ``required``), so it takes the same pre-check as
``response_format.json_schema.schema``, reported under ``tools[i].function.parameters``. The
envelope is checked here too: function names, duplicate names, and a ``tool_choice`` that names no
offered tool or forces a call without tools (vLLM would answer those with a 500 or ignore them).

Example:
    >>> tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    >>> [c.param for c in tool_constraints({"tools": tools, "tool_choice": "required"})]
    ['tools[0].function.parameters']
    >>> forced_tool({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}})
    'f'
"""

from __future__ import annotations

import re
from typing import Any

from specserve.errors import APIError
from specserve.structured.request import Constraint

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
"""OpenAI's rule for function names (letters, digits, ``_``, ``-``; ``.`` for namespaced tools)."""
TOOL_CHOICES = ("none", "auto", "required")


def _bad(message: str, param: str, code: str = "invalid_tool") -> APIError:
    return APIError(400, message, param=param, code=code, reason="invalid_tools")


def tool_choice_kind(body: dict[str, Any]) -> str:
    """``none`` / ``auto`` / ``required`` / ``named`` as the engine will read the request.

    >>> tool_choice_kind({}), tool_choice_kind({"tools": [{}]}), tool_choice_kind({"tool_choice": {}})
    ('none', 'auto', 'named')
    """
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return "named"
    if choice in TOOL_CHOICES:
        return str(choice)
    return "auto" if body.get("tools") else "none"


def forced_tool(body: dict[str, Any]) -> str | None:
    """The function name a named ``tool_choice`` forces, else ``None``."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def tool_constraints(body: dict[str, Any]) -> list[Constraint]:
    """The parameter schemas of ``body["tools"]`` to pre-check; 400 for a malformed envelope."""
    tools = body.get("tools")
    kind = tool_choice_kind(body)
    if not tools:
        if kind in ("required", "named"):
            raise _bad(f"tool_choice {'required' if kind == 'required' else 'naming a function'} "
                       "needs a non-empty 'tools' list", "tool_choice")
        return []
    found: list[Constraint] = []
    names: dict[str, int] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            raise _bad(f"tools[{i}].function must be an object", f"tools[{i}].function")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise _bad(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '-' or '.', "
                       f"got {name!r}", f"tools[{i}].function.name")
        if name in names:
            raise _bad(f"tools[{i}].function.name {name!r} is already the name of tools[{names[name]}]",
                       f"tools[{i}].function.name")
        names[name] = i
        if function.get("parameters") is not None:
            found.append(Constraint("json", function["parameters"], f"tools[{i}].function.parameters"))
    forced = forced_tool(body)
    if kind == "named":
        choice = body["tool_choice"]
        if choice.get("type") != "function" or forced is None:
            raise _bad("tool_choice must be 'none', 'auto', 'required' or "
                       '{"type": "function", "function": {"name": ...}}', "tool_choice")
        if forced not in names:
            raise _bad(f"tool_choice names the function {forced!r}, which is not in 'tools'",
                       "tool_choice.function.name")
    return found


def mark_strict_tools(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` whose forced tool's parameters carry the strict keyword when that tool
    says ``strict: true`` (the engine then serves OpenAI's strict reading of its schema, as for
    ``response_format``); ``body`` itself otherwise.

    Only a named ``tool_choice`` compiles the parameters as the root schema, where the keyword is
    read; ``required`` wraps every tool's schema in one array schema (the default reading).

    >>> from specserve.structured.engine_grammar import STRICT_KEYWORD
    >>> tools = [{"type": "function", "function": {"name": "f", "strict": True,
    ...           "parameters": {"type": "object"}}}]
    >>> body = {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}}
    >>> mark_strict_tools(body)["tools"][0]["function"]["parameters"][STRICT_KEYWORD]
    True
    """
    from specserve.structured.engine_grammar import STRICT_KEYWORD

    forced = forced_tool(body)
    tools = body.get("tools")
    if forced is None or not isinstance(tools, list):
        return body
    out = []
    changed = False
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if (isinstance(function, dict) and function.get("name") == forced and function.get("strict") is True
                and isinstance(function.get("parameters"), dict)):
            params = {**function["parameters"], STRICT_KEYWORD: True}
            tool = {**tool, "function": {**function, "parameters": params}}
            changed = True
        out.append(tool)
    return {**body, "tools": out} if changed else body


def asks_strict_tool(body: dict[str, Any]) -> bool:
    """Whether :func:`mark_strict_tools` would change ``body``."""
    return mark_strict_tools(body) is not body
