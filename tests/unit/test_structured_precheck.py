"""Gateway pre-checks of structured-output constraints (xgrammar compile, limits, 400s)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from specserve.errors import APIError
from support.schema_precheck import aprecheck, precheck

from specserve.structured.compile import GrammarChecker
from specserve.structured.precheck import SchemaPrecheck
from specserve.structured.request import normalize_legacy
from specserve.structured.schema_limits import SchemaLimits
from specserve.structured.schema_limits import regex_cost
from specserve.structured.workers import compile_job

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


def _refused(body: dict[str, Any], route: str = "chat", check: SchemaPrecheck | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        (check.precheck if check is not None else precheck)(body, route)
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
    check = SchemaPrecheck(limits, workers=1)
    try:
        err = _refused(_rf(schema), check=check)
        assert "longer than" in err.message
        err = _refused(_rf(schema), check=check)  # answered from the cache
        assert "longer than" in err.message
    finally:
        check.close()


def test_busy_workers_give_503_and_are_not_cached() -> None:
    import threading
    import time

    from specserve.structured.compile import CompileBusy
    from specserve.structured.workers import CompileWorkers

    workers = CompileWorkers(size=1)
    workers.wait_started(120)
    holder = threading.Thread(target=workers.run, args=(time.sleep, 30, 20.0), daemon=True)
    holder.start()  # the only worker is tied up for 20 s
    checker = GrammarChecker(cache_size=8, timeout_s=0.2, workers=workers)
    try:
        with pytest.raises(CompileBusy):
            checker.check("regex", "[a-z]+")
        assert checker.cached("regex", "[a-z]+") == (False, None)
    finally:
        workers.close()


def test_a_compile_over_its_time_is_killed_and_others_go_on() -> None:
    """A worker running over its time limit is killed and replaced: the next compile gets a
    worker at once, where a thread given up on would still hold it."""
    import time

    from specserve.structured.workers import CompileWorkers

    workers = CompileWorkers(size=1)
    workers.wait_started(120)
    try:
        answer = workers.run(time.sleep, 60, timeout_s=0.5)
        assert answer is not None and "longer than" in answer
        assert workers.killed == 1
        workers.wait_started(120)
        assert workers.run(compile_job, ("regex", "[a-z]+"), timeout_s=60) is None
    finally:
        workers.close()


def test_waiting_for_a_worker_is_not_taken_for_a_slow_compile() -> None:
    """A job that waited for the only worker still gets its whole limit once it has one: a
    fresh engine whose workers are still starting must not refuse a constraint as too slow.
    (With the wait counted, the 2.5 s job would get about 2 s and be refused.)"""
    import threading
    import time

    from specserve.structured.workers import CompileWorkers

    workers = CompileWorkers(size=1)
    workers.wait_started(120)
    try:
        holder = threading.Thread(target=workers.run, args=(time.sleep, 1.0, 20.0), daemon=True)
        holder.start()
        while not holder.is_alive():  # the holder has the worker once its thread runs
            time.sleep(0.01)
        time.sleep(0.1)
        assert workers.run(time.sleep, 2.5, timeout_s=3.0) is None
        assert workers.killed == 0
    finally:
        workers.close()


def test_one_owner_runs_one_compile_at_a_time() -> None:
    import threading
    import time

    from specserve.structured.compile import CompileThrottled
    from specserve.structured.workers import CompileWorkers

    workers = CompileWorkers(size=2)
    workers.wait_started(120)
    checker = GrammarChecker(cache_size=8, timeout_s=30, workers=workers)
    slow = threading.Thread(target=lambda: checker.check("json", SLOW_SCHEMA, owner="a"), daemon=True)
    slow.start()
    try:
        deadline = time.monotonic() + 30
        while not checker._owners.get("a"):  # noqa: SLF001 - the slow compile has started
            assert time.monotonic() < deadline, "the slow compile never started"
            time.sleep(0.01)
        with pytest.raises(CompileThrottled):
            checker.check("regex", "[0-9]+", owner="a", deadline=time.monotonic() + 0.3)
        checker.check("regex", "[0-9]+", owner="b")  # another client is not held up
    finally:
        workers.close()


# 1,200 object branches (~220 KB): several seconds to compile, within every size limit.
SLOW_SCHEMA = {"anyOf": [
    {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "[a-z]{1,20}"},
                                      f"v{i}": {"type": "integer"}},
     "required": [f"k{i}", f"v{i}"], "additionalProperties": False}
    for i in range(1200)]}


def test_schemas_the_engine_cannot_serve_are_refused_naming_the_place() -> None:
    # Converts, but xgrammar's compiler stops on an internal check (was a 500 from the engine).
    err = _refused(_rf({"type": "object", "properties": {"s": {"type": "string", "pattern": "[a-z]{1,200}"}}}))
    assert "#/properties/s/pattern" in err.message
    precheck(_rf({"type": "string", "pattern": "[a-z]{1,100}"}), "chat")
    precheck({"structured_outputs": {"regex": "[a-z]{1,200}"}}, "chat")  # the regex alone compiles


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
])
def test_schemas_with_no_instance_are_refused(schema: dict[str, Any]) -> None:
    err = _refused({"structured_outputs": {"json": schema}})
    assert "admits no output" in err.message and err.param == "structured_outputs.json"


def test_recursive_schemas_with_a_way_out_pass() -> None:
    precheck({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"$ref": "#"}}}}}, "chat")
    precheck({"structured_outputs": {"grammar": 'root ::= "(" root ")" | "x"'}}, "chat")
    err = _refused({"structured_outputs": {"grammar": 'root ::= "(" root ")"'}})
    assert "admits no output" in err.message


@pytest.mark.parametrize("ref", ["http://example.com/s.json", "other.json#/x", "urn:x"])
def test_remote_refs_are_refused(ref: str) -> None:
    err = _refused(_rf({"type": "object", "properties": {"a": {"$ref": ref}}}))
    assert "'/properties/a'" in err.message and "not fetched" in err.message


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

    asyncio.run(aprecheck(_rf(PERSON), "chat"))
    asyncio.run(aprecheck({"prompt": "x"}, "completions"))
    with pytest.raises(APIError) as info:
        asyncio.run(aprecheck({"structured_outputs": {"regex": "a{1,99999}"}}, "completions"))
    assert info.value.param == "structured_outputs.regex"


def test_route_is_validated() -> None:
    with pytest.raises(ValueError):
        precheck({}, "embeddings")
