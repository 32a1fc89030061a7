"""Abuse and hardening of the gateway, over real HTTP on 127.0.0.1 in front of a fake engine:
clients that leave, token charges when ``max_tokens`` is left out, schemas the engine could not
serve, slow schemas, the key before the body, bad-key throttling, engine keys and private replica
addresses. Connection limits and start-up refusals run the real ``specserve gateway`` command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from specserve.gateway import GatewayConfig, KeyLimits, create_app

from support.gateway_fake_engine import MODEL, FakeState, free_port, running_fake_engine

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ERROR_KEYS = {"message", "type", "param", "code"}


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    """Until ``check()`` is true; fails naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {value!r})")
        time.sleep(0.02)
        value = check()


@contextmanager
def running_gateway(config: GatewayConfig) -> Iterator[tuple[str, object]]:
    """The gateway app under uvicorn on a free port in a thread: ``(base URL, app)``."""
    app = create_app(config, registry=CollectorRegistry())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "gateway started")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/ready", trust_env=False).status_code == 200, "gateway ready")
    schema_check = getattr(app.state.gateway, "schema_check", None)
    if schema_check is not None:  # absent in older builds (the regression check on older code)
        schema_check.prepare(600)  # the first start imports xgrammar: up to a minute here
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_request(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(head + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed or 20 s passed."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b"content-length" in data.lower():
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                if len(rest) >= length:
                    break
    except TimeoutError:
        pass
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 "), f"no response, got {data[:80]!r}"
    return int(data.split(b" ", 2)[1]), data


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    return error  # type: ignore[no-any-return]


# -- 1: clients that leave -------------------------------------------------------------------
def test_a_client_that_leaves_frees_its_slot_and_its_queued_request_is_never_sent() -> None:
    state = FakeState(gate=threading.Event())
    with running_fake_engine(state) as (engine, _), \
            running_gateway(GatewayConfig(replicas=[engine], max_in_flight=1, max_queue=4)) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        gw = app.state.gateway  # type: ignore[attr-defined]

        def send(content: str) -> socket.socket:
            body = json.dumps({**CHAT, "messages": [{"role": "user", "content": content}]}).encode()
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            return raw_request(port, head, body)

        first = send("first")
        wait_for(lambda: state.unary_running == 1, "the first request at the engine")
        queued = send("queued")
        wait_for(lambda: gw.queue.waiting == 1, "the second request waiting for a slot")
        # The queued client leaves first, and the gateway must see it before the slot frees: were
        # both to leave at once, the slot could be granted (and the request forwarded) before the
        # queued connection's close reached the gateway, which no server can rule out.
        queued.close()
        wait_for(lambda: (gw.queue.waiting, gw.queue.active) == (0, 1), "the queued client dropped")
        first.close()
        wait_for(lambda: state.unary_aborted >= 1, "the engine saw the first client leave")
        wait_for(lambda: (gw.queue.waiting, gw.queue.active) == (0, 0), "queue and slots empty")
        state.gate.set()
        response = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "messages": [
            {"role": "user", "content": "after"}]}, trust_env=False, timeout=20)
        assert response.status_code == 200, response.text
        sent = [r["messages"][0]["content"] for r in state.requests]
        assert sent == ["first", "after"], sent  # the queued request never reached the engine
        assert state.unary_aborted == 1


# -- 5: max_tokens left out ------------------------------------------------------------------
def test_omitted_max_tokens_is_charged_and_capped_as_the_engine_allows(fake_engine: tuple[str, FakeState]) -> None:
    engine, state = fake_engine
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}
    # The engine may generate 2 x 2048 tokens (the rest of its context, twice): over a 3,000
    # tokens-per-minute key, the second such request is refused.
    limits = KeyLimits(tokens_per_minute=3000)
    with running_gateway(GatewayConfig(replicas=[engine], key_limits=limits)) as (url, _):
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, trust_env=False).status_code == 200
        err = openai_error(httpx.post(f"{url}/v1/chat/completions", json=chat, trust_env=False), 429)
        assert err["code"] == "rate_limit_tokens"
    with running_gateway(GatewayConfig(replicas=[engine], max_tokens_cap=50)) as (url, _):
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, trust_env=False).status_code == 200
        assert state.requests[-1]["max_tokens"] == 50  # sent capped, not the rest of the context
        completion = {"model": MODEL, "prompt": "x", "max_tokens": None}
        assert httpx.post(f"{url}/v1/completions", json=completion, trust_env=False).status_code == 200
        assert state.requests[-1]["max_tokens"] == 50
        err = openai_error(httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 51},
                                      trust_env=False), 400)
        assert err["param"] == "max_tokens"


@pytest.fixture()
def fake_engine() -> Iterator[tuple[str, FakeState]]:
    with running_fake_engine() as pair:
        yield pair


