"""Local ``$ref`` forms that xgrammar 0.2.8 does not resolve, rewritten to plain JSON pointers.

xgrammar resolves a local reference only when it is ``#`` or an unescaped JSON pointer
(``#/definitions/a``). Two other forms are common in published schemas, and xgrammar converts
both to "any JSON value" (with a warning), so outputs there were not constrained at all:

- **plain-name fragments**: ``"$ref": "#rulePriority"`` naming the subschema whose ``id``
  (draft-04) or ``$id`` (draft-06/07) is ``"#rulePriority"``, or whose ``$anchor`` (2019-09 and
  later) is ``"rulePriority"``;
- **percent-encoded pointers**: a pointer in a URI fragment is percent-encoded
  (``#/patternProperties/%5Ba-z%5D%2B`` for the key ``[a-z]+``).

:func:`canonical_refs` rewrites both to the pointer xgrammar resolves. A name is rewritten only
when it is unambiguous: exactly one subschema carries it, and no subschema other than the root
changes the base URI (an ``id``/``$id`` that is not a plain fragment), since names are then
resolved against another document. :func:`dangling_refs` lists the local references that resolve
to nothing even so, which the gateway refuses (a validator would raise on them too).

Example:
    >>> schema = {"definitions": {"p": {"id": "#p", "type": "integer"}},
    ...           "properties": {"a": {"$ref": "#p"}}}
    >>> canonical_refs(schema)["properties"]["a"]
    {'$ref': '#/definitions/p'}
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

from specserve.structured.schema_walk import pointer as _pointer
from specserve.structured.schema_walk import resolve_local_ref, schema_nodes


def named_subschemas(schema: Any) -> dict[str, str] | None:
    """Plain names (``#name``) to the pointer of the one subschema carrying them.

    ``None`` when a subschema other than the root changes the base URI: names are then not
    resolved against this document alone. Names carried twice are left out.

    >>> named_subschemas({"$defs": {"a": {"$anchor": "x"}, "b": {"$id": "#y"}}})
    {'#x': '#/$defs/a', '#y': '#/$defs/b'}
    >>> named_subschemas({"$defs": {"a": {"$id": "other.json"}}}) is None
    True
    """
    found: dict[str, str] = {}
    repeated: set[str] = set()
    for node, path in schema_nodes(schema):
        names = []
        for key in ("id", "$id"):
            value = node.get(key)
            if not isinstance(value, str) or not path:
                continue
            if not value.startswith("#"):
                return None
            names.append(value)
        anchor = node.get("$anchor")
        if isinstance(anchor, str):
            names.append("#" + anchor)
        for name in names:
            if name in found and found[name] != _pointer(path):
                repeated.add(name)
            found[name] = _pointer(path)
    return {name: pointer for name, pointer in found.items() if name not in repeated}


def canonical_ref(root: Any, ref: str, names: dict[str, str] | None) -> str | None:
    """The JSON pointer xgrammar resolves for the local reference ``ref``, when that differs
    from ``ref``; ``None`` when ``ref`` is fine as written or cannot be resolved.

    >>> canonical_ref({"properties": {"[a-z]+": {}}}, "#/properties/%5Ba-z%5D%2B", None)
    '#/properties/[a-z]+'
    >>> canonical_ref({"$defs": {"a": {}}}, "#/$defs/a", None) is None
    True
    """
    if not ref.startswith("#") or ref == "#":
        return None
    if ref.startswith("#/"):
        if resolve_local_ref(root, ref) is not None:
            return None
        decoded = unquote(ref)
        return decoded if decoded != ref and resolve_local_ref(root, decoded) is not None else None
    pointer = (names or {}).get(ref) or (names or {}).get(unquote(ref))
    return pointer


def _refs(schema: Any) -> Iterator[tuple[str, tuple[str, ...], Callable[[], dict[str, str] | None]]]:
    """Each ``$ref`` string other than ``#`` in ``schema`` with the path of its node, and a function
    that reads the schema's named subschemas (:func:`named_subschemas`) once, on its first call."""
    read: list[dict[str, str] | None] = []

    def names() -> dict[str, str] | None:
        if not read:
            read.append(named_subschemas(schema))
        return read[0]

    for node, path in schema_nodes(schema) if isinstance(schema, dict) else ():
        ref = node.get("$ref")
        if isinstance(ref, str) and ref != "#":
            yield ref, path, names


def _where(path: tuple[str, ...]) -> str:
    """The JSON pointer of the node at ``path`` (``/`` for the root)."""
    return _pointer(path)[1:] or "/"


def canonical_refs(schema: Any) -> Any:
    """``schema``, or a copy with its local references in the form xgrammar resolves (see the
    module docstring).

    >>> s = {"properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {}}}
    >>> canonical_refs(s) is s
    True
    """
    if not isinstance(schema, dict):
        return schema
    changes: list[tuple[tuple[str, ...], str]] = []
    for ref, path, names in _refs(schema):
        if not ref.startswith("#") or ref.startswith("#/") and "%" not in ref:
            continue
        pointer = canonical_ref(schema, ref, None if ref.startswith("#/") else names())
        if pointer is not None:
            changes.append((path, pointer))
    if not changes:
        return schema
    out = copy.deepcopy(schema)
    for path, pointer in changes:
        node = out
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node["$ref"] = pointer
    return out


def dangling_refs(schema: Any) -> list[tuple[str, str]]:
    """``(pointer of the node, ref)`` for each local reference that resolves to nothing, even in
    its canonical form.

    >>> dangling_refs({"properties": {"a": {"$ref": "#/$defs/missing"}, "b": {"$ref": "#"}}})
    [('/properties/a', '#/$defs/missing')]
    >>> dangling_refs({"$defs": {"x": {"$anchor": "x"}}, "items": {"$ref": "#x"}})
    []
    """
    out = []
    for ref, path, names in _refs(schema):
        if ref.startswith("#/"):
            if resolve_local_ref(schema, ref) is None and canonical_ref(schema, ref, None) is None:
                out.append((_where(path), ref))
        # a plain name is judged only where names resolve against this document's base
        elif ref.startswith("#") and names() is not None and canonical_ref(schema, ref, names()) is None:
            out.append((_where(path), ref))
    return out


def unresolvable_refs(schema: Any) -> list[tuple[str, str]]:
    """``(pointer of the node, ref)`` for each reference to another document (``http://...``,
    ``other.json#/x``) and each plain name resolved against another base URI: nothing here
    fetches them, and xgrammar would leave any value allowed at that place, a weaker constraint
    than the schema states.

    >>> unresolvable_refs({"properties": {"a": {"$ref": "https://example.com/a.json"}}})
    [('/properties/a', 'https://example.com/a.json')]
    >>> unresolvable_refs({"$defs": {"a": {"$id": "other.json"}}, "items": {"$ref": "#a"}})
    [('/items', '#a')]
    >>> unresolvable_refs({"items": {"$ref": "#"}, "$defs": {"x": {"$anchor": "x"}}, "not": {"$ref": "#x"}})
    []
    """
    return [(_where(path), ref) for ref, path, names in _refs(schema)
            if not ref.startswith("#") or not ref.startswith("#/") and names() is None]
