"""The grammar the engine compiles for a ``json_schema`` constraint, in one place.

vLLM's xgrammar backend (with the compat patch ``xgrammar_strict_json``) and ``specserve bench
jsonschema`` both build it here, so the bench measures exactly what is served: the schema
rewritten by :mod:`.schema_rewrite` (required names declared), converted by xgrammar with the
backend's options, then the string and separator fixes of :mod:`.strict_json`.

Three readings of a schema (``docs/structured-outputs.md``), chosen per request:

* **closed** (the default): objects without ``additionalProperties`` take only their declared
  keys, as vLLM, SGLang and OpenAI read them; objects of up to :data:`.any_order.MAX_PROPERTIES`
  keys take them in any order (:mod:`.any_order`).
* **open**: JSON Schema's letter, undeclared keys allowed too. A schema asks for it with
  ``"x-specserve-objects": "open"`` (:data:`OBJECTS_KEYWORD`); the engine setting
  ``json_objects`` (``specserve serve --json-objects open``) makes it the default.
* **strict**: OpenAI's strict-mode contract: declared keys only, in the declared order. The
  gateway asks for it when a request sets ``response_format.json_schema.strict: true``, by adding
  :data:`STRICT_KEYWORD` to the schema; the engine setting ``json_mode`` (``--json-mode strict``)
  makes it the default.

All accept only instances the schema accepts; they differ in which valid instances they allow.
"""

from __future__ import annotations

import functools
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
OBJECTS_KEYWORD = "x-specserve-objects"
"""Root keyword, ``"open"`` or ``"closed"``, that chooses one schema's reading of objects."""
_KEYWORDS = (STRICT_KEYWORD, OBJECTS_KEYWORD)


def strict_by_default() -> bool:
    """Whether schemas without :data:`STRICT_KEYWORD` get the strict reading (engine setting)."""
    return settings.current().json_mode == "strict"


def objects_open_by_default() -> bool:
    """Whether objects without ``additionalProperties`` are open where a schema does not say
    (engine setting)."""
    return settings.current().json_objects == "open"


CHECKED_HEADER = "x-specserve-constraints-checked"
"""Request header from the gateway to an engine: the request's constraints were compiled, as
served under the reading the value names (:func:`served_reading`). An engine whose own reading is
the same skips its own compile check (it trusts the header only from a caller holding its key)."""


def served_reading() -> str:
    """What decides the grammar a constraint is served as, in one string: the engine settings
    that change it and the grammar compiler's version.

    >>> served_reading().startswith("json_mode=")
    True
    """
    current = settings.current()
    return f"json_mode={current.json_mode};objects={current.json_objects};xgrammar={_compiler()}"


@functools.lru_cache(maxsize=1)
def _compiler() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("xgrammar")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def default_reading() -> tuple[bool, bool]:
    """``(strict, open objects)`` for schemas without their own reading keywords."""
    return strict_by_default(), objects_open_by_default()


def reading_keywords(schema: str | dict[str, Any]) -> tuple[str | dict[str, Any], dict[str, Any]]:
    """``schema`` without :data:`STRICT_KEYWORD` and :data:`OBJECTS_KEYWORD`, and their values.

    >>> reading_keywords({"type": "object", OBJECTS_KEYWORD: "open"})
    ({'type': 'object'}, {'x-specserve-objects': 'open'})
    >>> reading_keywords('{"type": "null"}')
    ('{"type": "null"}', {})
    """
    if isinstance(schema, str):
        if not any(k in schema for k in _KEYWORDS):
            return schema, {}
        try:
            parsed = json.loads(schema)
        except ValueError:
            return schema, {}
        if not isinstance(parsed, dict) or not any(k in parsed for k in _KEYWORDS):
            return schema, {}
        schema = parsed
    if not isinstance(schema, dict) or not any(k in schema for k in _KEYWORDS):
        return schema, {}
    rest = {k: v for k, v in schema.items() if k not in _KEYWORDS}
    return rest, {k: schema[k] for k in _KEYWORDS if k in schema}


def strict_reading(schema: str | dict[str, Any]) -> tuple[str | dict[str, Any], bool | None]:
    """``schema`` without the reading keywords, and :data:`STRICT_KEYWORD`'s value (``None`` when
    absent).

    >>> strict_reading({"type": "object", STRICT_KEYWORD: True})
    ({'type': 'object'}, True)
    >>> strict_reading('{"type": "null"}')
    ('{"type": "null"}', None)
    """
    rest, keywords = reading_keywords(schema)
    return rest, keywords[STRICT_KEYWORD] is True if STRICT_KEYWORD in keywords else None


def json_schema_ebnf(
    schema: str | dict[str, Any], *, strict: bool | None = None,
    open_objects: bool | None = None, any_order: bool | None = None, **options: Any
) -> str:
    """EBNF for ``schema``; ``options`` are ``xgrammar.Grammar.from_json_schema``'s keywords.

    ``strict`` defaults to the schema's :data:`STRICT_KEYWORD`, else the engine's setting
    (:func:`strict_by_default`); ``open_objects`` to the schema's :data:`OBJECTS_KEYWORD`, else
    the setting (:func:`objects_open_by_default`), and off when strict; ``any_order`` is on unless
    strict. Tests and benchmarks set them apart.

    >>> "root ::= ((basic_boolean))" in json_schema_ebnf({"type": "boolean"}, any_whitespace=False)
    True
    """
    import xgrammar as xgr

    schema, keywords = reading_keywords(schema)
    if strict is None:
        asked = keywords.get(STRICT_KEYWORD)
        strict = strict_by_default() if asked is None else asked is True
    if open_objects is None:
        objects = keywords.get(OBJECTS_KEYWORD)
        wanted = objects_open_by_default() if objects not in ("open", "closed") else objects == "open"
        open_objects = wanted and not strict
    opened = open_objects
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
