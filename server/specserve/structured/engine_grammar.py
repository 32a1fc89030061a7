"""The grammar the engine compiles for a ``json_schema`` constraint, in one place.

vLLM's xgrammar backend (with the compat patch ``xgrammar_strict_json``) and ``specserve bench
jsonschema`` both build it here, so the bench measures exactly what is served: the schema
rewritten by :mod:`.schema_rewrite` (required names declared), converted by xgrammar with the
backend's options, then the string and separator fixes of :mod:`.strict_json`.

Two readings of a schema, per request:

* **schema** (the default): what JSON Schema says. Objects without ``additionalProperties`` accept
  undeclared names, and objects of up to :data:`.any_order.MAX_PROPERTIES` names accept them in
  any order (:mod:`.any_order`); larger objects keep the declared order.
* **strict**: OpenAI's strict-mode contract, and vLLM's reading. Objects list only their declared
  names, in the declared order (a schema that puts ``"reasoning"`` before ``"answer"`` gets them
  written in that order). The gateway asks for it when a request sets
  ``response_format.json_schema.strict: true``, by adding :data:`STRICT_KEYWORD` to the schema;
  the engine setting ``json_mode`` (``SPECSERVE_JSON_MODE=strict``, ``specserve serve --json-mode
  strict``) makes it the default.

Both accept only instances the schema accepts; they differ in which valid instances they allow.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from specserve.engine import settings
from specserve.structured.any_order import SeparatorStyle, mark_any_order, splice_any_order
from specserve.structured.schema_walk import schema_nodes
from specserve.structured.schema_rewrite import rewrite_schema_text
from specserve.structured.strict_json import fix_json_ebnf

logger = logging.getLogger(__name__)

STRICT_KEYWORD = "x-specserve-strict"
"""Root keyword that asks for the strict reading of one schema (an annotation to validators)."""


def strict_by_default() -> bool:
    """Whether schemas without :data:`STRICT_KEYWORD` get the strict reading (engine setting)."""
    return settings.current().json_mode == "strict"


def strict_reading(schema: str | dict[str, Any]) -> tuple[str | dict[str, Any], bool | None]:
    """``schema`` without :data:`STRICT_KEYWORD`, and its value (``None`` when absent).

    >>> strict_reading({"type": "object", STRICT_KEYWORD: True})
    ({'type': 'object'}, True)
    >>> strict_reading('{"type": "null"}')
    ('{"type": "null"}', None)
    """
    if isinstance(schema, str):
        if STRICT_KEYWORD not in schema:
            return schema, None
        try:
            parsed = json.loads(schema)
        except ValueError:
            return schema, None
        if not isinstance(parsed, dict) or STRICT_KEYWORD not in parsed:
            return schema, None
        schema = parsed
    if not isinstance(schema, dict) or STRICT_KEYWORD not in schema:
        return schema, None
    rest = {k: v for k, v in schema.items() if k != STRICT_KEYWORD}
    return rest, schema[STRICT_KEYWORD] is True


def json_schema_ebnf(
    schema: str | dict[str, Any], *, strict: bool | None = None,
    open_objects: bool | None = None, any_order: bool | None = None, **options: Any
) -> str:
    """EBNF for ``schema``; ``options`` are ``xgrammar.Grammar.from_json_schema``'s keywords.

    ``strict`` defaults to the schema's :data:`STRICT_KEYWORD`, else the engine's setting
    (:func:`strict_by_default`). ``open_objects`` and ``any_order`` default to the reading's
    (both off when strict); tests and benchmarks set them apart.

    >>> "root ::= ((basic_boolean))" in json_schema_ebnf({"type": "boolean"}, any_whitespace=False)
    True
    """
    import xgrammar as xgr

    schema, asked = strict_reading(schema)
    if strict is None:
        strict = strict_by_default() if asked is None else asked
    opened = not strict if open_objects is None else open_objects
    reordered = not strict if any_order is None else any_order
    text = rewrite_schema_text(schema, open_objects=opened)
    compact = tuple(options.get("separators") or ()) == (",", ":")
    spliced = _any_order_ebnf(text, options) if reordered else None
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


def _enum_floats(schema: Any) -> set[float]:
    """Non-integral numbers among the ``enum``/``const`` values of a schema."""
    out: set[float] = set()
    for node, _ in schema_nodes(schema):
        values = node.get("enum") if isinstance(node.get("enum"), list) else []
        for value in [*values, *([node["const"]] if "const" in node else [])]:
            if isinstance(value, float) and value == value and not value.is_integer():
                out.add(value)
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
        floats = _enum_floats(json.loads(schema_text))
    except (ValueError, RecursionError):
        return ebnf
    for value in sorted(floats):
        long, short = f'"{value:.17g}"', f'"{json.dumps(value)}"'
        if long != short:
            ebnf = ebnf.replace(long, f"({short} | {long})")
    return ebnf
