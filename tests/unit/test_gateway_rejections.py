"""Each refused request is counted once, under the reason its error carries (in-process gateway)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.gateway import GatewayConfig

from support.gateway_fake_engine import MODEL, FakeState, running_fake_engine
from support.gateway_fake_engine import in_process_gateway as gateway

KEY = {"Authorization": "Bearer sk-test"}


@pytest.fixture()
def fake() -> Iterator[tuple[str, FakeState]]:
    with running_fake_engine() as pair:
        yield pair


def chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


async def rejections(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            if f.name == "specserve_gateway_rejected_requests"
            for s in f.samples if s.name.endswith("_total")}


def test_each_refusal_counts_once_under_its_reason(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    config = GatewayConfig(replicas=[url], api_keys=("sk-test",), max_body_bytes=4096,
                           max_tokens_cap=10, max_prompt_chars=1000)
    cases = [
        ("auth", 401, chat(), {}),
        ("body_too_large", 413, chat("x" * 5000), KEY),
        ("unsupported_param", 400, chat(audio={"voice": "alloy"}), KEY),
        ("max_tokens", 400, chat(max_tokens=50), KEY),
        ("prompt_too_long", 400, chat("x" * 1500), KEY),
        ("invalid_tools", 400, chat(tool_choice="required"), KEY),
    ]

    async def main() -> None:
        async with gateway(config) as (client, _):
            for reason, status, body, headers in cases:
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                assert r.status_code == status, (reason, r.text)
            # Neither an answered request nor an unknown model is a rejection.
            assert (await client.post("/v1/chat/completions", json=chat(), headers=KEY)).status_code == 200
            unknown = await client.post("/v1/chat/completions", json={**chat(), "model": "nope"}, headers=KEY)
            assert unknown.status_code == 404
            assert await rejections(client) == {reason: 1.0 for reason, *_ in cases}

    asyncio.run(main())
    assert len(state.requests) == 1
