"""Schema normalisation: combinators merged with their parent, untyped constraints typed.

Each case is checked three ways: the normalised schema, its verdicts under a JSON Schema
validator (unchanged), and the grammar xgrammar builds from it (now enforcing the parent).
"""

from __future__ import annotations

import json

import copy
import logging
from typing import Any

import pytest
from support.grammar_accepts import COMPACT, accepts

from specserve.structured import engine_grammar
from specserve.structured.schema_merge import MAX_OPERATIONS, merge, normalize_schema


def _accepts(schema: dict[str, Any], text: str, *, rewritten: bool = True) -> bool:
    return accepts(schema, text, served=rewritten)


def _same_verdicts(schema: dict[str, Any], instances: list[Any]) -> None:
    from jsonschema import validators

    out = normalize_schema(schema)
    before = validators.validator_for(schema)(schema)
    after = validators.validator_for(out)(out)
    for instance in instances:
        assert before.is_valid(instance) == after.is_valid(instance), instance


ANY_OF_REQUIRED = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
    "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
}


def test_parent_properties_reach_each_branch() -> None:
    out = normalize_schema(ANY_OF_REQUIRED)
    assert set(out) == {"anyOf"}
    assert [b["required"] for b in out["anyOf"]] == [["a"], ["b"]]
    assert all(b["type"] == "object" and set(b["properties"]) == {"a", "b"} for b in out["anyOf"])
    # xgrammar as is drops the parent: any JSON value passes.
    assert _accepts(ANY_OF_REQUIRED, '"x"', rewritten=False)
    assert _accepts(ANY_OF_REQUIRED, '{"a":"not an integer"}', rewritten=False)
    # Rewritten, the parent holds and one of the names is required.
    for good in ('{"a":1}', '{"b":"x"}', '{"a":1,"b":"x"}'):
        assert _accepts(ANY_OF_REQUIRED, good), good
    for bad in ('"x"', "[]", "{}", '{"a":"not an integer"}'):
        assert not _accepts(ANY_OF_REQUIRED, bad), bad
    _same_verdicts(ANY_OF_REQUIRED, ["x", [], {}, {"a": 1}, {"b": "x"}, {"a": "s"}, {"c": 1}])


def test_all_of_with_a_referenced_base_is_flattened() -> None:
    schema = {
        "$defs": {"base": {"type": "object", "properties": {"id": {"type": "integer"}},
                           "required": ["id"]}},
        "allOf": [{"$ref": "#/$defs/base"},
                  {"properties": {"name": {"type": "string", "minLength": 1}},
                   "required": ["name"]}],
    }
    out = normalize_schema(schema)
    assert "allOf" not in out and out["$defs"] == schema["$defs"]
    assert out["required"] == ["id", "name"]
    assert _accepts(schema, '{"id":1,"name":"n"}')
    assert not _accepts(schema, '{"id":1}')
    assert not _accepts(schema, '{"id":"1","name":"n"}')
    _same_verdicts(schema, [{"id": 1, "name": "n"}, {"id": 1}, {"name": "n"}, 3, {"id": 1, "name": ""}])


def test_discriminated_branches_merge_with_the_parents_property() -> None:
    schema = {
        "type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"],
        "oneOf": [{"properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}},
                  {"properties": {"kind": {"const": "square"}, "side": {"type": "number"}}},
                  {"type": "array"}],  # contradicts the parent's type: never valid, dropped
    }
    out = normalize_schema(schema)
    assert len(out["oneOf"]) == 2
    assert out["oneOf"][0]["properties"]["kind"] == {"const": "circle", "type": "string"}
    assert _accepts(schema, '{"kind":"circle","r":1}')
    assert not _accepts(schema, '{"kind":"triangle"}')
    _same_verdicts(schema, [{"kind": "circle", "r": 1}, {"kind": "square"}, {"kind": "x"}, [], {}])


