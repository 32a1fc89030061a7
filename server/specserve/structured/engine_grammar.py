"""The grammar the engine compiles for a ``json_schema`` constraint, in one place.

vLLM's xgrammar backend (with the compat patch ``xgrammar_strict_json``) and ``specserve bench
jsonschema`` both build it here, so the bench measures exactly what is served: the schema
rewritten by :mod:`.schema_rewrite` (required names declared), converted by xgrammar with the
backend's options, then the string and separator fixes of :mod:`.strict_json`.

Objects without ``additionalProperties`` stay closed by default, as vLLM and OpenAI's strict mode
have them: a model then writes only the declared keys. JSON Schema itself leaves such objects open;
``SPECSERVE_JSON_OPEN_OBJECTS=1`` in the engine's environment serves that reading (outputs may then
carry keys the schema does not name; on the demo model fewer of them finish within a token budget).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from specserve.structured.any_order import SeparatorStyle, mark_any_order, splice_any_order
from specserve.structured.schema_rewrite import rewrite_schema_text
from specserve.structured.strict_json import fix_json_ebnf

logger = logging.getLogger(__name__)

OPEN_OBJECTS_ENV = "SPECSERVE_JSON_OPEN_OBJECTS"


def open_objects_enabled() -> bool:
    """Whether objects without ``additionalProperties`` accept undeclared keys (read now)."""
    return os.environ.get(OPEN_OBJECTS_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def json_schema_ebnf(
    schema: str | dict[str, Any], *, open_objects: bool | None = None, **options: Any
) -> str:
    """EBNF for ``schema``; ``options`` are ``xgrammar.Grammar.from_json_schema``'s keywords.
    ``open_objects`` defaults to the environment's switch (:func:`open_objects_enabled`).

    >>> "root ::= ((basic_boolean))" in json_schema_ebnf({"type": "boolean"}, any_whitespace=False)
    True
    """
    import xgrammar as xgr

    opened = open_objects_enabled() if open_objects is None else open_objects
    text = rewrite_schema_text(schema, open_objects=opened)
    compact = tuple(options.get("separators") or ()) == (",", ":")
    spliced = _any_order_ebnf(text, options)
    if spliced is not None:
        return shortest_float_literals(fix_json_ebnf(spliced, compact), text)
    try:
        grammar = xgr.Grammar.from_json_schema(text, **options)
    except Exception as err:  # noqa: BLE001 - native code raises several types
        original = schema if isinstance(schema, str) else json.dumps(schema)
        if text == original:
            raise
        # The rewrite must never cost a schema that converts as written: serve it as written.
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        logger.warning("rewritten json schema did not convert; using it as written",
                       extra={"fields": {"error": reason}})
        grammar = xgr.Grammar.from_json_schema(original, **options)
    return shortest_float_literals(fix_json_ebnf(str(grammar), compact), text)


def _any_order_ebnf(text: str, options: dict[str, Any]) -> str | None:
    """xgrammar's grammar for ``text`` with its small objects in any property order
    (:mod:`.any_order`); ``None`` when there are none, or the marked schema does not convert."""
    import xgrammar as xgr

    try:
        marked = mark_any_order(json.loads(text))
    except (ValueError, RecursionError):
        return None
    if not marked.objects:
        return None
    try:
        ebnf = str(xgr.Grammar.from_json_schema(json.dumps(marked.schema), **options))
        spliced = splice_any_order(ebnf, marked.objects, SeparatorStyle.of(options))
        xgr.Grammar.from_ebnf(spliced)  # parses: the engine compiles exactly this text
    except Exception as err:  # noqa: BLE001 - native code raises several types
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        logger.warning("any-order grammar did not build; serving declared order",
                       extra={"fields": {"error": reason}})
        return None
    return spliced


def _enum_floats(node: Any, out: set[float]) -> set[float]:
    """Non-integral numbers among the ``enum``/``const`` values of a schema."""
    if isinstance(node, dict):
        values = node.get("enum") if isinstance(node.get("enum"), list) else []
        for value in [*values, *([node["const"]] if "const" in node else [])]:
            if isinstance(value, float) and value == value and not value.is_integer():
                out.add(value)
        for key, sub in node.items():
            if key not in ("enum", "const", "default", "examples"):
                _enum_floats(sub, out)
    elif isinstance(node, list):
        for sub in node:
            _enum_floats(sub, out)
    return out


def shortest_float_literals(ebnf: str, schema_text: str) -> str:
    """Let enum/const numbers also be written the way JSON writes them.

    xgrammar 0.2.8 renders a float ``enum``/``const`` value with 17 significant digits, so the
    only accepted spelling of ``0.1`` was ``0.10000000000000001``: a valid instance writing ``0.1``
    was refused, and a model could only write the long form. Each such literal becomes a choice of
    the shortest round-trip spelling and the long one (the same number).

    >>> shortest_float_literals('root ::= (("0.10000000000000001") | ("2"))', '{"enum": [0.1, 2]}')
    'root ::= ((("0.1" | "0.10000000000000001")) | ("2"))'
    """
    try:
        floats = _enum_floats(json.loads(schema_text), set())
    except (ValueError, RecursionError):
        return ebnf
    for value in sorted(floats):
        long, short = f'"{value:.17g}"', f'"{json.dumps(value)}"'
        if long != short:
            ebnf = ebnf.replace(long, f"({short} | {long})")
    return ebnf
