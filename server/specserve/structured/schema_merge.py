"""Schema normalisation before xgrammar: combinators merged with their parent, untyped
constraints given their type, and the other rewrites listed in ``docs/structured-outputs.md``.
Each keeps the set of valid instances unchanged (``format`` read as an annotation).

xgrammar 0.2.8 converts a node with ``anyOf``/``oneOf``/``allOf`` from the branches alone (the
parent's ``type``, ``properties`` and ``required`` are dropped) and reads a node without
``type`` whose keywords apply to one type (``{"required": ["a"]}``) as "any JSON value", so the
common idiom ``{"type": "object", "properties": {...}, "anyOf": [{"required": ["a"]},
{"required": ["b"]}]}`` accepted every JSON value. :func:`normalize_schema` applies its rewrites
top-down (the string ones are in :mod:`.schema_patterns`); where a merge is not known to be exact
the node is left as it was, and a budget bounds the work on recursive or huge schemas.

Example:
    >>> normalize_schema({"type": "object", "properties": {"a": {"type": "integer"}},
    ...                   "anyOf": [{"required": ["a"]}, {"type": "string"}]})
    {'anyOf': [{'type': 'object', 'properties': {'a': {'type': 'integer'}}, 'required': ['a']}]}
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from specserve.structured.schema_patterns import bounded_pattern, exact_format, pattern_over_format, search_patterns
from specserve.structured.schema_walk import COMBINATORS, SCHEMA_MAPS, SUBSCHEMA_KEYWORDS, resolve_local_ref

logger = logging.getLogger(__name__)

# Keywords that do not constrain the instance: they stay where they are.
ANNOTATIONS = frozenset(
    {"$schema", "$id", "id", "$anchor", "$comment", "title", "description", "default",
     "examples", "example", "deprecated", "readOnly", "writeOnly", "$defs", "definitions"}
)
# Keywords a merge cannot reason about: a node holding one is left as it is.
OPAQUE = frozenset(
    {"not", "if", "then", "else", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef",
     "$recursiveRef", "dependentSchemas", "dependencies", "propertyNames", "contains"}
)
LOWER_BOUNDS = frozenset({"minimum", "minLength", "minItems", "minProperties"})
UPPER_BOUNDS = frozenset({"maximum", "maxLength", "maxItems", "maxProperties"})
# Keywords that constrain one type only (JSON Schema ignores them for values of other types).
FAMILIES: dict[str, frozenset[str]] = {
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                         "multipleOf"}),
    "array": frozenset({"minItems", "maxItems", "uniqueItems", "additionalItems"}),
    "object": frozenset({"required", "additionalProperties", "minProperties", "maxProperties",
                         "patternProperties"}),
}
ALL_TYPES = ("string", "number", "boolean", "null", "array", "object")
# Nodes xgrammar already types by their keywords.
TYPED_BY_XGRAMMAR = frozenset({"properties", "items", "prefixItems"})

# Where subschemas are (other keywords hold data: a name in them may spell a keyword).
SCHEMA_VALUES = frozenset({*SUBSCHEMA_KEYWORDS, *COMBINATORS})

MAX_OPERATIONS = 10000
MAX_GROWTH = 4


class _Conflict(Exception):
    """The parts do not merge into one schema exactly."""


class _Unsatisfiable(Exception):
    """The parts have no instance in common (their types do not intersect)."""


class _Budget(Exception):
    """The normalisation did too much work; the original schema is kept."""


def _types(node: dict[str, Any]) -> set[str] | None:
    t = node.get("type")
    if t is None:
        return None
    if isinstance(t, str):
        return {t}
    if isinstance(t, list) and all(isinstance(x, str) for x in t):
        return set(t)
    raise _Conflict


def intersect_types(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    """Types both sides allow (``None``: no ``type`` keyword, every type).

    >>> sorted(intersect_types({"number", "null"}, {"integer", "string"}))
    ['integer']
    >>> intersect_types(None, {"string"}), intersect_types({"object"}, {"array"})
    ({'string'}, set())
    """
    if a is None or b is None:
        return b if a is None else a
    out = a & b
    if "number" in a and "integer" in b or "integer" in a and "number" in b:
        out.add("integer")
    return out


def _validation(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in ANNOTATIONS}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One schema valid exactly where both ``a`` and ``b`` are; ``a``'s keywords and properties
    come first (property order is the order a model writes them in). Raises ``_Conflict`` when
    that is not known to be exact, ``_Unsatisfiable`` when no value is valid under both.

    >>> merge({"type": "object", "properties": {"a": {}}, "required": ["a"]},
    ...       {"required": ["b"], "minProperties": 1})
    {'type': 'object', 'properties': {'a': {}}, 'required': ['a', 'b'], 'minProperties': 1}
    >>> merge({"minimum": 1, "maximum": 9}, {"minimum": 3})
    {'minimum': 3, 'maximum': 9}
    >>> merge({"properties": {"kind": {"type": "string"}}}, {"properties": {"kind": {"const": "a"}}})
    {'properties': {'kind': {'type': 'string', 'const': 'a'}}}
    """
    if OPAQUE & (a.keys() | b.keys()) or "$ref" in a or "$ref" in b:
        raise _Conflict
    for x, y in ((a, b), (b, a)):  # a closed or patterned side forbids the other's extra names
        if "patternProperties" in x and "properties" in y:
            raise _Conflict
        extra = x.get("additionalProperties", True)
        if extra is not True and set(y.get("properties") or {}) - set(x.get("properties") or {}):
            raise _Conflict
    out = copy.deepcopy(a)
    for key, value in b.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif out[key] == value or key in ANNOTATIONS:
            continue
        elif key == "type":
            types = intersect_types(_types(out), _types(b))
            if not types:
                raise _Unsatisfiable
            out["type"] = sorted(types) if len(types) > 1 else next(iter(types))
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key == "properties" and isinstance(value, dict) and isinstance(out[key], dict):
            for name, sub in value.items():
                mine = out[key].get(name)
                if mine is None:
                    out[key][name] = copy.deepcopy(sub)
                elif mine != sub:
                    if not isinstance(mine, dict) or not isinstance(sub, dict):
                        raise _Conflict
                    try:  # both constrain the property's value
                        out[key][name] = merge(mine, sub)
                    except _Unsatisfiable:  # only its absence is valid: not expressible here
                        raise _Conflict from None
        elif key in LOWER_BOUNDS and _is_number(value) and _is_number(out[key]):
            out[key] = max(value, out[key])
        elif key in UPPER_BOUNDS and _is_number(value) and _is_number(out[key]):
            out[key] = min(value, out[key])
        else:
            raise _Conflict
    return out


