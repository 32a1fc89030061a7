"""Property-based fuzzing of the proxied routes: never a 5xx, every error OpenAI-shaped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from support.gateway_fake_engine import MODEL, gateway_over_fake_engine

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
          "stream", "stream_options", "logprobs", "top_logprobs", "response_format", "tools",
          "tool_choice", "presence_penalty", "frequency_penalty", "logit_bias", "user", "best_of"]


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    base = dict(CHAT if path.endswith("chat/completions") else COMPLETION)
    kind = draw(st.sampled_from(["mutate", "mutate", "json", "bytes"]))
    if kind == "mutate":
        for _ in range(draw(st.integers(1, 3))):
            base[draw(st.sampled_from(FIELDS))] = draw(JSON)
        if draw(st.booleans()):
            base.pop(draw(st.sampled_from(sorted(base))), None)
        return path, json.dumps(base).encode()
    if kind == "json":
        return path, json.dumps(draw(JSON)).encode()
    return path, draw(st.binary(max_size=64))


@pytest.fixture(scope="module")
def client() -> Iterator[tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]]:
    with gateway_over_fake_engine() as pair:
        yield pair  # type: ignore[misc]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bodies())
def test_no_5xx_and_errors_are_openai_shaped(
    client: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient], case: tuple[str, bytes]
) -> None:
    check_response(client, case)


def check_response(client: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient], case: tuple[str, bytes]) -> None:
    """Send ``case``: never a 5xx, every error OpenAI-shaped, no error event in a 200 stream."""
    loop, http = client
    path, body = case
    response = loop.run_until_complete(
        http.post(path, content=body, headers={"content-type": "application/json"}))
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error: Any = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert 'data: {"error"' not in response.text, response.text


# Structured outputs and limits a hostile or careless client sends: counted repetitions the
# grammar compiler cannot build, $ref loops with no instance, references to other documents,
# n > 1 with max_tokens left out.
_REF_LOOPS = [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    {"type": "object", "properties": {"a": {"$ref": "#"}}},  # has instances: may pass
]
_REMOTE = ["http://example.com/s.json", "https://example.com/s.json#/x", "other.json", "urn:x:y", "#/$defs/none"]


@st.composite
def hostile_schemas(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["repeat", "loop", "remote"]))
    if kind == "repeat":
        low = draw(st.integers(0, 50))
        high = draw(st.integers(low, 400))
        cls = draw(st.sampled_from(["[a-z]", "[0-9]", "a", "(ab)", "\\d", "."]))
        return {"type": "string", "pattern": f"{cls}{{{low},{high}}}"}
    if kind == "loop":
        return draw(st.sampled_from(_REF_LOOPS))
    return {"type": "object", "properties": {"a": {"$ref": draw(st.sampled_from(_REMOTE))}}}


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    chat = draw(st.booleans())
    body: dict[str, Any] = dict(CHAT if chat else COMPLETION)
    if draw(st.booleans()):
        body.pop("max_tokens")
        body["n"] = draw(st.integers(1, 8))
    where = draw(st.sampled_from(["response_format", "structured_outputs", "guided_json", "none"]))
    schema = draw(hostile_schemas())
    if where == "response_format":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    elif where != "none":
        body[where] = {"json": schema} if where == "structured_outputs" else schema
    body["stream"] = draw(st.booleans())
    return ("/v1/chat/completions" if chat else "/v1/completions"), json.dumps(body).encode()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=hostile_bodies())
def test_hostile_constraints_and_limits_never_5xx(
    client: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient], case: tuple[str, bytes]
) -> None:
    check_response(client, case)
