"""Schema rewrites that keep a JSON schema's meaning but fix how xgrammar 0.2.8 converts it.

vLLM calls xgrammar's converter in strict mode, which closes every object: a property that is
not listed in ``properties`` is refused even where the schema allows it (JSON Schema's default
``additionalProperties`` is ``true``), and a name in ``required`` that is not listed in
``properties`` can never be written, so every output lacks it and fails the schema. Two rewrites,
each leaving the set of valid instances unchanged:

* **declare required names**: a required name missing from ``properties`` is declared there with
  the schema the object gives undeclared names (``additionalProperties``: ``{}`` when absent);
* **open objects**: an object schema without ``additionalProperties`` gets the default written
  out, ``"additionalProperties": true``, which xgrammar's strict mode honours;
* **free-form objects** (always): an object schema that declares no names (no ``properties``) is
  opened in either mode. xgrammar converts a bare inline ``{"type": "object"}`` as any object,
  but the same schema under ``$defs``, or with any other keyword beside ``type``, as ``{}``
  only; "closed objects" means objects that list only the names they declare;
* **open arrays** (always): an array schema without ``items`` gets ``"items": {}``, JSON Schema's
  default. xgrammar's strict mode reads a missing ``items`` as "no items": ``{"type": "array",
  "maxItems": 3}`` allowed only ``[]``, ``{"type": "array", "minItems": 1}`` did not convert at
  all, and only a bare ``{"type": "array"}`` written inline (not under ``$defs``) allowed items.

A client that wants closed objects says so (``"additionalProperties": false``), as JSON Schema
and OpenAI's strict mode both require. Objects are left as they are where the rewrite is not
known to be safe with xgrammar: documents using ``unevaluatedProperties`` (which the added
keywords would change), objects with ``patternProperties``, combinators, ``$ref`` or
conditionals, and the branches of an ``anyOf``/``oneOf``/``allOf`` (or the definitions such a
branch references) whose parent constrains the object itself: xgrammar converts those branches
without the parent's ``properties``, so opening them would let a parent-declared property
through with any value. ``oneOf`` branches get their required names declared but stay closed:
xgrammar converts ``oneOf`` like ``anyOf``, and open branches would overlap where closed ones
are disjoint.

Example:
    >>> rewrite_schema({"type": "object", "properties": {"a": {"type": "integer"}},
    ...                 "required": ["a", "b"]})  # doctest: +NORMALIZE_WHITESPACE
    {'type': 'object', 'properties': {'a': {'type': 'integer'}, 'b': {}}, 'required': ['a', 'b'],
     'additionalProperties': True}
    >>> rewrite_schema({"type": "object", "properties": {}, "additionalProperties": False})
    {'type': 'object', 'properties': {}, 'additionalProperties': False}
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from typing import Any

from specserve.structured.schema_merge import normalize_schema
from specserve.structured.schema_refs import canonical_refs
from specserve.structured.schema_walk import COMBINATORS, MAP_KEYWORDS, SUBSCHEMA_KEYWORDS, resolve_local_ref

logger = logging.getLogger(__name__)

# The rewrite walks into MAP_KEYWORDS, SUBSCHEMA_KEYWORDS and COMBINATORS (schema_walk). Not
# ``not`` / ``if`` / ``then`` / ``else`` / ``contains`` / ``propertyNames``: xgrammar does not
# convert them into the grammar as written, so there is nothing to gain there.
# An object schema with any of these is left alone (see the module docstring).
UNSAFE_SIBLINGS = frozenset(
    {"patternProperties", "unevaluatedProperties", "$ref", "not", "if", "then", "else",
     "dependentSchemas", "dependencies", *COMBINATORS}
)
# Keywords by which a parent constrains the object its combinator branches describe.
OBJECT_KEYWORDS = frozenset(
    {"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
     "minProperties", "maxProperties"}
)


def _is_object_schema(node: dict[str, Any]) -> bool:
    t = node.get("type")
    types = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else set()
    return "object" in types or isinstance(node.get("properties"), dict)


def _children(node: dict[str, Any]) -> Iterator[tuple[Any, str]]:
    """``(subschema, role)`` for each subschema the rewrite walks into; ``role`` is
    ``"constrained"`` for a combinator branch whose parent has object keywords, ``"oneOf"`` for
    another ``oneOf`` branch, else ``""``."""
    for key in MAP_KEYWORDS:
        value = node.get(key)
        if isinstance(value, dict):
            for sub in value.values():
                yield sub, ""
    for key in SUBSCHEMA_KEYWORDS:
        value = node.get(key)
        for sub in value if isinstance(value, list) else [value]:
            yield sub, ""
    constrains = bool(OBJECT_KEYWORDS & node.keys())
    for key in COMBINATORS:
        value = node.get(key)
        if isinstance(value, list):
            role = "constrained" if constrains else "oneOf" if key == "oneOf" else ""
            for sub in value:
                yield sub, role


def _walk(root: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """Every schema object reachable through :data:`MAP_KEYWORDS` etc., with its role."""
    stack: list[tuple[Any, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        node, role = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        yield node, role
        stack.extend(_children(node))


def _with_references(root: Any, nodes: list[dict[str, Any]]) -> set[int]:
    """Ids of ``nodes``, of the definitions they reference and of their union members
    (transitively): the schemas xgrammar converts in their place."""
    found: set[int] = set()
    pending: list[Any] = list(nodes)
    while pending:
        node = pending.pop()
        if not isinstance(node, dict) or id(node) in found:
            continue
        found.add(id(node))
        target = resolve_local_ref(root, node.get("$ref"))
        if target is not None:
            pending.append(target)
        for key in COMBINATORS:
            if isinstance(node.get(key), list):
                pending.extend(node[key])
    return found


def _declare_required(node: dict[str, Any]) -> int:
    required = node.get("required")
    extra = node.get("additionalProperties", True)
    if not isinstance(required, list) or extra is False:
        return 0
    properties = node.setdefault("properties", {})
    if not isinstance(properties, dict):
        return 0
    missing = [name for name in required if isinstance(name, str) and name not in properties]
    for name in missing:
        properties[name] = copy.deepcopy(extra) if isinstance(extra, dict) else {}
    if not properties:
        del node["properties"]
    return len(missing)


def _open_array(node: dict[str, Any]) -> bool:
    """Write out ``"items": {}`` on an array schema that has no ``items`` (see module doc)."""
    t = node.get("type")
    is_array = t == "array" or (isinstance(t, list) and "array" in t)
    if not is_array or "items" in node or "additionalItems" in node:
        return False
    node["items"] = {}
    return True


def rewrite_schema(schema: Any, *, open_objects: bool = True) -> Any:
    """A copy of ``schema`` with the rewrites applied (see the module docstring); with
    ``open_objects=False`` objects that declare names stay closed.

    >>> rewrite_schema({"type": "object", "required": ["a"]}, open_objects=False)
    {'type': 'object', 'required': ['a'], 'properties': {'a': {}}}
    """
    if not isinstance(schema, dict):
        return schema
    schema = canonical_refs(schema)  # references in the form xgrammar resolves
    if "unevaluatedProperties" in json.dumps(schema):
        return schema
    out = normalize_schema(schema, closed_objects=not open_objects)  # a copy, unless kept as written
    if out is schema:
        out = copy.deepcopy(schema)
    nodes = list(_walk(out))
    untouchable = _with_references(out, [n for n, role in nodes if role == "constrained"])
    # oneOf branches stay closed: xgrammar converts oneOf as anyOf, and open objects overlap.
    closed = _with_references(out, [n for n, role in nodes if role == "oneOf"])
    # Combinator branches (and what they reference) keep their arrays as written: xgrammar
    # converts a branch without its parent's "items", which an opened branch would then lose.
    branches = _with_references(out, [b for n, _ in nodes for k in COMBINATORS
                                      if isinstance(n.get(k), list) for b in n[k]])
    declared = opened = 0
    for node, _ in nodes:
        if id(node) not in branches and not UNSAFE_SIBLINGS & node.keys():
            opened += _open_array(node)
        if id(node) in untouchable or not _is_object_schema(node) or UNSAFE_SIBLINGS & node.keys():
            continue
        declared += _declare_required(node)
        # An object that declares no names is free-form in either mode (see the module doc).
        # Only where "type" says object: xgrammar reads an untyped schema with object keywords
        # (``{"required": []}``) as any value, and an added keyword would make it an object.
        t = node.get("type")
        free_form = (t == "object" or isinstance(t, list) and "object" in t) \
            and "properties" not in node and "patternProperties" not in node
        if (open_objects or free_form) and "additionalProperties" not in node \
                and id(node) not in closed:
            node["additionalProperties"] = True
            opened += 1
    if declared or opened:
        logger.debug(
            "json schema rewritten", extra={"fields": {"declared": declared, "opened": opened}}
        )
    return out


def rewrite_schema_text(schema: str | dict[str, Any], *, open_objects: bool = True) -> str:
    """:func:`rewrite_schema` for the JSON text an engine receives; unparsable text is returned
    unchanged (the converter reports the error).

    >>> rewrite_schema_text('{"type": "object"}')
    '{"type": "object", "additionalProperties": true}'
    >>> rewrite_schema_text('{"type": ')
    '{"type": '
    """
    if isinstance(schema, dict):
        return json.dumps(rewrite_schema(schema, open_objects=open_objects))
    try:
        parsed = json.loads(schema)
    except ValueError:
        return schema
    return json.dumps(rewrite_schema(parsed, open_objects=open_objects))
