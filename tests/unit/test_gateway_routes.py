"""Gateway routes in-process (httpx ASGITransport) against a fake engine on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.engine.process import free_port
from specserve.errors import APIError
from specserve.gateway import GatewayConfig, KeyLimits

from support.gateway_fake_engine import MODEL, FakeState, running_fake_engine
from support.gateway_fake_engine import in_process_gateway as gateway

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture()
def fake() -> Iterator[tuple[str, FakeState]]:
    with running_fake_engine() as pair:
        yield pair


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def test_health_ready_models_and_chat(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> None:
        async with gateway(GatewayConfig(replicas=[url])) as (client, _):
            assert (await client.get("/health")).json() == {"status": "ok"}
            ready = await client.get("/ready")
            # Engine addresses stay private unless asked for (test_replica_addresses_are_opt_in).
            assert ready.status_code == 200 and ready.json()["replicas"] == {"0": True}
            models = await client.get("/v1/models")
            assert [m["id"] for m in models.json()["data"]] == [MODEL]
            r = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "req-42"})
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "a b c"
            assert r.headers["x-request-id"] == "req-42"
            assert state.request_ids[-1] == "req-42"
            c = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                          "top_k": 3})
            assert c.status_code == 200 and c.json()["choices"][0]["text"] == "a b c"
            assert state.requests[-1]["top_k"] == 3  # vLLM extras pass through
            fresh = await client.get("/health")
            assert len(fresh.headers["x-request-id"]) == 32

    asyncio.run(main())


def test_errors_are_openai_shaped(fake: tuple[str, FakeState]) -> None:
    url, _ = fake

    async def main() -> None:
        async with gateway(GatewayConfig(replicas=[url], max_body_bytes=2048)) as (client, _):
            bad_role = {**CHAT, "messages": [{"role": "robot", "content": "x"}]}
            err = assert_openai_error(await client.post("/v1/chat/completions", json=bad_role), 400)
            assert err["param"] == "messages.0.role"
            err = assert_openai_error(
                await client.post("/v1/chat/completions", json={**CHAT, "temperature": 9}), 400)
            assert err["param"] == "temperature"
            err = assert_openai_error(await client.post("/v1/chat/completions", json={"model": MODEL}), 400)
            assert err["param"] == "messages"
            err = assert_openai_error(await client.post(
                "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400)
            assert err["code"] == "invalid_json"
            err = assert_openai_error(
                await client.post("/v1/chat/completions", json={**CHAT, "audio": {"voice": "x"}}), 400)
            assert err["param"] == "audio"
            err = assert_openai_error(await client.post("/v1/chat/completions", json={**CHAT, "model": "x"}), 404)
            assert err["param"] == "model" and err["code"] == "model_not_found"
            assert_openai_error(await client.get("/v1/nothing-here"), 404)
            assert_openai_error(await client.get("/v1/chat/completions"), 405)
            big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]}
            assert_openai_error(await client.post("/v1/chat/completions", json=big), 413)

    asyncio.run(main())


def test_bodies_that_are_not_json_objects_have_a_code(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    json_type = {"content-type": "application/json"}
    cases = [
        (b"{nope", json_type, "invalid_json"),
        (b'{"model": "\xc3\x28"}', json_type, "invalid_json"),  # not UTF-8
        (b"[" * 3000 + b"]" * 3000, json_type, "invalid_json"),  # nested too deep to parse
        (b"", json_type, "invalid_json"),
        (b"null", json_type, "invalid_json"),
        (b'{"model": "m"}', {"content-type": "text/plain"}, "invalid_json"),
        (b"[1, 2]", json_type, "invalid_type"),
        (b'"hi"', json_type, "invalid_type"),
        (b"42", json_type, "invalid_type"),
    ]

    async def main() -> None:
        async with gateway(GatewayConfig(replicas=[url])) as (client, _):
            for content, headers, code in cases:
                for path in ("/v1/chat/completions", "/v1/completions"):
                    r = await client.post(path, content=content, headers=headers)
                    err = assert_openai_error(r, 400)
                    assert (err["code"], err["param"]) == (code, None), (content[:20], err)
            r = await client.post("/v1/completions", content=b"[1]", headers=json_type)
            assert "must be a JSON object, not an array" in r.json()["error"]["message"]
            err = assert_openai_error(await client.post("/v1/chat/completions", json={"model": MODEL}), 400)
            assert (err["code"], err["param"]) == ("invalid_value", "messages")
        assert state.requests == []

    asyncio.run(main())


def test_engine_down_is_503_and_slow_engine_is_504(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> None:
        async with gateway(GatewayConfig(replicas=[dead_url()])) as (client, _):
            assert_openai_error(await client.get("/ready"), 503)
            err = assert_openai_error(await client.post("/v1/chat/completions", json=CHAT), 503)
            assert err["type"] == "service_unavailable_error"
        state.delay_s = 2.0
        async with gateway(GatewayConfig(replicas=[url], request_timeout_s=0.3)) as (client, _):
            err = assert_openai_error(await client.post("/v1/chat/completions", json=CHAT), 504)
            assert err["code"] == "upstream_timeout"

    asyncio.run(main())


def test_upstream_error_is_reshaped(fake: tuple[str, FakeState]) -> None:
    url, _ = fake

    async def main() -> None:
        # The gateway knows the engine's models, so a wrong model is caught before forwarding; an
        # engine error still comes back OpenAI-shaped with the engine's status.
        async with gateway(GatewayConfig(replicas=[url])) as (client, app):
            app.state.gateway.pool.replicas[url].models = (MODEL, "other")
            err = assert_openai_error(
                await client.post("/v1/chat/completions", json={**CHAT, "model": "other"}), 404)
            assert err["message"] == "no such model" and err["type"] == "not_found_error"

    asyncio.run(main())


def test_precheck_runs_before_forwarding(fake: tuple[str, FakeState], monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = fake
    seen: list[str] = []

    def precheck(body: dict, route: str, **_: object) -> None:
        seen.append(route)
        if body.get("response_format"):
            raise APIError(400, "schema not supported", param="response_format")

    async def main() -> None:
        async with gateway(GatewayConfig(replicas=[url])) as (client, app):
            monkeypatch.setattr(app.state.gateway.schema_check, "precheck", precheck)
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
            err = assert_openai_error(
                await client.post("/v1/chat/completions", json={**CHAT, "response_format": fmt}), 400)
            assert err["param"] == "response_format"
            assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": "p"})).status_code == 200

    asyncio.run(main())
    assert seen == ["chat"]  # requests without constraints skip the compile check
    assert len(state.requests) == 1  # the refused request never reached the engine


def test_metrics_parse_and_count(fake: tuple[str, FakeState]) -> None:
    url, _ = fake

    async def main() -> str:
        async with gateway(GatewayConfig(replicas=[url])) as (client, _):
            await client.post("/v1/chat/completions", json=CHAT)
            await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
            return (await client.get("/metrics")).text

    text = asyncio.run(main())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("specserve_gateway_requests", "specserve_gateway_request_duration_seconds",
                 "specserve_gateway_time_to_first_token_seconds", "specserve_gateway_replica_up_ratio",
                 "specserve_gateway_replica_in_flight_requests", "specserve_gateway_tokens"):
        assert name in families, name
    counts = {(s.labels["route"], s.labels["status"], s.labels["model"]): s.value
              for s in families["specserve_gateway_requests"].samples if s.name.endswith("_total")}
    assert counts[("/v1/chat/completions", "200", MODEL)] == 2
    assert counts[("/v1/chat/completions", "404", "")] == 1
    ttft = [s for s in families["specserve_gateway_time_to_first_token_seconds"].samples
            if s.name.endswith("_count")]
    assert ttft[0].value == 1
    up = [s.value for s in families["specserve_gateway_replica_up_ratio"].samples]
    assert up == [1.0]
    tokens = {s.labels["direction"]: s.value for s in families["specserve_gateway_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens == {"prompt": 8.0, "completion": 6.0}


def test_auth_and_rate_limit(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    config = GatewayConfig(replicas=[url], api_keys=("sk-good",),
                           key_limits=KeyLimits(requests_per_minute=2))

    async def main() -> None:
        async with gateway(config) as (client, _):
            err = assert_openai_error(await client.post("/v1/chat/completions", json=CHAT), 401)
            assert err["type"] == "authentication_error"
            assert_openai_error(await client.post("/v1/chat/completions", json=CHAT,
                                                  headers={"authorization": "Bearer sk-bad"}), 401)
            good = {"authorization": "Bearer sk-good"}
            for _ in range(2):
                assert (await client.post("/v1/chat/completions", json=CHAT, headers=good)).status_code == 200
            limited = await client.post("/v1/chat/completions", json=CHAT, headers=good)
            err = assert_openai_error(limited, 429)
            assert int(limited.headers["retry-after"]) >= 1
            assert (await client.get("/health")).status_code == 200  # probes need no key

    asyncio.run(main())


def test_retry_on_another_replica_when_one_refuses(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    dead = dead_url()

    async def main() -> None:
        async with gateway(GatewayConfig(replicas=[dead, url], health_interval_s=60)) as (client, app):
            pool = app.state.gateway.pool
            assert not pool.replicas[dead].healthy
            # Pretend the dead one looked healthy and idle at the last check: it gets picked first.
            pool.replicas[dead].healthy = True
            pool.replicas[dead].models = (MODEL,)
            pool.replicas[url].in_flight = 5
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
            assert not pool.replicas[dead].healthy
            pool.replicas[url].in_flight = 0
            metrics = (await client.get("/metrics")).text
            assert "specserve_gateway_retries_total 1.0" in metrics

    asyncio.run(main())
    assert len(state.requests) == 1


def test_replicas_from_dns(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    port = url.rsplit(":", 1)[1]

    async def main() -> None:
        async with gateway(GatewayConfig(replicas_dns=f"localhost:{port}")) as (client, app):
            pool = app.state.gateway.pool
            assert url in pool.replicas and pool.replicas[url].healthy
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200

    asyncio.run(main())
