"""Object properties in any order, with exact required-name and duplicate-name checks.

xgrammar 0.2.8 writes an object's properties in the order the schema declares them, and
undeclared names (where the schema allows them) only after all declared ones. JSON Schema has no
order: ``{"b": 1, "a": 2}`` is as valid as ``{"a": 2, "b": 1}``, so the grammar refused valid
instances, and a model could not write the names the other way round. xgrammar's ``any_order``
option lifts the order but also the required-name and duplicate-name checks (``{}`` and
``{"a": 1, "a": 2}`` pass), so it cannot be served.

For a small object this module serves any order exactly: the grammar tracks which declared names
have been written (one rule per subset), allows the end of the object once every required name is
among them, and never offers a name twice. Undeclared names, where allowed, may come anywhere.
With ``n`` declared names that is ``2**n`` rules of at most ``n + 2`` alternatives, hence
:data:`MAX_PROPERTIES` and :data:`MAX_STATES`. A larger object that allows undeclared names keeps
the declared order for its declared names but takes undeclared ones anywhere
(:func:`ordered_rules`, linear in ``n``): xgrammar allows them only after the last declared one.

How it is built, in two steps around xgrammar's converter:

1. :func:`mark_any_order` moves each such object, and each of its property schemas, into ``$defs``
   under a marker name, so that xgrammar converts every value to a rule of a known name;
2. :func:`splice_any_order` replaces the rule xgrammar wrote for the object (properties in
   declared order) by the subset rules of :func:`any_order_rules`, which reference those value
   rules and xgrammar's own rules for undeclared names (``<object>_addl_key``, whose strings
   exclude the declared names, and ``<object>_addl``).

An object is taken only when nothing else constrains it (``type``, ``properties``, ``required``,
``additionalProperties`` and annotations only) and no reference points inside it, so that moving
its parts keeps every reference's target.

Example:
    >>> style = SeparatorStyle(any_whitespace=False, item=",", key=":")
    >>> obj = AnyOrderObject("o", ("a", "b"), ("va", "vb"), frozenset({0}), False)
    >>> print("\\n".join(any_order_rules(obj, style)))  # doctest: +NORMALIZE_WHITESPACE
    o ::= (("{" "\\"a\\"" ":" va o_anyorder_a) | ("{" "\\"b\\"" ":" vb o_anyorder_b))
    o_anyorder_a ::= (("}") | ("," "\\"b\\"" ":" vb o_anyorder_ab))
    o_anyorder_b ::= (("," "\\"a\\"" ":" va o_anyorder_ab))
    o_anyorder_ab ::= (("}"))
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from specserve.structured.schema_walk import COMBINATORS, SCHEMA_MAPS, SUBSCHEMA_KEYWORDS, escape_pointer_part
from specserve.structured.schema_walk import schema_nodes

MAX_PROPERTIES = 8
"""Declared names of an object served in any order: ``2**8`` subset rules of at most 10
alternatives (about 80 ms of compile time here). Larger objects keep the declared order."""

MAX_STATES = 1024
"""Subset rules per schema, summed over its objects (``2**n`` each): four objects of 8 names,
or 64 of 4, keep the whole grammar's compile time well under the gateway's limit. Objects past
the budget keep the declared order."""

MARK = "specserveanyorder"
"""Prefix of the ``$defs`` names :func:`mark_any_order` adds: the object's number in lower-case
letters, then ``V`` and the property's number for a value, ``X`` for undeclared names' values
(letters only: xgrammar drops digits from the rule names it derives from ``$defs`` names)."""

# Keywords an object may carry and still be served in any order: what the grammar expresses,
# and annotations that constrain nothing.
_ALLOWED = frozenset(
    {"type", "properties", "required", "additionalProperties", "title", "description",
     "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
)
# Where subschemas sit that xgrammar converts into the grammar.
_MAPS = SCHEMA_MAPS
_SUBS = (*SUBSCHEMA_KEYWORDS, *COMBINATORS)
_ROOT_KEEP = ("$schema", "$defs", "definitions")
_WS = "[ \\n\\r\\t]*"


@dataclass(frozen=True)
class SeparatorStyle:
    """How xgrammar separates JSON tokens for one set of converter options."""

    any_whitespace: bool
    item: str
    key: str

    @classmethod
    def of(cls, options: dict[str, Any]) -> SeparatorStyle:
        """The style ``xgrammar.Grammar.from_json_schema(**options)`` writes.

        >>> SeparatorStyle.of({"any_whitespace": False})
        SeparatorStyle(any_whitespace=False, item=', ', key=': ')
        >>> SeparatorStyle.of({})
        SeparatorStyle(any_whitespace=True, item=',', key=':')
        """
        any_ws = bool(options.get("any_whitespace", True))
        seps = options.get("separators")
        if seps:
            item, key = seps
        else:
            item, key = (",", ":") if any_ws else (", ", ": ")
        if any_ws:
            item, key = item.strip(), key.strip()
        return cls(any_ws, item, key)

    def _pad(self, token: str) -> str:
        literal = _ebnf_literal(token)
        return f"{_WS} {literal} {_WS}" if self.any_whitespace else literal

    @property
    def comma(self) -> str:
        return self._pad(self.item)

    @property
    def colon(self) -> str:
        return self._pad(self.key)

    @property
    def open(self) -> str:
        return f'"{{" {_WS}' if self.any_whitespace else '"{"'

    @property
    def close(self) -> str:
        return f'{_WS} "}}"' if self.any_whitespace else '"}"'


@dataclass(frozen=True)
class AnyOrderObject:
    """An object the grammar serves in any order.

    ``rule`` is the rule xgrammar writes for it; ``value_rules[i]`` the rule of ``names[i]``'s
    value; ``required`` the indices of required names; ``additional`` whether undeclared names
    are allowed (xgrammar's ``<rule>_addl_key`` / ``<rule>_addl`` rules then exist).
    ``ordered``: declared names keep the declared order and only undeclared ones may come
    anywhere (:func:`ordered_rules`, for objects too large for :func:`any_order_rules`)."""

    rule: str
    names: tuple[str, ...]
    value_rules: tuple[str, ...]
    required: frozenset[int]
    additional: bool
    ordered: bool = False


def _ebnf_literal(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal.

    >>> _ebnf_literal('"a\\\\"q"')
    '"\\\\"a\\\\\\\\\\\\"q\\\\""'
    """
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def _state_name(rule: str, seen: int, n: int) -> str:
    letters = "".join(chr(ord("a") + i) for i in range(n) if seen >> i & 1)
    return f"{rule}_anyorder_{letters or 'none'}"


def any_order_rules(obj: AnyOrderObject, style: SeparatorStyle) -> list[str]:
    """EBNF rules for ``obj`` in any order (see the module example).

    One rule per set of declared names written so far; from each, any name not yet written
    follows, an undeclared name (when allowed) follows without changing the set, and the object
    ends once the set holds every required name. The first rule, named ``obj.rule``, replaces
    xgrammar's.
    """
    n = len(obj.names)
    required = sum(1 << i for i in obj.required)
    entries = [
        f"{_ebnf_literal(json.dumps(name, ensure_ascii=False))} {style.colon} {value}"
        for name, value in zip(obj.names, obj.value_rules, strict=True)
    ]
    extra = f"{obj.rule}_addl_key {style.colon} {obj.rule}_addl"

    def alternatives(seen: int, lead: str) -> list[str]:
        alts = [f"{lead} {entries[i]} {_state_name(obj.rule, seen | 1 << i, n)}"
                for i in range(n) if not seen >> i & 1]
        if obj.additional:
            alts.append(f"{lead} {extra} {_state_name(obj.rule, seen, n)}")
        return alts

    first = alternatives(0, style.open)
    if not required:
        first.insert(0, f"{style.open} {style.close}")
    lines = [f"{obj.rule} ::= ({' | '.join(f'({a})' for a in first)})"]
    for seen in range(0 if obj.additional else 1, 1 << n):
        alts = alternatives(seen, style.comma)
        if seen & required == required:
            alts.insert(0, style.close)
        lines.append(f"{_state_name(obj.rule, seen, n)} ::= ({' | '.join(f'({a})' for a in alts)})")
    return lines


def ordered_rules(obj: AnyOrderObject, style: SeparatorStyle) -> list[str]:
    """EBNF rules for ``obj`` with its declared names in the declared order and undeclared names
    (``obj.additional``) before, between or after them: xgrammar allows undeclared names only
    after the last declared one. Linear in the number of names.

    ``<rule>_anyorder_s_<i>``: declared names from index ``i`` on may follow; ``_n_<i>``: the
    next declared name is the one at ``i`` or, past an optional one, a later one; ``_g_<i>``: the
    same as the object's first member (no comma).

    >>> style = SeparatorStyle(any_whitespace=False, item=",", key=":")
    >>> obj = AnyOrderObject("o", ("a", "b"), ("va", "vb"), frozenset({1}), True, ordered=True)
    >>> print("\\n".join(ordered_rules(obj, style)))  # doctest: +NORMALIZE_WHITESPACE
    o ::= (("{" o_anyorder_g_a) | ("{" o_addl_key ":" o_addl o_anyorder_s_a))
    o_anyorder_s_a ::= (("," o_addl_key ":" o_addl o_anyorder_s_a) | (o_anyorder_n_a))
    o_anyorder_n_a ::= (("," "\\"a\\"" ":" va o_anyorder_s_b) | (o_anyorder_n_b))
    o_anyorder_g_a ::= (("\\"a\\"" ":" va o_anyorder_s_b) | (o_anyorder_g_b))
    o_anyorder_s_b ::= (("," o_addl_key ":" o_addl o_anyorder_s_b) | (o_anyorder_n_b))
    o_anyorder_n_b ::= (("," "\\"b\\"" ":" vb o_anyorder_s_c))
    o_anyorder_g_b ::= (("\\"b\\"" ":" vb o_anyorder_s_c))
    o_anyorder_s_c ::= (("}") | ("," o_addl_key ":" o_addl o_anyorder_s_c))
    """
    n = len(obj.names)
    extra = f"{obj.rule}_addl_key {style.colon} {obj.rule}_addl"

    def name(kind: str, i: int) -> str:
        return f"{obj.rule}_anyorder_{kind}_{_letters(i)}"

    def entry(i: int) -> str:
        literal = _ebnf_literal(json.dumps(obj.names[i], ensure_ascii=False))
        return f"{literal} {style.colon} {obj.value_rules[i]} {name('s', i + 1)}"

    def alts(items: list[str]) -> str:
        return f"({' | '.join(f'({a})' for a in items)})"

    first = [f"{style.open} {name('g', 0)}"] if n else []
    if obj.additional:
        first.append(f"{style.open} {extra} {name('s', 0)}")
    if not obj.required:
        first.insert(0, f"{style.open} {style.close}")
    lines = [f"{obj.rule} ::= {alts(first)}"]
    for i in range(n + 1):
        ends = not any(r >= i for r in obj.required)
        state = [style.close] if ends else []
        if obj.additional:
            state.append(f"{style.comma} {extra} {name('s', i)}")
        if i < n:
            state.append(name("n", i))
        lines.append(f"{name('s', i)} ::= {alts(state)}")
        if i < n:
            skip = [] if i in obj.required or i + 1 == n else [name("n", i + 1)]
            lines.append(f"{name('n', i)} ::= {alts([f'{style.comma} {entry(i)}', *skip])}")
            skip = [] if i in obj.required or i + 1 == n else [name("g", i + 1)]
            lines.append(f"{name('g', i)} ::= {alts([entry(i), *skip])}")
    return lines


def _letters(i: int) -> str:
    """``0 -> 'a'``, ``25 -> 'z'``, ``26 -> 'ba'``: digit-free, distinct names."""
    out = ""
    while True:
        out = chr(ord("a") + i % 26) + out
        i //= 26
        if not i:
            return out


def _slots(node: Any, path: str) -> Iterator[tuple[Any, Any, dict[str, Any], str]]:
    """``(container, key, subschema, pointer)`` for each subschema xgrammar converts, depth first
    (children before their parent, so moving a parent's parts keeps the children's slots)."""
    if not isinstance(node, dict):
        return
    for key in _MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                sub_path = f"{path}/{key}/{escape_pointer_part(name)}"
                yield from _slots(sub, sub_path)
                if isinstance(sub, dict):
                    yield value, name, sub, sub_path
    for key in _SUBS:
        value = node.get(key)
        if isinstance(value, dict):
            yield from _slots(value, f"{path}/{key}")
            yield node, key, value, f"{path}/{key}"
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                yield from _slots(sub, f"{path}/{key}/{i}")
                if isinstance(sub, dict):
                    yield value, i, sub, f"{path}/{key}/{i}"


def _candidate(node: dict[str, Any], *, root: bool = False) -> tuple[list[str], bool] | None:
    """``(names, additional)`` when ``node`` can be served in any order, else ``None``.
    Without ``additionalProperties`` an object is closed, as xgrammar's strict mode reads it."""
    allowed = _ALLOWED | set(_ROOT_KEEP) if root else _ALLOWED
    if not set(node) <= allowed or node.get("type") not in ("object", ["object"]):
        return None
    properties = node.get("properties")
    if not isinstance(properties, dict) or not all(isinstance(v, (dict, bool)) for v in
                                                   properties.values()):
        return None
    extra = node.get("additionalProperties", False)
    if not isinstance(extra, (bool, dict)):
        return None
    additional = extra is not False
    names = list(properties)
    required = node.get("required", [])
    if not isinstance(required, list) or not all(r in properties for r in required):
        return None
    if any(v is False for v in properties.values()):
        return None
    if len(names) + additional < 2:
        return None
    return names, additional


@dataclass(frozen=True)
class MarkedSchema:
    """:func:`mark_any_order`'s result: the schema to convert and the objects to splice."""

    schema: Any
    objects: tuple[AnyOrderObject, ...]


def mark_any_order(schema: Any) -> MarkedSchema:
    """A copy of ``schema`` with each object that can be served in any order moved into
    ``$defs`` (see the module docstring), and those objects; ``schema`` itself when none can.

    >>> marked = mark_any_order({"type": "object", "properties": {"a": {"type": "integer"},
    ...                          "b": {"type": "string"}}, "additionalProperties": False})
    >>> marked.schema["$ref"], sorted(marked.schema["$defs"])
    ('#/$defs/specserveanyordera', ['specserveanyordera', 'specserveanyorderaVa', \
'specserveanyorderaVb'])
    >>> marked.objects[0].names, marked.objects[0].value_rules
    (('a', 'b'), ('defs_specserveanyorderaVa', 'defs_specserveanyorderaVb'))
    """
    if not isinstance(schema, dict) or (schema.get("$defs") is not None
                                        and not isinstance(schema.get("$defs"), dict)):
        return MarkedSchema(schema, ())
    if "unevaluatedProperties" in json.dumps(schema):
        return MarkedSchema(schema, ())
    refs = [node["$ref"] for node, _ in schema_nodes(schema) if isinstance(node.get("$ref"), str)]
    targets = [r.split("#", 1)[1] for r in refs if "#" in r]
    out = copy.deepcopy(schema)
    defs: dict[str, Any] = {}
    objects: list[AnyOrderObject] = []
    states = 0

    def take(node: dict[str, Any], path: str) -> dict[str, Any] | None:
        nonlocal states
        found = _candidate(node, root=not path)
        if found is None:
            return None
        ordered = len(found[0]) > MAX_PROPERTIES or states + (1 << len(found[0])) > MAX_STATES
        if ordered and not found[1]:
            return None  # closed: xgrammar's declared order is that grammar already
        cost = len(found[0]) + 1 if ordered else 1 << len(found[0])
        if states + cost > MAX_STATES:
            return None
        moved = (f"{path}/properties/", f"{path}/additionalProperties")
        if any(t.startswith(moved) for t in targets):
            return None  # a reference into the parts it moves would lose its target
        names, additional = found
        mark = MARK + _letters(len(objects))
        properties = node["properties"]
        value_rules = []
        for i, name in enumerate(names):
            value_def = f"{mark}V{_letters(i)}"
            defs[value_def] = properties[name] if properties[name] is not True else {}
            value_rules.append(f"defs_{value_def}")
        hoisted: dict[str, Any] = {
            "type": "object",
            "properties": {name: {"$ref": f"#/$defs/{mark}V{_letters(i)}"}
                           for i, name in enumerate(names)},
            "additionalProperties": False,
        }
        if additional:
            extra = node.get("additionalProperties", True)
            defs[f"{mark}X"] = extra if isinstance(extra, dict) else {}
            hoisted["additionalProperties"] = {"$ref": f"#/$defs/{mark}X"}
        if node.get("required"):
            hoisted["required"] = list(node["required"])
        defs[mark] = hoisted
        states += cost
        required = frozenset(names.index(r) for r in node.get("required", []))
        objects.append(AnyOrderObject(f"defs_{mark}", tuple(names), tuple(value_rules),
                                      required, additional, ordered))
        return {"$ref": f"#/$defs/{mark}"}

    for container, key, node, path in list(_slots(out, "")):
        stub = take(node, path)
        if stub is not None:
            container[key] = stub
    root_stub = take(out, "")
    if not objects:
        return MarkedSchema(schema, ())
    if root_stub is not None:
        out = {**{k: out[k] for k in _ROOT_KEEP if k in out}, **root_stub}
    out.setdefault("$defs", {}).update(defs)
    return MarkedSchema(out, tuple(objects))


_RULE_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-.]*) ::= ")


def splice_any_order(ebnf: str, objects: tuple[AnyOrderObject, ...],
                     style: SeparatorStyle) -> str:
    """``ebnf`` (xgrammar's grammar of a :func:`mark_any_order` schema) with each object's rule
    replaced by :func:`any_order_rules`. An object whose rules are not all there keeps
    xgrammar's rule (declared order): xgrammar does not convert every subschema (an unreferenced
    definition, say), and a value it wrote inline has no rule to reference."""
    lines = ebnf.split("\n")
    index = {m.group(1): i for i, line in enumerate(lines) if (m := _RULE_NAME.match(line))}
    added: list[str] = []
    for obj in objects:
        needed = [obj.rule, *obj.value_rules]
        if obj.additional:
            needed += [f"{obj.rule}_addl_key", f"{obj.rule}_addl"]
        prefix = f"{obj.rule}_anyorder_"
        if any(name not in index for name in needed) or any(prefix in name for name in index):
            continue
        rules = (ordered_rules if obj.ordered else any_order_rules)(obj, style)
        lines[index[obj.rule]] = rules[0]
        added.extend(rules[1:])
    return "\n".join([*lines, *added])
