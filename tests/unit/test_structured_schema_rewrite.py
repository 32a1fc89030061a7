"""Schema rewrites before xgrammar: same meaning, grammars closer to it."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specserve.engine import settings
from specserve.structured.schema_rewrite import rewrite_schema, rewrite_schema_text

DATA = Path(__file__).resolve().parents[1] / "data" / "jsonschemabench" / "maskbench"
COMPACT = {"any_whitespace": False, "separators": (",", ":")}


def _accepts(schema: dict[str, Any], text: str) -> bool:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    from specserve.structured.engine_grammar import json_schema_ebnf

    grammar = xgr.Grammar.from_ebnf(json_schema_ebnf(schema, **COMPACT))
    return bool(_is_grammar_accept_string(grammar, text))


@pytest.fixture()
def open_objects() -> Iterator[None]:
    """The open reading (JSON Schema's letter): objects open, whatever the environment."""
    with settings.override(json_mode="schema", json_objects="open"):
        yield


@pytest.fixture()
def strict_mode() -> Iterator[None]:
    with settings.override(json_mode="strict"):
        yield


@pytest.mark.usefixtures("open_objects")
def test_objects_without_additional_properties_are_opened() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = rewrite_schema(schema)
    assert out["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the input is not modified
    assert _accepts(schema, '{"a":1,"note":"x"}')
    assert not _accepts(schema, '{"a":1,"a":2}')  # a declared name is not "additional"
    assert not _accepts(schema, '{"a":"x"}')


@pytest.mark.usefixtures("strict_mode")
def test_objects_stay_closed_when_strict_but_required_names_are_declared() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}
    assert rewrite_schema(schema, open_objects=False) == {**schema, "properties": {
        "a": {"type": "integer"}, "b": {}}}
    # What the engine serves with SPECSERVE_JSON_MODE=strict: declared keys only.
    assert _accepts(schema, '{"a":1,"b":null}')
    assert not _accepts(schema, '{"a":1,"b":null,"note":"x"}')
    assert not _accepts(schema, '{"a":1}')


@pytest.mark.parametrize("extra", [False, {"type": "string"}])
def test_written_additional_properties_are_kept(extra: Any) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}},
              "additionalProperties": extra}
    assert rewrite_schema(schema) == schema


def test_required_names_missing_from_properties_are_declared() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"],
              "additionalProperties": {"type": "string"}}
    out = rewrite_schema(schema)
    assert out["properties"]["b"] == {"type": "string"}
    # Before: no output could hold "b", so none was valid. After: "b" is written.
    assert _accepts(schema, '{"a":1,"b":"x"}')
    assert not _accepts(schema, '{"a":1}')
    assert not _accepts(schema, '{"a":1,"b":2}')


def test_required_name_forbidden_by_closed_object_is_left_alone() -> None:
    schema = {"type": "object", "properties": {}, "required": ["b"], "additionalProperties": False}
    assert rewrite_schema(schema) == schema  # unsatisfiable, and stays so


def test_branches_of_a_constraining_parent_are_left_alone() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "additionalProperties": False,
        "anyOf": [{"type": "object", "properties": {"b": {}}}, {"$ref": "#/$defs/C"}],
        "$defs": {"C": {"type": "object", "properties": {"c": {}}, "required": ["d"]}},
    }
    out = rewrite_schema(schema)
    assert out["anyOf"] == schema["anyOf"]
    assert out["$defs"] == schema["$defs"]


def test_one_of_branches_stay_closed_but_declare_required_names() -> None:
    schema = {"type": "object", "oneOf": [
        {"type": "object", "required": ["id", "win"], "properties": {"id": {"type": "string"}}},
        {"type": "object", "required": ["id", "lose"], "properties": {"id": {"type": "string"}}},
    ]}
    out = rewrite_schema(schema)
    assert all("additionalProperties" not in branch for branch in out["oneOf"])
    assert out["oneOf"][0]["properties"]["win"] == {}
    assert _accepts(schema, '{"id":"g","win":1}')
    assert not _accepts(schema, '{"id":"g","win":1,"lose":2}')  # in both branches: not oneOf


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {}}, "unevaluatedProperties": False},
        {"allOf": [{"properties": {"a": {}}}], "unevaluatedProperties": False},
        {"type": "object", "patternProperties": {"^x$": {}}},
        {"type": "object", "properties": {"a": {}}, "$ref": "#/$defs/x", "$defs": {"x": {}}},
        {"type": "string", "enum": [{"type": "object"}]},
    ],
)
def test_unsafe_or_non_object_schemas_are_unchanged(schema: dict[str, Any]) -> None:
    assert rewrite_schema(schema) == schema