def json_type_of(value: Any) -> set[str]:
    """The JSON Schema types a value has.

    >>> sorted(json_type_of(3)), sorted(json_type_of(3.5)), sorted(json_type_of(True))
    (['integer', 'number'], ['number'], ['boolean'])
    """
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    names = {str: "string", type(None): "null", list: "array", dict: "object"}
    return {names[type(value)]} if type(value) in names else set()


def impossible_values(node: Any) -> bool:
    """Whether ``node`` lists values (``enum``/``const``) none of which has its ``type``: no
    instance is valid. xgrammar keeps the values and drops the type, so they passed.

    >>> impossible_values({"type": "object", "enum": ["MODIFIABLE", "DELETABLE"]})
    True
    >>> impossible_values({"type": "string", "enum": ["a", 1]}), impossible_values({"enum": []})
    (False, False)
    """
    if not isinstance(node, dict):
        return False
    try:
        types = _types(node)
    except _Conflict:
        return False
    values = node["enum"] if isinstance(node.get("enum"), list) else None
    if "const" in node:
        values = [node["const"]]
    if types is None or not values:
        return False
    return not any(json_type_of(v) & types for v in values)


def _negated_type(node: dict[str, Any]) -> bool:
    """Turn ``"not": {"type": T}`` into the types T leaves (xgrammar ignores ``not``).

    >>> node = {"not": {"type": "number"}, "description": "anything but a number"}
    >>> _negated_type(node), node["type"]
    (True, ['array', 'boolean', 'null', 'object', 'string'])
    >>> _negated_type({"not": {"type": "integer"}})  # numbers that are not integers: no type
    False
    """
    negated = node.get("not")
    if not isinstance(negated, dict) or set(_validation(negated)) != {"type"}:
        return False
    try:
        excluded = _types(negated) or set()
        current = _types(node)
    except _Conflict:
        return False
    if "integer" in excluded and "number" not in excluded:
        return False
    allowed = intersect_types(current, set(ALL_TYPES) - excluded)  # keeps "integer" against "number"
    if not allowed:
        return False
    del node["not"]
    node["type"] = sorted(allowed) if len(allowed) > 1 else next(iter(allowed))
    return True


DEPENDENCY_KEYWORDS = ("dependencies", "dependentRequired", "dependentSchemas")
# Drafts in which "dependencies" is a keyword; "dependentRequired"/"dependentSchemas" replaced it
# in 2019-09, and a schema without "$schema" is read as the latest draft (as validators do).
LEGACY_DRAFTS = ("draft-03", "draft-04", "draft-06", "draft-07")