# -- 2, 3, 4: schemas the engine could not serve ---------------------------------------------
def _rf(schema: object) -> dict:
    return {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


@pytest.mark.parametrize(("schema", "says"), [
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "[a-z]{1,200}"}}},
     "#/properties/s/pattern"),
    ({"$ref": "#"}, "admits no output"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "admits no output"),
    ({"type": "object", "properties": {"a": {"$ref": "http://example.com/a.json"}}}, "not fetched"),
])
def test_schemas_the_engine_cannot_serve_are_400_and_never_forwarded(
        fake_engine: tuple[str, FakeState], schema: object, says: str) -> None:
    engine, state = fake_engine
    with running_gateway(GatewayConfig(replicas=[engine])) as (url, _):
        for stream in (False, True):
            err = openai_error(httpx.post(f"{url}/v1/chat/completions", json={**_rf(schema), "stream": stream},
                                          trust_env=False, timeout=30), 400)
            assert says in err["message"] and err["param"] == "response_format.json_schema.schema", err
    assert state.requests == []


# -- 6: a slow schema holds up nobody else ----------------------------------------------------
SLOW_SCHEMA = {"anyOf": [
    {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "[a-z]{1,20}"},
                                      f"v{i}": {"type": "integer"}},
     "required": [f"k{i}", f"v{i}"], "additionalProperties": False}
    for i in range(1200)]}


def test_one_clients_slow_schemas_do_not_hold_up_another_client(fake_engine: tuple[str, FakeState]) -> None:
    engine, _ = fake_engine
    config = GatewayConfig(replicas=[engine], api_keys=("key-a", "key-b"))
    with running_gateway(config) as (url, _):
        # A small schema first: the compile workers are up and the path is warm.
        small = _rf({"type": "object", "properties": {"n": {"type": "integer"}}})
        headers_b = {"authorization": "Bearer key-b"}
        assert httpx.post(f"{url}/v1/chat/completions", json=small, headers=headers_b, trust_env=False,
                          timeout=120).status_code == 200
        finished: list[tuple[str, int]] = []

        async def post(client: httpx.AsyncClient, who: str, key: str, body: dict) -> None:
            r = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            finished.append((who, r.status_code))

        async def main() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
                slow = [asyncio.create_task(post(client, f"a{i}", "key-a", {**_rf(SLOW_SCHEMA), "seed": i}))
                        for i in range(4)]
                await asyncio.sleep(0)  # the slow ones are sent first
                other = _rf({"type": "object", "properties": {"m": {"type": "string"}}})
                await asyncio.gather(*slow, post(client, "b", "key-b", other))

        asyncio.run(main())
        order = [who for who, _ in finished]
        assert order[0] == "b", finished  # client b was not queued behind client a's compiles
        assert dict(finished)["b"] == 200, finished
        assert all(status in (400, 429) for who, status in finished if who != "b"), finished


# -- 10: the key before the body; bad-key throttling -------------------------------------------
def test_the_key_is_checked_before_the_body_is_read(fake_engine: tuple[str, FakeState]) -> None:
    engine, state = fake_engine
    with running_gateway(GatewayConfig(replicas=[engine], api_keys=("sk-good",))) as (url, _):
        err = openai_error(httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                                      headers={"content-type": "application/json"}, trust_env=False), 401)
        assert err["code"] == "invalid_api_key"
        # A head announcing a body that never comes: answered 401 at once, not after the body.
        port = int(url.rsplit(":", 1)[1])
        sock = raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        status, data = read_response(sock)
        assert status == 401, data[:200]
    assert state.requests == []


def test_repeated_bad_keys_from_one_address_are_throttled(fake_engine: tuple[str, FakeState]) -> None:
    engine, _ = fake_engine
    with running_gateway(GatewayConfig(replicas=[engine], api_keys=("sk-good",), bad_key_limit=5)) as (url, _):
        with httpx.Client(base_url=url, trust_env=False) as client:
            good = {"authorization": "Bearer sk-good"}
            assert client.post("/v1/chat/completions", json=CHAT, headers=good).status_code == 200
            for i in range(5):
                openai_error(client.post("/v1/chat/completions", json=CHAT,
                                         headers={"authorization": f"Bearer guess-{i}"}), 401)
            err = openai_error(client.post("/v1/chat/completions", json=CHAT,
                                           headers={"authorization": "Bearer guess-6"}), 429)
            assert err["code"] == "too_many_bad_keys"
            throttled = client.post("/v1/chat/completions", json=CHAT, headers=good)
            assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
            assert client.get("/health").status_code == 200  # public routes stay open


