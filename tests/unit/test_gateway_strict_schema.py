"""``response_format.json_schema.strict: true``: OpenAI's strict contract reaches the engine.

vLLM drops the ``strict`` flag; the gateway carries it as a keyword of the schema, and the
engine's grammar then lists only declared names, in the declared order. Without it the engine
serves the schema's own meaning (undeclared names where allowed, any order of small objects).
"""

from __future__ import annotations

import asyncio
from typing import Any

from support.gateway_fake_engine import MODEL, in_process_gateway, running_fake_engine
from support.grammar_accepts import accepts
from specserve.gateway import GatewayConfig
from specserve.structured.engine_grammar import OBJECTS_KEYWORD, STRICT_KEYWORD

SCHEMA = {"type": "object", "properties": {"reasoning": {"type": "string"},
                                           "answer": {"type": "integer"}},
          "required": ["reasoning", "answer"]}


def _chat(response_format: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **extra}
    if response_format is not None:
        body["response_format"] = response_format
    return body


def _json_schema(strict: bool | None) -> dict[str, Any]:
    js: dict[str, Any] = {"name": "r", "schema": SCHEMA}
    if strict is not None:
        js["strict"] = strict
    return {"type": "json_schema", "json_schema": js}


def test_the_engine_reads_the_keyword_as_the_strict_contract() -> None:
    marked = {**SCHEMA, STRICT_KEYWORD: True}
    in_order, reordered = '{"reasoning":"r","answer":1}', '{"answer":1,"reasoning":"r"}'
    extra = '{"reasoning":"r","answer":1,"note":"x"}'
    assert accepts(marked, in_order)
    assert not accepts(marked, reordered) and not accepts(marked, extra)
    # Without it: any order, declared keys only (the default), or any key where asked.
    assert accepts(SCHEMA, in_order) and accepts(SCHEMA, reordered) and not accepts(SCHEMA, extra)
    assert accepts({**SCHEMA, OBJECTS_KEYWORD: "open"}, extra)
    assert not accepts(SCHEMA, '{"answer":1}')  # the schema still holds
    assert accepts({**SCHEMA, STRICT_KEYWORD: False}, reordered)


def test_the_gateway_forwards_strict_as_the_schema_keyword() -> None:
    async def main() -> list[dict[str, Any]]:
        with running_fake_engine() as (url, state):
            async with in_process_gateway(GatewayConfig(replicas=[url])) as (client, _):
                for body in (_chat(_json_schema(True)), _chat(_json_schema(False)),
                             _chat(_json_schema(None)),
                             _chat(structured_outputs={"json": SCHEMA})):
                    response = await client.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text
            return list(state.requests)

    strict, loose, unset, vllm_field = asyncio.run(main())
    assert strict["response_format"]["json_schema"]["schema"] == {**SCHEMA, STRICT_KEYWORD: True}
    assert strict["response_format"]["json_schema"]["strict"] is True
    assert strict["messages"] == [{"role": "user", "content": "hi"}]  # the rest as sent
    for body in (loose, unset):
        assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert vllm_field["structured_outputs"] == {"json": SCHEMA}
