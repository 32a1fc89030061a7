"""Schema-driven fuzzing: request bodies generated from the gateway's own OpenAPI document.

``schemathesis`` turns the request-body schemas of the proxied routes (the typed models of
``specserve.gateway.protocol``) into Hypothesis strategies: conforming bodies (positive mode) and
bodies that break the schema (negative mode). They go to the real gateway app, in front of a fake
engine. Whatever is sent: never a 5xx, and every error is ``{"error": {"message", "type", "param",
"code"}}``, as the document says.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from specserve.gateway import GatewayConfig, create_app
from specserve.gateway.protocol import ErrorResponse

from support.gateway_fake_engine import MODEL, gateway_over_fake_engine

schemathesis = pytest.importorskip("schemathesis")

ROUTES = ("/v1/chat/completions", "/v1/completions")
ERROR_KEYS = {"message", "type", "param", "code"}
# Headers of schemathesis' own HTTP client that mean nothing to an in-process transport.
_DROP_HEADERS = {"connection", "accept-encoding", "user-agent"}

Gateway = tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]


def _openapi() -> dict[str, Any]:
    app = create_app(GatewayConfig(replicas=["http://127.0.0.1:9"]), registry=CollectorRegistry())
    document: dict[str, Any] = app.openapi()
    return document


def _strategy() -> st.SearchStrategy[tuple[Any, bool]]:
    """Cases for both routes, conforming and not, with a flag: send them to the served model."""
    schema = schemathesis.openapi.from_dict(_openapi())
    cases = st.one_of([
        schema[route]["POST"].as_strategy(mode)
        for route in ROUTES
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    ])
    # Mostly aimed at the served model, so that bodies get past the model check to the engine.
    return st.tuples(cases, st.sampled_from((True, True, True, False)))


def _request(case: Any, served_model: bool) -> tuple[str, bytes | None, dict[str, str]]:
    """Path, body bytes and headers of a generated case (optionally aimed at the served model)."""
    kwargs = case.as_transport_kwargs(base_url="http://gw")
    headers = {k: str(v) for k, v in (kwargs.get("headers") or {}).items() if k.lower() not in _DROP_HEADERS}
    if "json" in kwargs:
        body = kwargs["json"]
        if served_model and isinstance(body, dict) and "model" in body:
            body = {**body, "model": MODEL}
        # ensure_ascii: generated strings may hold lone surrogates, which UTF-8 cannot encode
        return case.formatted_path, json.dumps(body).encode(), headers
    data = kwargs.get("data")
    content = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return case.formatted_path, content, headers


def assert_openai_error(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    ErrorResponse.model_validate(body)  # the types the OpenAPI document promises


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with gateway_over_fake_engine() as pair:
        yield pair  # type: ignore[misc]


def test_the_document_describes_the_request_bodies_and_errors() -> None:
    document = _openapi()
    for route, model in zip(ROUTES, ("ChatCompletionRequest", "CompletionRequest"), strict=True):
        operation = document["paths"][route]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert "422" not in operation["responses"]  # invalid bodies get an OpenAI-shaped 400
        for status in ("4XX", "5XX"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    required = set(document["components"]["schemas"]["ErrorObject"]["required"])
    assert required == ERROR_KEYS


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(generated=_strategy())
def test_schema_generated_bodies_never_5xx_and_errors_are_openai_shaped(
    gateway: Gateway, generated: tuple[Any, bool]
) -> None:
    loop, http = gateway
    path, content, headers = _request(*generated)
    response = loop.run_until_complete(http.post(path, content=content, headers=headers))
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert 'data: {"error"' not in response.text, response.text
