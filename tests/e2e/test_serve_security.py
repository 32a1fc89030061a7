"""``specserve serve`` with the real engine on CPU: the engine port needs the engine key, and the
engine itself refuses with 400 the schemas it cannot serve (sent straight to it, past the gateway)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.specserve_process import ENGINE_KEY, MODEL_NAME, ServeProcess, running_specserve, wait_ready

KEYED = {"authorization": f"Bearer {ENGINE_KEY}"}
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with running_specserve(demo_model_dir, log_dir=tmp_path_factory.mktemp("serve-security")) as srv:
        yield srv


def _chat(schema: object, stream: bool = False) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Give me JSON."}],
            "max_tokens": 8, "temperature": 0, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def test_the_engine_port_needs_the_engine_key(server: ServeProcess) -> None:
    with httpx.Client(base_url=server.engine_url, trust_env=False, timeout=60) as engine:
        assert engine.get("/health").status_code == 200
        assert engine.get("/metrics").status_code == 200
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "x"}),
                                   ("GET", "/docs", None), ("GET", "/openapi.json", None),
                                   ("POST", "/v1/chat/completions", _chat({"type": "integer"})),
                                   ("GET", "/version", None)):
            r = engine.request(method, path, json=body)
            assert r.status_code == 401, (path, r.status_code, r.text[:200])
            r = engine.request(method, path, json=body, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401, (path, r.status_code)
        assert engine.get("/v1/models", headers=KEYED).status_code == 200
    # The gateway holds the key: everything works through it, and it names no engine address.
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=120) as gateway:
        r = gateway.post("/v1/chat/completions", json=_chat({"type": "integer"}))
        assert r.status_code == 200, r.text
        for path in ("/ready", "/metrics"):
            assert f":{server.engine_port}" not in gateway.get(path).text, path


@pytest.mark.parametrize(("schema", "says"), [
    ({"type": "string", "pattern": "[a-z]{1,200}"}, "cannot be served"),
    ({"$ref": "#"}, "admits no output"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "admits no output"),
])
def test_the_engine_answers_400_for_schemas_it_cannot_serve(server: ServeProcess, schema: object, says: str) -> None:
    """Straight to the engine (past the gateway's own check): a 400; was a 500. A stream straight
    from vLLM reports its validation errors as an error event with code 400 and no output (the
    gateway answers those with a plain 400, below)."""
    with httpx.Client(base_url=server.engine_url, trust_env=False, timeout=300, headers=KEYED) as engine:
        r = engine.post("/v1/chat/completions", json=_chat(schema))
        assert r.status_code == 400, (r.status_code, r.text[:300])
        assert says in r.text, r.text[:300]
        r = engine.post("/v1/chat/completions", json=_chat(schema, stream=True))
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert r.status_code == 400 or (events and events[0].get("error", {}).get("code") == 400), r.text[:300]
        assert says in r.text and '"choices"' not in r.text, r.text[:300]
        ok = engine.post("/v1/chat/completions", json=_chat({"type": "string", "pattern": "[a-z]{1,100}"}))
        assert ok.status_code == 200, ok.text[:300]
    # vLLM validates in its event loop: a direct caller's slow compile (before the engine's
    # compile workers have started it runs there) can hold /health past the gateway's probes,
    # which then mark the engine down until a probe passes. Observed, not assumed:
    wait_ready(server)
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=120) as gateway:
        r = gateway.post("/v1/chat/completions", json=_chat(schema))
        assert r.status_code == 400 and set(r.json()["error"]) == ERROR_KEYS, r.text[:300]