def test_untyped_constraints_apply_to_their_type_only() -> None:
    schema = {"type": "array", "items": {"minLength": 2}}
    out = normalize_schema(schema)
    assert out["items"]["anyOf"][0] == {"type": "string", "minLength": 2}
    assert out["items"]["anyOf"][1] == {"type": ["number", "boolean", "null", "array", "object"]}
    assert _accepts(schema, '["abc",5,null,{"k":[]}]')
    assert not _accepts(schema, '["a"]')
    assert _accepts(schema, '["a"]', rewritten=False)  # xgrammar as is: any value
    _same_verdicts(schema, [["abc", 5, None], ["a"], ["xyz"], [{"k": 1}]])
    required = {"type": "array", "items": {"required": ["id"]}}
    assert _accepts(required, '[{"id":1},"s"]')
    assert not _accepts(required, '[{}]')


@pytest.mark.parametrize(
    "schema",
    [
        # A closed parent forbids the branch's own property: not one object schema.
        {"type": "object", "properties": {"a": {}}, "additionalProperties": False,
         "anyOf": [{"properties": {"b": {}}}]},
        # Conflicting values of one keyword.
        {"allOf": [{"pattern": "^a"}, {"pattern": "b$"}]},
        # A $ref next to other keywords means different things in different drafts.
        {"properties": {"a": {}}, "anyOf": [{"$ref": "#/$defs/x", "required": ["a"]}],
         "$defs": {"x": {}}},
        # Keywords the merge does not reason about.
        {"type": "object", "not": {"required": ["a"]}, "anyOf": [{"required": ["b"]}]},
        # Properties, items: xgrammar already types these.
        {"properties": {"a": {"type": "integer"}}},
    ],
)
def test_merges_not_known_to_be_exact_are_left_alone(schema: dict[str, Any]) -> None:
    original = copy.deepcopy(schema)
    out = normalize_schema(schema)
    assert schema == original
    assert out.keys() == original.keys()  # the node keeps its keywords and its branches
    for key in ("anyOf", "allOf"):
        assert len(out.get(key, [])) == len(original.get(key, []))
    _same_verdicts(original, [{}, {"a": 1}, {"b": 1}, "ab", "a", "b", 1])


def test_calendar_dates_are_exact() -> None:
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                               "t": {"format": "date-time"}}}
    assert _accepts(schema, '{"d":"2023-02-29"}', rewritten=False)  # xgrammar's own rule
    assert _accepts(schema, '{"d":"2024-02-29","t":"2024-04-30T23:59:60Z"}')
    for bad in ('{"d":"2023-02-29"}', '{"d":"2022-04-31"}', '{"t":"2021-02-29T00:00:00Z"}'):
        assert not _accepts(schema, bad), bad
    bounded = {"type": "string", "format": "date", "maxLength": 10}
    assert normalize_schema(bounded) == bounded  # a pattern would silence the bound in xgrammar


def test_length_bounds_fold_into_a_repeated_class_pattern() -> None:
    digest = {"type": "string", "pattern": "^[0-9a-f]*$", "minLength": 32, "maxLength": 32}
    assert normalize_schema(digest) == {"type": "string", "pattern": "^[0-9a-f]{32,32}$"}
    ok, short = '"' + "a" * 32 + '"', '"' + "a" * 31 + '"'
    assert _accepts(digest, short, rewritten=False)  # xgrammar drops bounds next to a pattern
    assert _accepts(digest, ok) and not _accepts(digest, short)
    _same_verdicts(digest, ["a" * 32, "a" * 31, "g" * 32, ""])
    other = {"type": "string", "pattern": "^(ab)*$", "minLength": 2}
    assert normalize_schema(other) == other  # not one character class: left alone


