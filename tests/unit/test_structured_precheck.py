"""Gateway pre-checks of structured-output constraints (xgrammar compile, limits, 400s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from specserve.errors import APIError
from specserve.structured import SchemaLimits, normalize_legacy, precheck
from specserve.structured.compile import GrammarChecker
from specserve.structured.schema_limits import regex_cost

DATA = Path(__file__).resolve().parents[1] / "data" / "jsonschemabench"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _rf(schema: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    }


def _refused(body: dict[str, Any], route: str = "chat", **kw: Any) -> APIError:
    with pytest.raises(APIError) as info:
        precheck(body, route, **kw)
    assert info.value.status == 400
    assert info.value.body()["error"]["type"] == "invalid_request_error"
    return info.value


def test_valid_schema_and_formats_pass() -> None:
    precheck(_rf(PERSON), "chat")
    precheck({"prompt": "x", "response_format": {"type": "json_object"}}, "completions")
    precheck({"response_format": {"type": "text"}}, "chat")
    precheck({"structured_outputs": {"regex": r"\d{3}-[a-z]+"}}, "completions")
    precheck({"structured_outputs": {"choice": ["yes", "no"]}}, "chat")
    precheck({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, "chat")
    precheck({"structured_outputs": {"json": json.dumps(PERSON)}}, "chat")
    precheck({"guided_json": PERSON}, "chat")
    precheck({}, "chat")


# Test schemas that use features vLLM's xgrammar backend refuses, and the keyword named.
REFUSED = {
    "Github_medium---o55680.json": "#/properties/created/format",
    "Handwritten---oneofpr2.json": "#/oneOf/0/allOf",
    "Handwritten---test.NoType.json": "#/allOf",
    "Synthesized---draft2019_09_nonvalid_boolean_schema_id7_subschema1_not_2.json": "#/allOf",
    "Synthesized---draft2019_09_valid_patternProperties_id13_subschema1_not_2.json": "#/allOf",
}


def test_dataset_schemas() -> None:
    files = sorted((DATA / "maskbench").glob("*.json"))
    assert len(files) >= 20
    for f in files:
        body = _rf(json.loads(f.read_text())["schema"])
        if f.name in REFUSED:
            assert REFUSED[f.name] in _refused(body).message
        else:
            precheck(body, "chat")


def test_invalid_type_names_param_and_path() -> None:
    bad = {"type": "object", "properties": {"age": {"type": "int"}}}
    err = _refused(_rf(bad))
    assert err.param == "response_format.json_schema.schema"
    assert "#/properties/age/type" in err.message
    err = _refused({"structured_outputs": {"json": bad}}, "completions")
    assert err.param == "structured_outputs.json"
    err = _refused({"guided_json": bad})
    assert err.param == "guided_json"


def test_unsupported_keyword_is_named() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}
    err = _refused(_rf(schema))
    assert "#/properties/n/multipleOf" in err.message


def test_property_named_type_is_not_mistaken_for_a_keyword() -> None:
    schema = {"type": "object", "properties": {"type": {"type": "string"}}}
    precheck(_rf(schema), "chat")


def test_unresolvable_ref_refused_naming_its_place() -> None:
    err = _refused(_rf({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}))
    assert "'/properties/a'" in err.message and "does not resolve" in err.message
    # A plain name that nothing carries: xgrammar would only warn and allow any value there.
    err = _refused(_rf({"type": "object", "properties": {"a": {"$ref": "#missing"}}}))
    assert "'/properties/a'" in err.message and "'#missing'" in err.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_malformed_requests_name_their_param(body: dict[str, Any], param: str) -> None:
    assert _refused(body).param == param


def test_huge_schema_refused() -> None:
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(4000)},
    }
    err = _refused(_rf(schema))
    assert "too large" in err.message


def test_deep_schema_refused() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(500):
        schema = {"type": "array", "items": schema}
    err = _refused(_rf(schema))
    assert "nested too deeply" in err.message


def test_pathological_regexes_refused() -> None:
    for pattern in ("^[a-z]{1,5000}$", "^((a{1,30}){1,30}){1,10}$", "a" * 5000):
        schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}
        err = _refused(_rf(schema))
        assert "#/properties/s/pattern" in err.message
        err = _refused({"structured_outputs": {"regex": pattern}})
        assert err.param == "structured_outputs.regex"
    err = _refused(_rf({"type": "object", "patternProperties": {"^x{99999}$": {}}}))
    assert "patternProperties" in err.message


def test_regex_cost_examples() -> None:
    assert regex_cost("abc") == 3
    assert regex_cost("[a-z]{2,4}x") == 5
    assert regex_cost("(ab|cd){10}") == 40
    assert regex_cost(r"\d{3}") == 3
    assert regex_cost("a{,3}") == 5  # not a count in ECMAScript: five literal characters


def test_compile_timeout_refuses_and_is_cached() -> None:
    # Limits widened so the slow pattern reaches the compiler; the compile outlives the limit.
    limits = SchemaLimits(compile_timeout_s=0.2, max_regex_cost=10**6, max_pattern_length=10**6)
    schema = {"type": "string", "pattern": "^[a-z]{1,3000}$"}
    err = _refused(_rf(schema), limits=limits)
    assert "longer than" in err.message
    err = _refused(_rf(schema), limits=limits)  # answered from the cache
    assert "longer than" in err.message


def test_busy_workers_give_503_and_are_not_cached() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from specserve.structured.compile import CompileBusy

    release = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)
    pool.submit(release.wait, 30)  # the only worker is tied up
    checker = GrammarChecker(cache_size=8, timeout_s=0.05, executor=pool)
    try:
        with pytest.raises(CompileBusy):
            checker.check("regex", "[a-z]+")
        assert checker.cached("regex", "[a-z]+") == (False, None)
    finally:
        release.set()
        pool.shutdown(wait=True)


def test_checker_cache_is_bounded() -> None:
    checker = GrammarChecker(cache_size=2, timeout_s=10)
    for i in range(4):
        checker.check("regex", f"a{i}")
    assert checker.cached("regex", "a3") == (True, None)
    assert checker.cached("regex", "a0") == (False, None)


def test_normalize_legacy_moves_fields() -> None:
    body = {"model": "m", "guided_json": json.dumps(PERSON), "guided_decoding_backend": "x"}
    out = normalize_legacy(body)
    assert out == {"model": "m", "structured_outputs": {"json": PERSON}}
    plain = {"model": "m"}
    assert normalize_legacy(plain) is plain


def test_async_precheck_refuses_and_passes() -> None:
    import asyncio

    from specserve.structured import aprecheck

    asyncio.run(aprecheck(_rf(PERSON), "chat"))
    asyncio.run(aprecheck({"prompt": "x"}, "completions"))
    with pytest.raises(APIError) as info:
        asyncio.run(aprecheck({"structured_outputs": {"regex": "a{1,99999}"}}, "completions"))
    assert info.value.param == "structured_outputs.regex"


def test_route_is_validated() -> None:
    with pytest.raises(ValueError):
        precheck({}, "embeddings")
