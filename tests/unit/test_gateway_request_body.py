"""The forwarded body: every edit applied to one parsed object, serialised once (or not at all)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from specserve.gateway import GatewayConfig, request_body
from specserve.gateway.request_body import ForwardBody
from specserve.structured.engine_grammar import STRICT_KEYWORD

from support.gateway_fake_engine import MODEL, in_process_gateway, running_fake_engine

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
STRICT = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}


class CountingJson:
    """``json`` for :mod:`specserve.gateway.request_body`, counting serialisations."""

    def __init__(self) -> None:
        self.dumps_calls = 0

    def dumps(self, obj: Any, **kw: Any) -> str:
        self.dumps_calls += 1
        return json.dumps(obj, **kw)


def test_edits_do_not_touch_the_parsed_object() -> None:
    parsed = {"model": "m", "vllm_xargs": {"x": 1}}
    body = ForwardBody(json.dumps(parsed).encode(), parsed)
    body.set("max_tokens", 4)
    assert body.set_spec_k(3)
    assert parsed == {"model": "m", "vllm_xargs": {"x": 1}}
    assert json.loads(body.encode()) == {"model": "m", "vllm_xargs": {"x": 1, "spec_k": 3}, "max_tokens": 4}
    assert not ForwardBody(b'{"model": "m", "vllm_xargs": 7}', {"model": "m", "vllm_xargs": 7}).set_spec_k(1)


def test_a_null_vllm_xargs_gets_the_spec_k() -> None:
    body = ForwardBody(b'{"model": "m", "vllm_xargs": null}', {"model": "m", "vllm_xargs": None})
    assert body.set_spec_k(2) and json.loads(body.encode())["vllm_xargs"] == {"spec_k": 2}


@pytest.mark.parametrize("policy", ["fixed", "goodput"])
def test_the_engine_gets_every_edit_from_one_serialisation(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingJson()
    monkeypatch.setattr(request_body, "json", counting)
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # Three edits: the strict keyword, max_tokens set to the cap, and (goodput) vllm_xargs.spec_k.
    edited = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": STRICT}
    config = GatewayConfig(replicas=["http://127.0.0.1:9"], max_tokens_cap=8, spec_policy=policy)

    async def main() -> list[dict[str, Any]]:
        with running_fake_engine() as (url, state):
            async with in_process_gateway(config.model_copy(update={"replicas": [url]})) as (client, _):
                assert (await client.post("/v1/chat/completions", json=plain)).status_code == 200
                assert counting.dumps_calls == 0  # no edit but spec_k: the client's bytes go on
                response = await client.post("/v1/chat/completions", json=edited)
                assert response.status_code == 200, response.text
                assert counting.dumps_calls == 1
            return list(state.requests)

    sent = asyncio.run(main())[-1]
    assert sent["response_format"]["json_schema"]["schema"] == {**SCHEMA, STRICT_KEYWORD: True}
    assert sent["max_tokens"] == 8
    assert ("vllm_xargs" in sent) == (policy == "goodput")