# -- 7: engine key and private replica addresses ----------------------------------------------
def test_the_gateway_sends_the_engine_key_on_everything() -> None:
    state = FakeState(api_key="engine-secret")
    with running_fake_engine(state) as (engine, _):
        assert httpx.get(f"{engine}/v1/models", trust_env=False).status_code == 401
        assert httpx.post(f"{engine}/tokenize", json={"prompt": "x"}, trust_env=False).status_code == 401
        assert httpx.get(f"{engine}/health", trust_env=False).status_code == 200
        config = GatewayConfig(replicas=[engine], engine_api_key="engine-secret", max_prompt_tokens=100)
        with running_gateway(config) as (url, _):  # ready: the probes carry the key
            assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, trust_env=False).status_code == 200
            assert state.tokenize_requests, "the prompt was counted by the engine"
            stream = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, trust_env=False)
            assert stream.status_code == 200 and "[DONE]" in stream.text
            assert [m["id"] for m in httpx.get(f"{url}/v1/models", trust_env=False).json()["data"]] == [MODEL]


def test_replica_addresses_are_opt_in(fake_engine: tuple[str, FakeState]) -> None:
    engine, _ = fake_engine
    address = engine.removeprefix("http://")
    with running_gateway(GatewayConfig(replicas=[engine])) as (url, _):
        httpx.post(f"{url}/v1/chat/completions", json=CHAT, trust_env=False)
        for path in ("/ready", "/metrics"):
            assert address not in httpx.get(f"{url}{path}", trust_env=False).text, path
        assert httpx.get(f"{url}/ready", trust_env=False).json()["replicas"] == {"0": True}
    with running_gateway(GatewayConfig(replicas=[engine], expose_replica_addresses=True)) as (url, _):
        assert httpx.get(f"{url}/ready", trust_env=False).json()["replicas"] == {engine: True}
        assert address in httpx.get(f"{url}/metrics", trust_env=False).text


# -- 9, 8, 11: the real command: connection limits, start-up refusal, key files ----------------
@contextmanager
def gateway_command(args: list[str], env: dict[str, str] | None = None) -> Iterator[int]:
    """``specserve gateway`` as a subprocess on a free port; yields the port once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "specserve.cli", "gateway", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, "specserve gateway answering /health", timeout_s=120)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def limited_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("# clients\nsk-file\n\n")
    with running_fake_engine() as (engine, _), gateway_command([
        f"--replica={engine}", "--api-key-file", str(keys), "--header-timeout", "1",
        "--body-timeout", "1", "--max-connections", "6", "--max-header-count", "50",
        "--max-header-bytes", "8192"]) as port:
        # /health answers before the first probe has found the engine: wait until it is routable.
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/ready", trust_env=False).status_code == 200,
                 "the gateway ready (its engine probed)", timeout_s=120)
        yield port


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-file\r\n"


def test_oversized_heads_get_431(limited_gateway: int) -> None:
    big = HEAD + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n"
    status, data = read_response(raw_request(limited_gateway, big))
    assert status == 431 and b'"code": "request_header_fields_too_large"' in data, data[:300]
    many = HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
    status, data = read_response(raw_request(limited_gateway, many))
    assert status == 431, data[:300]
    body = json.dumps(CHAT).encode()
    fine = HEAD + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    status, data = read_response(raw_request(limited_gateway, fine, body))
    assert status == 200, data[:300]  # the key from the key file works


def test_slow_heads_and_bodies_get_408_and_are_closed(limited_gateway: int) -> None:
    sock = raw_request(limited_gateway, HEAD)  # the head never ends
    status, data = read_response(sock)
    assert status == 408 and b"head" in data, data[:300]
    sock = raw_request(limited_gateway, HEAD + b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n",
                       b'{"model": ')  # a half-sent body
    status, data = read_response(sock)
    assert status == 408 and b"body" in data, data[:300]


def test_connections_over_the_cap_are_refused(limited_gateway: int) -> None:
    held = [socket.create_connection(("127.0.0.1", limited_gateway), timeout=20) for _ in range(6)]
    try:
        status, data = read_response(socket.create_connection(("127.0.0.1", limited_gateway), timeout=20))
        assert status == 503 and b"too_many_connections" in data, data[:300]
    finally:
        for sock in held:
            sock.close()


def test_an_open_listener_without_keys_is_refused_unless_asked_for(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "specserve.cli", "gateway", "--host", "0.0.0.0", "--port", str(free_port()),
           "--replica", "http://127.0.0.1:9"]
    env = {k: v for k, v in os.environ.items() if k not in ("SPECSERVE_API_KEYS", "SPECSERVE_ALLOW_UNAUTHENTICATED")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--allow-unauthenticated" in proc.stdout + proc.stderr
    with gateway_command(["--host", "0.0.0.0", "--replica", "http://127.0.0.1:9"],
                         env={"SPECSERVE_ALLOW_UNAUTHENTICATED": "1"}):
        pass
    with gateway_command(["--host", "0.0.0.0", "--replica", "http://127.0.0.1:9"],
                         env={"SPECSERVE_API_KEYS": "k1,k2"}) as port:
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer k2"}, trust_env=False)
        assert r.status_code == 503  # authenticated; no engine behind it
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", trust_env=False).status_code == 401
    help_text = subprocess.run([sys.executable, "-m", "specserve.cli", "gateway", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    assert "process list" in help_text and "--api-key-file" in help_text