@pytest.mark.usefixtures("open_objects")
def test_nested_definitions_and_items_are_rewritten() -> None:
    schema = {
        "type": "array",
        "items": {"$ref": "#/definitions/p"},
        "definitions": {"p": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    out = rewrite_schema(schema)
    assert out["definitions"]["p"]["additionalProperties"] is True
    assert _accepts(schema, '[{"x":1,"y":[true]}]')


@pytest.mark.parametrize("where", ["inline", "defs"])
def test_arrays_without_items_allow_items_as_json_schema_says(where: str) -> None:
    """xgrammar's strict mode read a missing ``items`` as "no items": ``maxItems`` allowed only
    ``[]``, ``minItems`` did not convert, and a bare array allowed items only inline."""
    def schema(array: dict[str, Any]) -> dict[str, Any]:
        if where == "inline":
            return {"type": "object", "properties": {"p": array}, "required": ["p"]}
        return {"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}}, "required": ["p"],
                "$defs": {"a": array}}

    bounded = schema({"type": "array", "maxItems": 2})
    assert not _accepts(bounded, '{"p":[1,2,3]}')
    assert _accepts(bounded, '{"p":[1,"x"]}') and _accepts(bounded, '{"p":[]}')
    assert _accepts(schema({"type": "array", "minItems": 1}), '{"p":[true]}')
    assert not _accepts(schema({"type": "array", "minItems": 1}), '{"p":[]}')
    assert _accepts(schema({"type": "array", "description": "d"}), '{"p":[1,[2]]}')
    # prefixItems without items: more items are allowed (2020-12), the first one is checked.
    tuple_ = schema({"type": "array", "prefixItems": [{"type": "integer"}]})
    assert _accepts(tuple_, '{"p":[1,"x"]}') and not _accepts(tuple_, '{"p":["x"]}')


@pytest.mark.usefixtures("strict_mode")
def test_objects_that_declare_no_names_are_free_form_even_when_strict() -> None:
    """A closed object lists only the names it declares; one that declares none is free-form
    (xgrammar allowed only ``{}`` for it under ``$defs`` or beside any other keyword)."""
    for value in ({"type": "object", "description": "d"}, {"$ref": "#/$defs/o"}):
        schema = {"type": "object", "properties": {"p": value}, "required": ["p"],
                  "$defs": {"o": {"type": "object"}}}
        assert _accepts(schema, '{"p":{"k":[1]}}')
        assert not _accepts(schema, '{"p":{"k":[1]},"q":1}')  # the declaring object stays closed
    assert not _accepts({"type": "object", "properties": {}}, '{"k":1}')  # declares: no names
    # Untyped object keywords constrain only objects: other values still pass.
    untyped = {"type": "array", "items": {"required": [], "properties": {}}}
    assert _accepts(untyped, '["a",1,{}]')


def test_text_form_round_trips_and_passes_bad_text_through() -> None:
    assert json.loads(rewrite_schema_text('{"type": "object"}')) == {
        "type": "object", "additionalProperties": True}
    assert rewrite_schema_text("not json") == "not json"


@pytest.mark.parametrize("path", sorted(DATA.glob("*.json")), ids=lambda p: p.stem)
def test_rewrite_keeps_every_instance_verdict(path: Path) -> None:
    """The rewritten schema accepts exactly the instances the original accepts."""
    from jsonschema import validators

    doc = json.loads(path.read_text(encoding="utf-8"))
    schema = doc["schema"]
    original = copy.deepcopy(schema)
    rewritten = rewrite_schema(schema)
    assert schema == original
    before = validators.validator_for(schema)(schema)
    after = validators.validator_for(rewritten)(rewritten)
    for test in doc["tests"]:
        assert before.is_valid(test["data"]) == after.is_valid(test["data"]), test["description"]
