"""The token-counted prompt cap (``max_prompt_tokens``): pure helpers, then the routes over a fake engine.

The fake engine's ``/tokenize`` counts one token per word.
"""

from __future__ import annotations

import asyncio
import doctest
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.commands.gateway import add_arguments, gateway_config
from specserve.gateway import GatewayConfig
from specserve.gateway import prompt_tokens
from specserve.gateway.prompt_tokens import (
    TokenCount,
    chat_tokenize_body,
    completion_prompts,
    kept_tokens,
    largest_prompt,
)

from gateway_fake_engine import MODEL, FakeState, in_process_gateway, running_fake_engine

CAP = 5
SHORT = "one two three"
LONG = "one two three four five six seven"  # 7 words: over the cap


def test_doctests() -> None:
    result = doctest.testmod(prompt_tokens)
    assert result.failed == 0 and result.attempted > 0


def test_chat_tokenize_body_keeps_what_changes_the_rendered_prompt() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": True,
            "add_generation_prompt": False, "tools": tools, "chat_template_kwargs": {"x": 1},
            "documents": [{"title": "t"}], "temperature": 0.5}
    assert chat_tokenize_body(body) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False,
        "tools": tools, "chat_template_kwargs": {"x": 1, "documents": [{"title": "t"}]}}


def test_completion_prompts_and_truncation() -> None:
    assert completion_prompts([[1, 2], [3]]) == [[1, 2], [3]]
    assert completion_prompts([]) == []
    assert kept_tokens(10, 0) == 0
    assert kept_tokens(10, -1) == 10  # no context length known: all kept
    assert kept_tokens(10, True) == 10


def test_largest_prompt_counts_token_ids_without_the_engine() -> None:
    async def never(body: dict[str, Any]) -> TokenCount:
        raise AssertionError(f"tokenize called with {body}")

    async def main() -> None:
        ids = {"model": "m", "prompt": [[1] * 3, [2] * 8, [3]]}
        assert await largest_prompt("completions", ids, never, cap=CAP) == 8
        assert await largest_prompt("completions", {"model": "m", "prompt": [7] * 4}, never, cap=CAP) == 4
        # The engine keeps at most truncate_prompt_tokens <= cap tokens: nothing to count.
        truncated = {"model": "m", "messages": [{"role": "user", "content": LONG}], "truncate_prompt_tokens": 3}
        assert await largest_prompt("chat", truncated, never, cap=CAP) == 3

    asyncio.run(main())


def test_largest_prompt_stops_after_a_batch_over_the_cap() -> None:
    seen: list[str] = []

    async def words(body: dict[str, Any]) -> TokenCount:
        seen.append(body["prompt"])
        return TokenCount(len(body["prompt"].split()), max_model_len=6)

    async def main() -> None:
        many = {"model": "m", "prompt": [LONG] + [SHORT] * 20}
        assert await largest_prompt("completions", many, words, cap=CAP) == 7
        assert len(seen) == 8  # one batch, not all 21 prompts
        seen.clear()
        clipped = {"model": "m", "prompt": LONG, "truncate_prompt_tokens": -1}
        assert await largest_prompt("completions", clipped, words, cap=CAP) == 6  # max_model_len kept

    asyncio.run(main())


def test_the_flag_reaches_the_config() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--replica", "http://e:8000", "--max-prompt-tokens", "4096"])
    assert gateway_config(args, args.replica).max_prompt_tokens == 4096
    args = parser.parse_args(["--replica", "http://e:8000"])
    assert gateway_config(args, args.replica).max_prompt_tokens == 0


@pytest.fixture()
def fake() -> Iterator[tuple[str, FakeState]]:
    with running_fake_engine() as pair:
        yield pair


