"""Local references xgrammar leaves unresolved (plain names, percent-encoded pointers): rewritten to
pointers, checked on the grammar; references that resolve to nothing: refused by the gateway."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support.grammar_accepts import accepts
from support.schema_precheck import precheck

from specserve.errors import APIError
from specserve.structured.schema_refs import canonical_refs, dangling_refs, named_subschemas


def _accepts(schema: dict[str, Any], text: str, *, rewritten: bool = True) -> bool:
    return accepts(schema, text, served=rewritten)


def _valid(schema: dict[str, Any], instance: Any) -> bool:
    from jsonschema import validators

    return bool(validators.validator_for(schema)(schema).is_valid(instance))


# Draft-04 style, as in published schemas: the definition names itself with "id": "#name".
DRAFT4 = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "definitions": {"priority": {"id": "#priority", "type": "integer", "minimum": 0}},
    "type": "object",
    "properties": {"rule": {"$ref": "#priority"}},
    "required": ["rule"],
    "additionalProperties": False,
}
ANCHOR = {
    "$defs": {"size": {"$anchor": "size", "enum": ["s", "m", "l"]}},
    "type": "array",
    "items": {"$ref": "#size"},
}
ENCODED = {
    "type": "object",
    "patternProperties": {"^[a-z]+$": {"type": "integer"}},
    "properties": {"n": {"$ref": "#/patternProperties/%5E%5Ba-z%5D%2B%24"}},
    "required": ["n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(("schema", "good", "bad", "pointer", "as_is"), [
    (DRAFT4, '{"rule":3}', '{"rule":-1}', "#/definitions/priority", "any value"),
    (ANCHOR, '["s","l"]', '["xl"]', "#/$defs/size", "any value"),
    (ENCODED, '{"n":7}', '{"n":"seven"}', "#/patternProperties/^[a-z]+$", "error"),
])
def test_unresolved_forms_are_rewritten_and_enforced(
    schema: dict[str, Any], good: str, bad: str, pointer: str, as_is: str
) -> None:
    out = canonical_refs(schema)
    refs = [n["$ref"] for n in (out.get("properties", {}).get("rule"), out.get("items"),
                                out.get("properties", {}).get("n")) if n]
    assert refs == [pointer]
    assert out is not schema and "$ref" in json.dumps(schema)  # the input is left as it was
    # xgrammar as is: a name becomes "any value" (the bad instance passes); an encoded pointer
    # is not found at all, and the schema cannot be served.
    if as_is == "any value":
        assert _accepts(schema, bad, rewritten=False)
    else:
        with pytest.raises(RuntimeError, match="Cannot find field"):
            _accepts(schema, bad, rewritten=False)
    # Served: the referenced subschema holds.
    assert _accepts(schema, good) and not _accepts(schema, bad)
    # And a validator agrees with the served grammar on both.
    assert _valid(schema, json.loads(good)) and not _valid(schema, json.loads(bad))
    assert _valid(out, json.loads(good)) and not _valid(out, json.loads(bad))


def test_names_are_rewritten_only_when_unambiguous() -> None:
    twice = {"$defs": {"a": {"$anchor": "x", "type": "string"}, "b": {"$anchor": "x", "type": "null"}},
             "items": {"$ref": "#x"}}
    assert canonical_refs(twice) is twice
    other_base = {"$defs": {"a": {"$id": "other.json", "$defs": {"b": {"$anchor": "x"}}}},
                  "items": {"$ref": "#x"}}
    assert named_subschemas(other_base) is None and canonical_refs(other_base) is other_base
    assert dangling_refs(other_base) == []  # resolved against another document: not judged
    # "id" inside data (enum, const, default, examples) is not an identifier.
    data = {"enum": [{"id": "http://elsewhere"}], "$defs": {"p": {"id": "#p"}}, "items": {"$ref": "#p"}}
    assert canonical_refs(data)["items"] == {"$ref": "#/$defs/p"}


def test_dangling_references_are_listed() -> None:
    schema = {"properties": {"a": {"$ref": "#/$defs/missing"}, "b": {"$ref": "#nowhere"},
                             "c": {"$ref": "#"}, "d": {"$ref": "https://example.com/s.json"}}}
    assert dangling_refs(schema) == [("/properties/a", "#/$defs/missing"), ("/properties/b", "#nowhere")]
    assert dangling_refs(DRAFT4) == [] and dangling_refs(ENCODED) == []


def _json_schema_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


def test_the_gateway_refuses_a_reference_to_nothing() -> None:
    bad = {"type": "object", "properties": {"a": {"$ref": "#/definitions/gone"}}}
    with pytest.raises(APIError) as refused:
        precheck(_json_schema_body(bad), "chat")
    err = refused.value
    assert err.status == 400 and err.code == "invalid_structured_output"
    assert "'/properties/a'" in err.message and "#/definitions/gone" in err.message
    precheck(_json_schema_body(DRAFT4), "chat")  # names that resolve pass
