"""Objects served in any property order, with exact required-name and duplicate-name checks."""

from __future__ import annotations

import itertools
import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.grammar_accepts import COMPACT, accepts
from specserve.structured import any_order, engine_grammar
from specserve.structured.any_order import (
    MAX_PROPERTIES,
    AnyOrderObject,
    SeparatorStyle,
    mark_any_order,
    splice_any_order,
)

OBJ = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
    "required": ["b"],
}


def test_raw_xgrammar_refuses_another_order_and_the_served_grammar_accepts_it() -> None:
    reordered = '{"c":true,"b":"x","a":1}'
    assert not accepts(OBJ, reordered, served=False)
    assert accepts(OBJ, reordered, open_objects=False)
    assert accepts(OBJ, reordered, open_objects=True)


@pytest.mark.parametrize("open_objects", [False, True])
def test_required_duplicate_and_value_checks_stay_exact(open_objects: bool) -> None:
    assert accepts(OBJ, '{"b":"x"}', open_objects=open_objects)
    assert not accepts(OBJ, '{"a":1,"c":true}', open_objects=open_objects)  # b is required
    assert not accepts(OBJ, '{}', open_objects=open_objects)
    assert not accepts(OBJ, '{"b":"x","b":"y"}', open_objects=open_objects)  # duplicate
    assert not accepts(OBJ, '{"a":1,"b":"x","a":2}', open_objects=open_objects)
    assert not accepts(OBJ, '{"b":"x","a":"one"}', open_objects=open_objects)  # wrong type
    # An undeclared name, anywhere, only where objects are open; a declared name never passes
    # as an undeclared one (with another value's type).
    assert accepts(OBJ, '{"z":[1],"b":"x","a":1}', open_objects=open_objects) is open_objects
    assert accepts(OBJ, '{"b":"x","z":null,"c":false}', open_objects=open_objects) is open_objects
    assert not accepts(OBJ, '{"z":1,"b":"x","a":"one"}', open_objects=open_objects)


def test_whitespace_as_the_engine_serves_by_default() -> None:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    ebnf = engine_grammar.json_schema_ebnf(OBJ, open_objects=False, any_whitespace=True)
    grammar = xgr.Grammar.from_ebnf(ebnf)
    assert _is_grammar_accept_string(grammar, '{ "c" : true ,\n  "b": "x" }')
    assert not _is_grammar_accept_string(grammar, '{ "c" : true , "c": true }')


def test_names_that_need_escaping() -> None:
    schema = {"type": "object", "properties": {'q"uote': {"type": "integer"},
                                               "back\\slash": {"type": "integer"},
                                               "é": {"type": "integer"}},
              "additionalProperties": False}
    text = json.dumps({"é": 1, "back\\slash": 2, 'q"uote': 3}, ensure_ascii=False,
                      separators=(",", ":"))
    assert not accepts(schema, text, served=False)
    assert accepts(schema, text)
    assert not accepts(schema, text.replace('"é":1', '"e":1'))


def test_separator_styles_match_what_xgrammar_writes() -> None:
    """Fails if xgrammar changes how it separates object members (the splice writes the same)."""
    import xgrammar as xgr

    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"},
                                                          "b": {"type": "integer"}},
                         "required": ["a", "b"], "additionalProperties": False})
    for options in ({"any_whitespace": True}, {"any_whitespace": False},
                    {"any_whitespace": False, "separators": (",", ":")}):
        rules = dict(line.split(" ::= ", 1)
                     for line in str(xgr.Grammar.from_json_schema(schema, **options)).split("\n")
                     if " ::= " in line)
        style = SeparatorStyle.of(options)
        assert rules["root"] == (f'(({style.open} "\\"a\\"" {style.colon} basic_integer '
                                 f'root_part_0 {style.close}))'), options
        assert rules["root_part_0"] == f'(({style.comma} "\\"b\\"" {style.colon} basic_integer))'


def test_marks_only_what_the_grammar_can_serve_exactly() -> None:
    def names(schema: dict[str, Any]) -> list[tuple[str, ...]]:
        return [o.names for o in mark_any_order(schema).objects]

    small = {"type": "object", "properties": {"x": {}, "y": {}}, "additionalProperties": False}
    assert names(small) == [("x", "y")]
    big = {**small, "properties": {f"p{i}": {} for i in range(MAX_PROPERTIES + 1)}}
    assert names(big) == []
    assert names({**small, "minProperties": 1}) == []  # a keyword the splice does not express
    assert names({**small, "properties": {"x": {}}}) == []  # one name, closed: no order
    assert names({**small, "properties": {"x": {}}, "additionalProperties": True}) == [("x",)]
    # A reference into a property's schema would lose its target if the object moved.
    pointed = {"type": "object", "properties": {"x": {"type": "object", "properties": {
        "u": {"type": "integer"}, "v": {"type": "integer"}}, "additionalProperties": False},
        "y": {"$ref": "#/properties/x/properties/u"}}, "additionalProperties": False}
    assert names(pointed) == []
    # A reference to the object itself is kept: it now reaches the marked object.
    shared = {"$defs": {"p": small}, "type": "object", "additionalProperties": False,
              "properties": {"m": {"$ref": "#/$defs/p"}, "n": {"$ref": "#/$defs/p"}}}
    assert sorted(names(shared)) == [("m", "n"), ("x", "y")]
    assert accepts(shared, '{"n":{"y":1,"x":2},"m":{"x":3,"y":4}}')
    assert not accepts(shared, '{"n":{"y":1,"y":2},"m":{"x":3}}')