def test_patterns_match_anywhere_as_in_json_schema() -> None:
    schema = {"type": "object", "properties": {"path": {"type": "string", "pattern": "/$"}},
              "patternProperties": {"\\w+": {"type": "integer"}}, "additionalProperties": False}
    assert not _accepts(schema, '{"path":"src/"}', rewritten=False)  # xgrammar: whole string
    assert _accepts(schema, '{"path":"src/","web-service":1}')
    assert not _accepts(schema, '{"path":"src"}')
    assert not _accepts(schema, '{"-":1}')  # no word character: not a pattern property
    _same_verdicts(schema, [{"path": "src/"}, {"path": "src"}, {"web-service": 1}, {"-": 1}])


def test_a_negated_type_becomes_the_other_types() -> None:
    schema = {"type": "object", "required": ["foo"], "properties": {"foo": {"not": {"type": "number"}}}}
    assert normalize_schema(schema)["properties"]["foo"] == {
        "type": ["array", "boolean", "null", "object", "string"]}
    assert _accepts(schema, '{"foo":0}', rewritten=False)  # xgrammar ignores "not"
    assert _accepts(schema, '{"foo":"bar"}') and not _accepts(schema, '{"foo":0}')
    _same_verdicts(schema, [{"foo": "bar"}, {"foo": 0}, {"foo": 1.5}, {"foo": None}])
    assert normalize_schema({"type": ["integer", "string"], "not": {"type": "string"}}) == {
        "type": "integer"}


def test_merge_bounds_and_types() -> None:
    assert merge({"type": ["integer", "null"], "maximum": 9}, {"type": "number", "maximum": 5}) == {
        "type": "integer", "maximum": 5}
    assert merge({"required": ["a"]}, {"required": ["b", "a"]}) == {"required": ["a", "b"]}


def test_recursive_schemas_stop_within_the_budget() -> None:
    schema = {"allOf": [{"$ref": "#"}], "type": "object"}  # refers to itself for ever
    assert normalize_schema(schema) == schema
    wide = {"allOf": [{"minimum": i} for i in range(MAX_OPERATIONS + 1)]}
    assert normalize_schema(wide) is wide  # over budget: kept as written


def test_a_rewrite_that_does_not_convert_falls_back_to_the_schema_as_written(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engine_grammar, "rewrite_schema_text",
                        lambda schema, **_: '{"type": "no such type"}')
    with caplog.at_level(logging.WARNING, logger=engine_grammar.__name__):
        ebnf = engine_grammar.json_schema_ebnf({"type": "boolean"}, **COMPACT)
    assert "root ::= ((basic_boolean))" in ebnf
    assert "using it as written" in caplog.text


PATTERN_AND_FORMAT = {"type": "string", "format": "uri", "pattern": "^(https|file)://"}


def test_a_pattern_next_to_a_format_is_enforced() -> None:
    assert normalize_schema(PATTERN_AND_FORMAT) == {"type": "string", "pattern": "^(https|file)://.*"}
    # xgrammar as is keeps the format and drops the pattern: an ftp URI passes.
    assert _accepts(PATTERN_AND_FORMAT, '"ftp://example.com"', rewritten=False)
    assert not _accepts(PATTERN_AND_FORMAT, '"ftp://example.com"')
    assert _accepts(PATTERN_AND_FORMAT, '"https://example.com/a"')
    _same_verdicts(PATTERN_AND_FORMAT, ["ftp://example.com", "https://example.com", "file:///tmp", 3])


DRAFT7 = "http://json-schema.org/draft-07/schema#"
DEPENDENCIES = {
    "$schema": DRAFT7,
    "type": "object",
    "properties": {"card": {"type": "string"}, "billing": {"type": "string"}, "note": {"type": "string"}},
    "dependencies": {"card": ["billing"]},
    "additionalProperties": False,
}
DEPENDENT_SCHEMAS = {
    "type": "object",
    "properties": {"kind": {"type": "string"}, "size": {"type": "integer"}},
    "dependentSchemas": {"kind": {"required": ["size"], "properties": {"size": {"minimum": 1}}}},
}


def _closed_accepts(schema: dict[str, Any], text: str, *, rewritten: bool = True) -> bool:
    """As served with closed objects (the shipped default)."""
    return accepts(schema, text, served=rewritten, open_objects=False)


