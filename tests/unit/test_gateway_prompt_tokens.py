"""The token-counted prompt cap (``max_prompt_tokens``): pure helpers, then the routes over a fake engine,
then what the per-key token rate limit charges for counted prompts.

The fake engine's ``/tokenize`` counts one token per word.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.commands.gateway import add_arguments, gateway_config
from specserve.gateway import GatewayConfig
from specserve.gateway.config import KeyLimits
from specserve.gateway.limits import charged_tokens
from specserve.gateway.prompt_tokens import (
    PromptCount,
    TokenCount,
    chat_tokenize_body,
    completion_prompts,
    count_prompts,
    kept_tokens,
)

from support.gateway_fake_engine import MODEL, FakeState, in_process_gateway, running_fake_engine

CAP = 5
SHORT = "one two three"
LONG = "one two three four five six seven"  # 7 words: over the cap


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


def test_count_prompts_counts_token_ids_without_the_engine() -> None:
    async def never(body: dict[str, Any]) -> TokenCount:
        raise AssertionError(f"tokenize called with {body}")

    async def main() -> None:
        ids = {"model": "m", "prompt": [[1] * 3, [2] * 8, [3]]}
        assert await count_prompts("completions", ids, never, cap=CAP) == PromptCount(8, 12)
        assert await count_prompts("completions", {"model": "m", "prompt": [7] * 4}, never, cap=CAP) == \
            PromptCount(4, 4)
        # The engine keeps at most truncate_prompt_tokens <= cap tokens: nothing to count, total unknown.
        truncated = {"model": "m", "messages": [{"role": "user", "content": LONG}], "truncate_prompt_tokens": 3}
        assert await count_prompts("chat", truncated, never, cap=CAP) == PromptCount(3, None)

    asyncio.run(main())


def test_count_prompts_stops_after_a_batch_over_the_cap() -> None:
    seen: list[str] = []

    async def words(body: dict[str, Any]) -> TokenCount:
        seen.append(body["prompt"])
        return TokenCount(len(body["prompt"].split()), max_model_len=6)

    async def main() -> None:
        many = {"model": "m", "prompt": [LONG] + [SHORT] * 20}
        assert await count_prompts("completions", many, words, cap=CAP) == PromptCount(7, None)
        assert len(seen) == 8  # one batch, not all 21 prompts
        seen.clear()
        clipped = {"model": "m", "prompt": LONG, "truncate_prompt_tokens": -1}
        assert await count_prompts("completions", clipped, words, cap=CAP) == PromptCount(6, 6)  # max_model_len
        seen.clear()
        several = {"model": "m", "prompt": [SHORT] * 10 + [[1, 2]]}  # two batches of text
        assert await count_prompts("completions", several, words, cap=CAP) == PromptCount(3, 32)
        assert len(seen) == 10

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


async def rejected_rate_limit(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "specserve_gateway_rejected_requests"
               for s in f.samples if s.labels.get("reason") == "rate_limit" and s.name.endswith("_total"))


async def count_failures(client: httpx.AsyncClient) -> float:
    """``specserve_gateway_prompt_token_count_failures_total`` from the gateway's /metrics."""
    text = (await client.get("/metrics")).text
    values = [s.value for f in text_string_to_metric_families(text)
              if f.name == "specserve_gateway_prompt_token_count_failures"
              for s in f.samples if s.name == "specserve_gateway_prompt_token_count_failures_total"]
    assert len(values) == 1, text
    return values[0]


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
            assert await count_failures(client) == 0

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
            # The prompts of a list are counted concurrently: either may reach the engine first.
            assert sorted(state.tokenize_requests[-2:], key=lambda r: r["prompt"]) == [
                {"model": MODEL, "prompt": "a b", "add_special_tokens": False},
                {"model": MODEL, "prompt": SHORT, "add_special_tokens": False}]
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
            assert await count_failures(client) == 1
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


def test_charged_tokens_prefers_the_exact_count() -> None:
    assert charged_tokens(prompt_chars=400, max_tokens=2, n=1) == 102
    assert charged_tokens(prompt_chars=400, max_tokens=2, n=1, prompt_tokens=1) == 3
    assert charged_tokens(prompt_chars=400, max_tokens=2, n=3, prompt_tokens=0) == 6  # 0 is a count


async def statuses(client: httpx.AsyncClient, path: str, body: dict[str, Any], times: int) -> list[int]:
    return [(await client.post(path, json=body)).status_code for _ in range(times)]


# Prompts whose exact count is far from the characters / 4 estimate: one 400-character word (1
# token, estimated 100) and five one-letter words (5 tokens, estimated 2).
ONE_LONG_WORD = "x" * 400
FIVE_WORDS = "a b c d e"


@pytest.mark.parametrize(("content", "budget", "expected", "counted"), [
    # 1 + 2 tokens a request: all fit (estimated, 102 a request: the second is refused).
    (ONE_LONG_WORD, 30, [200, 200, 200], 3),
    # 5 + 2 tokens a request: the third is refused (estimated, 2 + 2: all fit). The window is
    # then full (14 of 14), so the third is refused before its prompt is counted.
    (FIVE_WORDS, 14, [200, 200, 429], 2),
])
def test_rate_limit_charges_the_exact_prompt_count(
    fake: tuple[str, FakeState], content: str, budget: int, expected: list[int], counted: int
) -> None:
    url, state = fake

    async def main() -> None:
        async with gateway(url, key_limits=KeyLimits(tokens_per_minute=budget)) as client:
            assert await statuses(client, "/v1/chat/completions", chat(content), 3) == expected
        assert len(state.tokenize_requests) == counted

    asyncio.run(main())


def test_rate_limit_charges_all_prompts_of_a_list(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    # 5 + 5 prompt tokens + 2 generated for each prompt = 14 a request: the second is over 26
    # (the largest prompt alone: 7; prompts summed but generation charged once: 12, so the third;
    # estimated: 18 // 4 + 4 = 8).
    body = completion([FIVE_WORDS, FIVE_WORDS])

    async def main() -> None:
        async with gateway(url, key_limits=KeyLimits(tokens_per_minute=26)) as client:
            assert await statuses(client, "/v1/completions", body, 3) == [200, 429, 429]

    asyncio.run(main())


@pytest.mark.parametrize("counted", ["off", "failed"])
def test_rate_limit_estimates_an_uncounted_prompt(fake: tuple[str, FakeState], counted: str) -> None:
    url, state = fake
    state.tokenize_status = 500  # only reached when the cap is on
    cap = CAP if counted == "failed" else 0

    async def main() -> None:
        async with gateway(url, max_prompt_tokens=cap, key_limits=KeyLimits(tokens_per_minute=30)) as client:
            # 400 // 4 + 2 = 102 a request: the first fits an empty window, the second does not
            # (and, the window being spent, is refused before its prompt is counted).
            assert await statuses(client, "/v1/chat/completions", chat(ONE_LONG_WORD), 2) == [200, 429]
            assert await count_failures(client) == (1 if counted == "failed" else 0)
        assert len(state.tokenize_requests) == (1 if counted == "failed" else 0)

    asyncio.run(main())


def test_a_spent_key_is_refused_before_its_prompt_is_counted(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> None:
        async with gateway(url, key_limits=KeyLimits(requests_per_minute=2)) as client:
            assert await statuses(client, "/v1/chat/completions", chat(FIVE_WORDS), 4) == [200, 200, 429, 429]
            assert await rejected_rate_limit(client) == 2
        assert len(state.tokenize_requests) == 2  # only the admitted ones were counted

    asyncio.run(main())