def test_splice_keeps_declared_order_where_a_rule_it_needs_is_missing() -> None:
    obj = AnyOrderObject("o", ("a", "b"), ("va", "vb"), frozenset(), False)
    style = SeparatorStyle.of(COMPACT)
    ebnf = 'root ::= ((o))\no ::= (("{" "}"))\nva ::= (("1"))'
    assert splice_any_order(ebnf, (obj,), style) == ebnf
    spliced = splice_any_order(ebnf + '\nvb ::= (("2"))', (obj,), style)
    assert "o_anyorder_ab ::= " in spliced and 'o ::= (("{" "}"))' not in spliced


_names = st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True)


@st.composite
def _objects_and_instances(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    declared = draw(_names)
    required = draw(st.lists(st.sampled_from(declared), unique=True))
    extra = draw(st.sampled_from([False, True, {"type": "integer"}]))
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in declared},
              "required": required, "additionalProperties": extra}
    keys = draw(st.lists(st.sampled_from([*declared, "y", "z"]), max_size=5))
    # Repeated undeclared names are out of any grammar's reach (as in xgrammar's own objects).
    return schema, [k for i, k in enumerate(keys) if k in declared or k not in keys[:i]]


@settings(max_examples=60, deadline=None)
@given(_objects_and_instances())
def test_served_grammar_agrees_with_a_validator(case: tuple[dict[str, Any], list[str]]) -> None:
    """Any order, required names, duplicates and undeclared names: the grammar accepts exactly
    the key sequences a validator accepts (duplicates are refused as strict JSON)."""
    schema, keys = case
    text = "{" + ",".join(f'"{k}":{i}' for i, k in enumerate(keys)) + "}"
    valid = len(set(keys)) == len(keys) and jsonschema.Draft202012Validator(schema).is_valid(
        json.loads(text))
    assert accepts(schema, text) is valid, (schema, text)


def test_every_order_of_eight_names_and_the_budget() -> None:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    schema = {"type": "object", "additionalProperties": False, "required": ["a", "h"],
              "properties": {n: {"type": "integer"} for n in "abcdefgh"}}
    assert len(mark_any_order(schema).objects) == 1
    grammar = xgr.Grammar.from_ebnf(engine_grammar.json_schema_ebnf(schema, **COMPACT))
    for order in itertools.islice(itertools.permutations("abcdefgh"), 0, 40320, 997):
        assert _is_grammar_accept_string(grammar, "{" + ",".join(f'"{k}":1' for k in order) + "}")
    assert not _is_grammar_accept_string(grammar, '{"h":1,"b":1}')
    # Five such objects exceed the budget of subset rules: four are served in any order.
    many = {"type": "array", "prefixItems": [schema] * 5, "items": False}
    assert len(mark_any_order(many).objects) == any_order.MAX_STATES // 2**8 == 4


def test_many_objects_keep_their_own_values() -> None:
    """Sixty marked objects: each keeps its own value and undeclared-value rules (the marker
    names of one object never equal another's)."""
    items = [{"type": "object", "properties": {"k": {"const": i}},
              "additionalProperties": {"type": "string"} if i % 2 else {"type": "integer"}}
             for i in range(60)]
    schema = {"type": "array", "prefixItems": items, "items": False}
    assert len(mark_any_order(schema).objects) == 60
    good = [{"z": "s" if i % 2 else 1, "k": i} for i in range(60)]
    assert accepts(schema, json.dumps(good, separators=(",", ":")))
    for i in (1, 26, 49):
        bad = [dict(d) for d in good]
        bad[i]["z"] = 1 if i % 2 else "s"
        assert not accepts(schema, json.dumps(bad, separators=(",", ":")))
        bad[i] = {"k": i + 1}
        assert not accepts(schema, json.dumps(bad, separators=(",", ":")))


@settings(max_examples=60, deadline=None)
@given(_objects_and_instances())
def test_large_open_objects_take_undeclared_names_anywhere(
        case: tuple[dict[str, Any], list[str]]) -> None:
    """Past :data:`MAX_PROPERTIES` (here 0) an open object keeps the declared order of its
    declared names, and its undeclared names may come anywhere (xgrammar: only at the end)."""
    schema, keys = case
    text = "{" + ",".join(f'"{k}":{i}' for i, k in enumerate(keys)) + "}"
    declared = [k for k in keys if k in schema["properties"]]
    order = list(schema["properties"])
    valid = (len(set(keys)) == len(keys) and declared == sorted(declared, key=order.index)
             and jsonschema.Draft202012Validator(schema).is_valid(json.loads(text)))
    saved = any_order.MAX_PROPERTIES
    any_order.MAX_PROPERTIES = 0
    try:
        marked = mark_any_order(schema).objects
        assert [o.ordered for o in marked] == ([True] if schema["additionalProperties"] else [])
        assert accepts(schema, text) is valid, (schema, text)
    finally:
        any_order.MAX_PROPERTIES = saved


def test_undeclared_names_before_declared_ones_in_a_large_object() -> None:
    names = [f"p{i:02d}" for i in range(MAX_PROPERTIES + 4)]
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in names},
              "required": [names[3]]}
    text = '{"zz":true,"p01":1,"note":"x","p03":2,"p07":3,"more":[]}'
    assert not accepts(schema, text, served=False)  # xgrammar: undeclared names only at the end
    assert accepts(schema, text, open_objects=True)
    assert not accepts(schema, text)  # the default reading: declared names only
    assert not accepts(schema, '{"zz":true,"p01":1,"p07":3}', open_objects=True)  # p03 is required
    assert not accepts(schema, '{"p03":1,"p01":2}', open_objects=True)  # declared order past the limit
    assert not accepts(schema, '{"p03":1,"zz":1,"p03":2}', open_objects=True)