def test_dependencies_of_a_closed_object_are_enforced() -> None:
    out = normalize_schema(DEPENDENCIES)
    assert [sorted(b["properties"]) for b in out["anyOf"]] == [["billing", "note"], ["billing", "card", "note"]]
    assert out["anyOf"][1]["required"] == ["card", "billing"]
    # xgrammar as is ignores "dependencies": a card without billing passes.
    assert _accepts(DEPENDENCIES, '{"card":"4111"}', rewritten=False)
    assert not _accepts(DEPENDENCIES, '{"card":"4111"}')
    for good in ('{}', '{"billing":"x"}', '{"card":"4111","billing":"x"}', '{"card":"4111","billing":"x","note":"n"}'):
        assert _accepts(DEPENDENCIES, good), good
    _same_verdicts(DEPENDENCIES, [{}, {"card": "1"}, {"card": "1", "billing": "b"}, {"billing": "b"},
                                  {"note": "n", "card": "1"}, {"other": 1}])


def test_dependent_schemas_hold_where_objects_are_served_closed() -> None:
    assert _closed_accepts(DEPENDENT_SCHEMAS, '{"kind":"a"}', rewritten=False)
    assert _closed_accepts(DEPENDENT_SCHEMAS, '{"kind":"a","size":0}', rewritten=False)
    assert not _closed_accepts(DEPENDENT_SCHEMAS, '{"kind":"a"}')
    assert not _closed_accepts(DEPENDENT_SCHEMAS, '{"kind":"a","size":0}')
    for good in ('{}', '{"size":0}', '{"kind":"a","size":1}'):
        assert _closed_accepts(DEPENDENT_SCHEMAS, good), good
    # Open objects cannot be told to lack "kind": left as written.
    assert normalize_schema(DEPENDENT_SCHEMAS) == DEPENDENT_SCHEMAS
    assert normalize_schema(DEPENDENT_SCHEMAS, closed_objects=True) != DEPENDENT_SCHEMAS


def test_contradictory_dependency_sets_are_pruned() -> None:
    # Each requires the other: only "neither" and "both" can match.
    both = {"$schema": DRAFT7, "type": "object", "properties": {"a": {}, "b": {}},
            "dependencies": {"a": ["b"], "b": ["a"]}, "additionalProperties": False}
    out = normalize_schema(both)
    assert [b.get("required") for b in out["anyOf"]] == [None, ["a", "b"]]
    _same_verdicts(both, [{}, {"a": 1}, {"b": 1}, {"a": 1, "b": 2}])


def test_dependency_keywords_follow_the_draft() -> None:
    # Without "$schema" (read as the latest draft) "dependencies" is no keyword: left alone.
    latest = {k: v for k, v in DEPENDENCIES.items() if k != "$schema"}
    assert normalize_schema(latest) == latest
    _same_verdicts(latest, [{"card": "1"}, {}])
    # And in draft 7, "dependentRequired" is no keyword.
    old = {"$schema": DRAFT7, "type": "object", "properties": {"a": {}, "b": {}},
           "dependentRequired": {"a": ["b"]}, "additionalProperties": False}
    assert normalize_schema(old) == old
    new = {**{k: v for k, v in old.items() if k != "$schema"}}
    assert "anyOf" in normalize_schema(new)
    _same_verdicts(new, [{"a": 1}, {"a": 1, "b": 1}, {}])


EXACTLY_ONE = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "ssn": {"type": "string"}, "ein": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
    "oneOf": [{"required": ["ssn"]}, {"required": ["ein"]}],
}