@asynccontextmanager
async def gateway(url: str, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    config = GatewayConfig(**{"replicas": [url], "max_prompt_tokens": CAP, **overrides})
    async with in_process_gateway(config) as (client, _):
        yield client


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def completion(prompt: object, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 2, **extra}


def too_long(response: httpx.Response, param: str, tokens: int) -> None:
    assert response.status_code == 400, response.text
    assert response.json() == {"error": {
        "message": f"The prompt is too long: it has {tokens} tokens, at most {CAP} are accepted.",
        "type": "invalid_request_error", "param": param, "code": "context_length_exceeded"}}


async def rejected_too_long(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "specserve_gateway_rejected_requests"
               for s in f.samples if s.labels.get("reason") == "prompt_too_long")


def test_chat_under_the_cap_passes_and_over_it_is_a_400(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> None:
        async with gateway(url) as client:
            ok = await client.post("/v1/chat/completions", json=chat(SHORT, continue_final_message=True,
                                                                      add_generation_prompt=False))
            assert ok.status_code == 200, ok.text
            assert state.tokenize_requests == [{
                "model": MODEL, "messages": [{"role": "user", "content": SHORT}],
                "continue_final_message": True, "add_generation_prompt": False}]
            assert len(state.requests) == 1
            at_cap = await client.post("/v1/chat/completions", json=chat("a b c d e"))
            assert at_cap.status_code == 200
            for stream in (False, True):
                too_long(await client.post("/v1/chat/completions", json=chat(LONG, stream=stream)),
                         "messages", 7)
            assert len(state.requests) == 2  # the long ones never reached the engine
            assert await rejected_too_long(client) == 2

    asyncio.run(main())


def test_completions_count_the_largest_prompt(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> None:
        async with gateway(url) as client:
            assert (await client.post("/v1/completions", json=completion(SHORT))).status_code == 200
            assert state.tokenize_requests[-1] == {"model": MODEL, "prompt": SHORT}
            too_long(await client.post("/v1/completions", json=completion(LONG)), "prompt", 7)
            too_long(await client.post("/v1/completions", json=completion([SHORT, LONG, SHORT])), "prompt", 7)
            ok = await client.post("/v1/completions", json=completion([SHORT, "a b"], add_special_tokens=False))
            assert ok.status_code == 200
            assert state.tokenize_requests[-2:] == [
                {"model": MODEL, "prompt": SHORT, "add_special_tokens": False},
                {"model": MODEL, "prompt": "a b", "add_special_tokens": False}]
            counted = len(state.tokenize_requests)
            assert (await client.post("/v1/completions", json=completion([1, 2, 3]))).status_code == 200
            too_long(await client.post("/v1/completions", json=completion(list(range(9)))), "prompt", 9)
            too_long(await client.post("/v1/completions", json=completion([[1], [2] * 6])), "prompt", 6)
            assert len(state.tokenize_requests) == counted  # token ids: no round trip
            assert await rejected_too_long(client) == 4

    asyncio.run(main())


@pytest.mark.parametrize("failure", ["status", "timeout"])
def test_a_failed_count_lets_the_request_through(
    fake: tuple[str, FakeState], failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, state = fake
    if failure == "status":
        state.tokenize_status = 500
    else:
        state.tokenize_delay_s = 2.0

    async def main() -> None:
        # request_timeout_s also bounds the /tokenize call.
        async with gateway(url, request_timeout_s=0.5) as client:
            with caplog.at_level(logging.WARNING, logger="specserve.gateway.routes"):
                r = await client.post("/v1/chat/completions", json=chat(LONG),
                                      headers={"x-request-id": "uncounted-1"})
            assert r.status_code == 200, r.text
            assert await rejected_too_long(client) == 0
        assert len(state.tokenize_requests) == 1 and len(state.requests) == 1
        warnings = [rec for rec in caplog.records if rec.getMessage().startswith("prompt not counted")]
        assert len(warnings) == 1
        assert warnings[0].fields["request_id"] == "uncounted-1"  # type: ignore[attr-defined]

    asyncio.run(main())


def test_no_cap_no_count(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> None:
        async with gateway(url, max_prompt_tokens=0) as client:
            assert (await client.post("/v1/chat/completions", json=chat(LONG * 10))).status_code == 200
            assert (await client.post("/v1/completions", json=completion(LONG * 10))).status_code == 200
        assert state.tokenize_requests == [] and len(state.requests) == 2

    asyncio.run(main())


def test_counting_leaves_the_round_robin_of_equal_replicas_alone() -> None:
    async def main(urls: list[str]) -> None:
        async with gateway(urls[0], replicas=urls) as client:
            for _ in range(4):
                assert (await client.post("/v1/chat/completions", json=chat(SHORT))).status_code == 200

    with running_fake_engine() as (url_a, state_a), running_fake_engine() as (url_b, state_b):
        asyncio.run(main([url_a, url_b]))
    assert (len(state_a.requests), len(state_b.requests)) == (2, 2)
    assert len(state_a.tokenize_requests) + len(state_b.tokenize_requests) == 4
