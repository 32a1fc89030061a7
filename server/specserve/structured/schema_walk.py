"""Where a JSON schema keeps its subschemas, one walk over them, and JSON pointers.

Every module of :mod:`specserve.structured` that looks inside a schema takes its keyword lists,
its walk, its pointer escaping and its local ``$ref`` resolution from here, so they agree on what
is a subschema and what is data (the values of ``enum``, ``const``, ``default`` and ``examples``:
a ``"pattern"`` or ``"$ref"`` key there is not a keyword).

    >>> [pointer(path) for _, path in schema_nodes({"items": {"enum": [{"a": 1}]}})]
    ['#', '#/items']
    >>> resolve_local_ref({"$defs": {"x/y": {"type": "null"}}}, "#/$defs/x~1y")
    {'type': 'null'}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SCHEMA_MAPS: tuple[str, ...] = ("properties", "patternProperties", "$defs", "definitions")
"""Keywords whose value maps names to subschemas (the map itself is not a schema)."""
MAP_KEYWORDS: tuple[str, ...] = (*SCHEMA_MAPS, "dependentSchemas")
""":data:`SCHEMA_MAPS` and ``dependentSchemas``, which xgrammar does not convert."""
SUBSCHEMA_KEYWORDS: tuple[str, ...] = ("items", "prefixItems", "additionalItems", "additionalProperties")
"""Keywords whose value is one subschema, or a list of them, that xgrammar converts."""
COMBINATORS: tuple[str, ...] = ("anyOf", "oneOf", "allOf")
"""Keywords whose value is a list of branch subschemas."""
DATA_KEYWORDS: frozenset[str] = frozenset({"enum", "const", "default", "examples"})
"""Keywords whose value is instance data, never a subschema."""


def schema_nodes(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[dict[str, Any], tuple[str, ...]]]:
    """Every object of the schema that can be a subschema, depth first, with its path (the
    values of :data:`DATA_KEYWORDS` are data and are not entered)."""
    if isinstance(node, dict):
        yield node, path
        for key, value in node.items():
            if key not in DATA_KEYWORDS:
                yield from schema_nodes(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from schema_nodes(value, (*path, str(i)))


def escape_pointer_part(key: Any) -> str:
    """One JSON-pointer reference token (RFC 6901: ``~`` as ``~0``, ``/`` as ``~1``).

    >>> escape_pointer_part("a/b~c")
    'a~1b~0c'
    """
    return str(key).replace("~", "~0").replace("/", "~1")


def pointer(path: tuple[str, ...]) -> str:
    """The URI-fragment JSON pointer (``#/a/b``) of a path from :func:`schema_nodes`."""
    return "#" + "".join("/" + escape_pointer_part(p) for p in path)


def resolve_local_ref(root: Any, ref: Any) -> Any:
    """The node a local ``$ref`` (``#/a/b``) points to in ``root``, else None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