def test_exactly_one_of_several_names(monkeypatch: pytest.MonkeyPatch) -> None:
    out = normalize_schema(EXACTLY_ONE)
    assert [(sorted(b["properties"]), b["required"]) for b in out["anyOf"]] == [
        (["ein", "name"], ["name", "ein"]), (["name", "ssn"], ["name", "ssn"])]
    both = '{"name":"x","ssn":"1","ein":"2"}'
    assert not _accepts(EXACTLY_ONE, both)
    # Without this step the parent is distributed into the branches, and xgrammar reads the oneOf
    # as anyOf: both names pass.
    from specserve.structured import schema_merge

    monkeypatch.setattr(schema_merge._Normalizer, "_exclusive_names", lambda self, node: False)
    assert _accepts(EXACTLY_ONE, both)
    monkeypatch.undo()
    assert not _accepts(EXACTLY_ONE, '{"name":"x"}')
    for good in ('{"name":"x","ssn":"1"}', '{"name":"x","ein":"2"}'):
        assert _accepts(EXACTLY_ONE, good), good
    _same_verdicts(EXACTLY_ONE, [{"name": "x"}, {"name": "x", "ssn": "1"}, {"name": "x", "ein": "1"},
                                 {"name": "x", "ssn": "1", "ein": "2"}, {"ssn": "1"}])
    # Open objects (no "additionalProperties": false) cannot be told to lack a name.
    open_one = {k: v for k, v in EXACTLY_ONE.items() if k != "additionalProperties"}
    assert "oneOf" in normalize_schema(open_one)


AREA = {
    "type": "object",
    "properties": {"length": {"type": "number"}, "radius": {"type": "number"},
                   "width": {"type": "number"}},
    "oneOf": [{"required": ["length", "width"]}, {"required": ["radius"]}],
    "additionalProperties": False,
}


def test_exactly_one_of_several_sets_of_names(monkeypatch: pytest.MonkeyPatch) -> None:
    all_three = '{"length":1,"radius":2,"width":3}'  # meets both branches: not oneOf
    assert not _accepts(AREA, all_three)
    for good in ('{"width":3,"length":1}', '{"radius":2}', '{"length":1,"radius":2}'):
        assert _accepts(AREA, good), good
    assert not _accepts(AREA, '{"length":1}') and not _accepts(AREA, "{}")
    _same_verdicts(AREA, [json.loads(all_three), {"length": 1, "width": 3}, {"radius": 2},
                          {"length": 1, "radius": 2}, {"length": 1}, {}])
    from specserve.structured import schema_merge

    monkeypatch.setattr(schema_merge._Normalizer, "_exclusive_names", lambda self, node: False)
    assert _accepts(AREA, all_three)  # xgrammar reads the oneOf as anyOf


IMPOSSIBLE = {
    "type": "object",
    "properties": {"builtin": {"type": "object", "enum": ["MODIFIABLE", "IMMUTABLE"], "readonly": True},
                   "name": {"type": "string"}},
    "additionalProperties": False,
}


def test_a_property_no_value_can_meet_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(normalize_schema(IMPOSSIBLE)["properties"]) == ["name"]
    bad = '{"builtin":"MODIFIABLE","name":"x"}'
    assert not _accepts(IMPOSSIBLE, bad)
    assert _accepts(IMPOSSIBLE, '{"name":"x"}') and _accepts(IMPOSSIBLE, "{}")
    _same_verdicts(IMPOSSIBLE, [{"builtin": "MODIFIABLE"}, {"builtin": {}}, {"name": "x"}, {}])
    # xgrammar keeps the enum and drops the type: without this step the string passed.
    from specserve.structured import schema_merge

    monkeypatch.setattr(schema_merge._Normalizer, "_drop_impossible_properties", lambda self, node: False)
    assert _accepts(IMPOSSIBLE, bad)
    monkeypatch.undo()
    # A required one makes the object impossible: left as written, like open objects.
    required = {**IMPOSSIBLE, "required": ["builtin"]}
    assert normalize_schema(required)["properties"].keys() == {"builtin", "name"}
    opened = {k: v for k, v in IMPOSSIBLE.items() if k != "additionalProperties"}
    assert normalize_schema(opened)["properties"].keys() == {"builtin", "name"}