def dependency_keywords(root: Any) -> tuple[str, ...]:
    """The dependency keywords in force for a schema document, by its ``$schema``.

    >>> dependency_keywords({"$schema": "http://json-schema.org/draft-04/schema#"})
    ('dependencies',)
    >>> dependency_keywords({})
    ('dependentRequired', 'dependentSchemas')
    """
    dialect = root.get("$schema") if isinstance(root, dict) else None
    if isinstance(dialect, str) and any(d in dialect for d in LEGACY_DRAFTS):
        return ("dependencies",)
    return ("dependentRequired", "dependentSchemas")


MAX_DEPENDENCIES = 4  # 2**4 branches at most
MAX_EXCLUSIVE_NAMES = 5  # names in an exactly-one-of split: 2**5 candidate branches at most
MAX_SPLIT_BYTES = 32768  # the branches of one split, serialised


def _object_only(node: dict[str, Any]) -> bool:
    return node.get("type") in ("object", ["object"])


class _Normalizer:
    def __init__(self, root: dict[str, Any], closed_objects: bool = False) -> None:
        self.root = root
        self.closed_objects = closed_objects
        self.dependencies = dependency_keywords(root)
        self.operations = 0

    def _spend(self) -> None:
        self.operations += 1
        if self.operations > MAX_OPERATIONS:
            raise _Budget

    def _inline(self, branch: Any) -> dict[str, Any]:
        """``branch`` itself, or a copy of the local definition it only references."""
        if not isinstance(branch, dict):
            raise _Conflict  # boolean schemas: left to xgrammar
        if "$ref" not in branch:
            return branch
        if set(_validation(branch)) != {"$ref"}:
            raise _Conflict
        target = resolve_local_ref(self.root, branch["$ref"])
        if not isinstance(target, dict):
            raise _Conflict
        self._spend()
        return {k: copy.deepcopy(v) for k, v in target.items() if k not in ("$defs", "definitions")}

    def _flatten_all_of(self, node: dict[str, Any]) -> bool:
        parts = node.get("allOf")
        if not isinstance(parts, list) or not parts:
            return False
        merged = {k: v for k, v in node.items() if k != "allOf"}
        kept = {k: v for k, v in merged.items() if k in ANNOTATIONS}
        merged = _validation(merged)
        try:
            for part in parts:
                self._spend()
                merged = merge(merged, _validation(self._inline(part)))
        except (_Conflict, _Unsatisfiable):
            return False  # not known to merge exactly, or impossible: left as written
        node.clear()
        node.update(kept)
        node.update(merged)
        return True

    def _distribute(self, node: dict[str, Any]) -> bool:
        present = [k for k in ("anyOf", "oneOf") if isinstance(node.get(k), list)]
        if len(present) != 1 or "allOf" in node:
            return False
        key = present[0]
        parent = _validation({k: v for k, v in node.items() if k != key})
        if not parent:
            return False
        branches: list[dict[str, Any]] = []
        try:
            for branch in node[key]:
                self._spend()
                try:
                    branches.append(merge(parent, _validation(self._inline(branch))))
                except _Unsatisfiable:
                    continue
        except _Conflict:
            return False
        if not branches:
            return False
        kept = {k: v for k, v in node.items() if k in ANNOTATIONS}
        node.clear()
        node.update(kept)
        node[key] = branches
        return True

    def _closed(self, node: dict[str, Any]) -> bool:
        """Whether ``node`` admits only its declared properties as served."""
        extra = node.get("additionalProperties", None if self.closed_objects else True)
        return extra in (None, False) and "patternProperties" not in node

    def _split_dependencies(self, node: dict[str, Any]) -> bool:
        """``dependencies`` / ``dependentRequired`` / ``dependentSchemas`` of a closed object as
        an ``anyOf`` of one branch per set of present trigger names (xgrammar ignores them).

        In the branch where trigger ``a`` is absent, ``a`` leaves ``properties`` (a closed object
        then cannot have it); where it is present, it is required along with what it requires
        (or the object also meets its schema). Only closed objects: an open object cannot be
        told to lack a name.

        >>> n = _Normalizer({"$schema": "http://json-schema.org/draft-07/schema#"}, closed_objects=True)
        >>> node = {"type": "object", "properties": {"a": {}, "b": {}}, "dependencies": {"a": ["b"]}}
        >>> n._split_dependencies(node), [(sorted(b["properties"]), b.get("required")) for b in node["anyOf"]]
        (True, [(['b'], None), (['a', 'b'], ['a', 'b'])])
        """
        present_keys = [k for k in self.dependencies if k in node]
        if not present_keys or not _object_only(node) or not self._closed(node):
            return False
        if any(k in node for k in DEPENDENCY_KEYWORDS if k not in self.dependencies):
            return False  # a keyword of another draft next to them: left as written
        if (OPAQUE - set(DEPENDENCY_KEYWORDS)) & node.keys() or {"anyOf", "oneOf", "allOf"} & node.keys():
            return False
        properties = node.get("properties", {})
        required = node.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            return False
        triggers: dict[str, Any] = {}
        for key in present_keys:
            table = node[key]
            if not isinstance(table, dict):
                return False
            for name, spec in table.items():
                if name in triggers or not isinstance(spec, (list, dict)):
                    return False
                if isinstance(spec, list) and not all(isinstance(x, str) for x in spec):
                    return False
                if name in properties:  # an undeclared name never appears in a closed object
                    triggers[name] = spec
        if len(triggers) > MAX_DEPENDENCIES:
            return False
        base = _validation({k: v for k, v in node.items() if k not in DEPENDENCY_KEYWORDS})
        names = list(triggers)
        branches: list[dict[str, Any]] = []
        try:
            for mask in range(2 ** len(names)):
                self._spend()
                present = [n for i, n in enumerate(names) if mask >> i & 1]
                absent = {n for n in names if n not in present}
                branch = self._dependency_branch(base, triggers, present, absent)
                if branch is not None:
                    branches.append(branch)
        except _Conflict:
            return False
        if not branches or len(branches) * len(json.dumps(base)) > MAX_SPLIT_BYTES:
            return False
        kept = {k: v for k, v in node.items() if k in ANNOTATIONS}
        node.clear()
        node.update(kept)
        node["anyOf"] = [copy.deepcopy(b) for b in branches]  # each branch is normalised on its own
        return True

    def _dependency_branch(
        self, base: dict[str, Any], triggers: dict[str, Any], present: list[str], absent: set[str]
    ) -> dict[str, Any] | None:
        """One branch of :meth:`_split_dependencies`; ``None`` when it can match nothing."""
        branch = dict(base)
        wanted = list(base.get("required", []))
        for name in present:
            spec = triggers[name]
            wanted.append(name)
            if isinstance(spec, list):
                wanted.extend(spec)
                continue
            try:
                branch = merge(branch, _validation(self._inline(spec)))
            except _Unsatisfiable:
                return None
            wanted.extend(branch.get("required", []))
        if absent & set(wanted):
            return None
        branch["properties"] = {n: s for n, s in branch.get("properties", {}).items() if n not in absent}
        if wanted:
            branch["required"] = list(dict.fromkeys(wanted))
        return branch

    def _drop_impossible_properties(self, node: dict[str, Any]) -> bool:
        """Remove optional properties of a closed object whose schema no value can meet
        (:func:`impossible_values`): such a name can never be present, and a closed object
        without it cannot have it.

        >>> n = _Normalizer({}, closed_objects=True)
        >>> node = {"type": "object", "properties": {"a": {"type": "object", "enum": ["X"]}, "b": {}}}
        >>> n._drop_impossible_properties(node), node["properties"]
        (True, {'b': {}})
        """
        properties = node.get("properties")
        if not isinstance(properties, dict) or not _object_only(node) or not self._closed(node):
            return False
        required = node.get("required", [])
        gone = [name for name, sub in properties.items()
                if impossible_values(sub) and not (isinstance(required, list) and name in required)]
        for name in gone:
            del properties[name]
        return bool(gone)

    def _exclusive_names(self, node: dict[str, Any]) -> bool:
        """``"oneOf": [{"required": [...]}, ...]`` on a closed object ("exactly one of these sets
        of names is all present") as an ``anyOf`` with one branch per set of present names that
        meets exactly one ``oneOf`` branch; each branch requires its names and lacks the others
        (xgrammar reads ``oneOf`` as ``anyOf``: an object meeting two branches passed). At most
        :data:`MAX_EXCLUSIVE_NAMES` names take part.

        >>> n = _Normalizer({}, closed_objects=True)
        >>> node = {"type": "object", "properties": {"a": {}, "b": {}, "c": {}},
        ...         "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}
        >>> n._exclusive_names(node), [(sorted(b["properties"]), b["required"]) for b in node["anyOf"]]
        (True, [(['a', 'c'], ['a']), (['b', 'c'], ['b'])])
        >>> node = {"type": "object", "properties": {"l": {}, "w": {}, "r": {}},
        ...         "oneOf": [{"required": ["l", "w"]}, {"required": ["r"]}]}
        >>> n._exclusive_names(node), [(sorted(b["properties"]), b["required"]) for b in node["anyOf"]]
        (True, [(['r'], ['r']), (['l', 'r'], ['l', 'r']), (['l', 'w'], ['l', 'w']), (['r', 'w'], ['r', 'w'])])
        """
        branches = node.get("oneOf")
        if not isinstance(branches, list) or len(branches) < 2 or not _object_only(node):
            return False
        if not self._closed(node) or {"anyOf", "allOf"} & node.keys() or OPAQUE & node.keys():
            return False
        properties = node.get("properties")
        required = node.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            return False
        sets: list[frozenset[str]] = []
        for branch in branches:
            if not isinstance(branch, dict) or set(_validation(branch)) != {"required"}:
                return False
            wanted = branch["required"]
            if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str) for w in wanted):
                return False
            sets.append(frozenset(wanted))
        names = sorted(set().union(*sets))
        if not set(names) <= properties.keys() or len(names) > MAX_EXCLUSIVE_NAMES:
            return False
        always = set(names) & set(required)
        free = [name for name in names if name not in always]
        kept_sets = []
        for mask in range(1 << len(free)):
            present = always | {name for i, name in enumerate(free) if mask >> i & 1}
            if sum(s <= present for s in sets) == 1:
                kept_sets.append(present)
        if not kept_sets:
            return False  # no object meets exactly one branch: leave it as written
        parent = _validation({k: v for k, v in node.items() if k not in ("oneOf", "properties", "required")})
        out = []
        for present in kept_sets:
            self._spend()
            absent = set(names) - present
            out.append({**copy.deepcopy(parent),
                        "required": [*required, *[n for n in free if n in present]],
                        "properties": {k: copy.deepcopy(v) for k, v in properties.items() if k not in absent}})
        kept = {k: v for k, v in node.items() if k in ANNOTATIONS}
        node.clear()
        node.update(kept)
        node["anyOf"] = out
        return True

    @staticmethod
    def _type_untyped(node: dict[str, Any]) -> bool:
        if "type" in node or TYPED_BY_XGRAMMAR & node.keys() or OPAQUE & node.keys():
            return False
        if {"enum", "const", "$ref", "anyOf", "oneOf", "allOf"} & node.keys():
            return False
        branches: list[dict[str, Any]] = []
        free: list[str] = []
        for name in ALL_TYPES:
            keys = FAMILIES.get(name, frozenset()) & node.keys()
            if keys:
                branches.append({"type": name, **{k: node[k] for k in sorted(keys)}})
            else:
                free.append(name)
        if not branches:
            return False
        if free:
            branches.append({"type": free if len(free) > 1 else free[0]})
        for keys in FAMILIES.values():
            for k in keys:
                node.pop(k, None)
        node["anyOf"] = branches
        return True

    def visit(self, node: Any, depth: int = 0) -> None:
        if not isinstance(node, (dict, list)):
            return
        if depth > 64:
            raise _Budget
        if isinstance(node, list):
            for item in node:
                self.visit(item, depth + 1)
            return
        _negated_type(node)
        self._split_dependencies(node)
        if not OPAQUE & node.keys():
            self._flatten_all_of(node)
            self._drop_impossible_properties(node)
            self._exclusive_names(node)
            self._distribute(node)
            self._type_untyped(node)
            pattern_over_format(node)
            exact_format(node)
            bounded_pattern(node)
            search_patterns(node)
        for key, value in list(node.items()):
            if key in SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    self.visit(sub, depth + 1)
            elif key in SCHEMA_VALUES:
                self.visit(value, depth + 1)


def normalize_schema(schema: Any, *, closed_objects: bool = False) -> Any:
    """A normalised copy of ``schema`` (see the module docstring); ``schema`` itself is left as
    it is, and returned unchanged when the budget runs out. ``closed_objects``: objects without
    ``additionalProperties`` will be served closed (declared names only).

    >>> normalize_schema({"minItems": 2})
    {'anyOf': [{'type': 'array', 'minItems': 2}, {'type': ['string', 'number', 'boolean', 'null', 'object']}]}
    >>> normalize_schema({"allOf": [{"type": "integer"}, {"minimum": 0}]})
    {'type': 'integer', 'minimum': 0}
    """
    if not isinstance(schema, dict):
        return schema
    try:
        out = copy.deepcopy(schema)
        _Normalizer(out, closed_objects).visit(out)
    except (_Budget, RecursionError):
        logger.debug("json schema normalisation over budget; kept as written")
        return schema
    if len(json.dumps(out)) > MAX_GROWTH * len(json.dumps(schema)) + 65536:
        logger.debug("json schema normalisation grew too much; kept as written")
        return schema
    return out
