"""JSON-schema features that vLLM's xgrammar backend refuses, located by JSON pointer.

vLLM 0.32 (``backend_xgrammar.has_xgrammar_unsupported_json_features``) answers a schema using any
of these with a 400 that does not say where; xgrammar 0.2.8 would otherwise ignore them and
generate values the schema forbids. Finding them here lets the gateway name the keyword and path.
Like vLLM, every object in the document is inspected (extension keywords included), so the
gateway refuses exactly what the engine would. Malformed keywords (``"type": "int"``) are left to
meta-validation (:mod:`.meta`), which knows where subschemas are.

Example:
    >>> find_unsupported({"properties": {"n": {"type": "integer", "multipleOf": 3}}})
    ('#/properties/n/multipleOf', 'multipleOf is not supported for integer/number')
    >>> find_unsupported({"type": "object"}) is None
    True
"""

from __future__ import annotations

from typing import Any

from specserve.structured.schema_walk import DATA_KEYWORDS, MAP_KEYWORDS, escape_pointer_part

# Formats xgrammar 0.2.8 converts for strings (vLLM's STRING_SUPPORTED_FORMATS).
SUPPORTED_FORMATS = frozenset(
    {
        "email",
        "date",
        "time",
        "date-time",
        "duration",
        "ipv4",
        "ipv6",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)



def _types(node: dict[str, Any]) -> set[str]:
    t = node.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    return set()


def _node_problem(node: dict[str, Any]) -> tuple[str, str] | None:
    """``(keyword, reason)`` for the first unsupported feature of one schema object."""
    types = _types(node)
    if types & {"integer", "number"} and "multipleOf" in node:
        return "multipleOf", "multipleOf is not supported for integer/number"
    if "array" in types:
        for key in ("uniqueItems", "contains", "minContains", "maxContains"):
            if key in node:
                return key, f"{key} is not supported for arrays"
    if "string" in types:
        fmt = node.get("format")
        if "format" in node and fmt not in SUPPORTED_FORMATS:
            return "format", f"string format {fmt!r} is not supported"
        if ("pattern" in node or "format" in node) and (
            "minLength" in node or "maxLength" in node
        ):
            key = "minLength" if "minLength" in node else "maxLength"
            return key, f"{key} cannot be combined with pattern/format"
    if "object" in types and "propertyNames" in node:
        names = node["propertyNames"]
        if isinstance(names, dict) and ("pattern" in names or "format" in names) and (
            "minLength" in names or "maxLength" in names
        ):
            return "propertyNames", "propertyNames cannot combine pattern/format with lengths"
        for key in ("patternProperties", "properties"):
            if key in node:
                return "propertyNames", f"propertyNames cannot be combined with {key}"
        if node.get("unevaluatedProperties", True) is not True:
            return "propertyNames", "propertyNames cannot be combined with unevaluatedProperties"
    if "object" in types and isinstance(node.get("patternProperties"), dict):
        if "properties" in node:
            return "patternProperties", "patternProperties cannot be combined with properties"
        if len(node["patternProperties"]) > 1:
            return "patternProperties", "only one patternProperties entry is supported"
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) >= 2:
        return "allOf", "allOf with more than one subschema is not supported"
    return None


def find_unsupported(schema: Any) -> tuple[str, str] | None:
    """``(json_pointer_to_keyword, reason)`` for the first unsupported feature, else None.

    Walks every object in the document (as vLLM does, including ``properties`` maps and
    ``$defs``), breadth first so the shallowest problem is named.
    """
    queue: list[tuple[Any, str]] = [(schema, "#")]
    head = 0
    while head < len(queue):
        node, path = queue[head]
        head += 1
        if isinstance(node, dict):
            problem = _node_problem(node)
            if problem is not None:
                keyword, reason = problem
                return f"{path}/{escape_pointer_part(keyword)}", reason
            for key, child in node.items():
                if key in DATA_KEYWORDS:
                    continue
                if key in MAP_KEYWORDS and isinstance(child, dict):
                    queue.extend(
                        (sub, f"{path}/{escape_pointer_part(key)}/{escape_pointer_part(name)}")
                        for name, sub in child.items()
                    )
                elif isinstance(child, (dict, list)):
                    queue.append((child, f"{path}/{escape_pointer_part(key)}"))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                if isinstance(child, (dict, list)):
                    queue.append((child, f"{path}/{i}"))
    return None
