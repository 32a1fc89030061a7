"""``specserve bench soak``: registered, arguments, the mix, and how each answer is judged.

Answers come from an in-process ``httpx.MockTransport`` (the real soak runs in
``tests/e2e/test_soak.py``); the gateway's ``--health-timeout`` flag reaches the probe timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import doctest
import json
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from specserve.bench import soak, soak_traffic
from specserve.bench.soak_traffic import Outcome, Traffic
from specserve.commands.bench import BENCHES


def test_registered_and_parses() -> None:
    assert BENCHES["soak"][0] == "soak"
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    config = soak.config_from_args(parser.parse_args(["--duration", "30", "--concurrency", "2"]))
    assert (config.duration_s, config.concurrency, config.drafter) == (30.0, 2, "hydra")
    assert soak.config_from_args(parser.parse_args([])).duration_s == 600.0


def test_doctests() -> None:
    assert doctest.testmod(soak_traffic).failed == 0


def test_the_soak_uses_serve_default_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECSERVE_SPEC_POLICY", raising=False)
    assert soak.serve_default_policy() == "fixed"
    monkeypatch.setenv("SPECSERVE_SPEC_POLICY", "goodput")
    assert soak.serve_default_policy() == "goodput"


def test_every_deck_of_draws_holds_each_kind_by_weight() -> None:
    traffic = Traffic("m", {}, random.Random(3))
    for _ in range(3):
        deck = Counter(traffic.draw() for _ in range(traffic.deck_size))
        assert deck == {name: weight for name, (weight, _) in traffic.kinds.items()}


def _run(kind: str, handler: Callable[[httpx.Request], httpx.Response], reference: dict[str, str] | None = None) -> Outcome:
    traffic = Traffic("m", reference or {}, random.Random(0))

    async def main() -> Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://gw") as client:
            return await traffic.kinds[kind][1](client)

    return asyncio.run(main())


def _json(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, json=body)


def _error(status: int) -> httpx.Response:
    return _json(status, {"error": {"message": "m", "type": "t", "param": None, "code": None}})


def test_greedy_answers_are_compared_with_the_reference() -> None:
    reference = {f"completion:{i}": "same" for i in range(len(soak_traffic.COMPLETION_PROMPTS))}
    ok = _run("greedy_completion", lambda r: _json(200, {"choices": [{"text": "same"}]}), reference)
    assert ok == Outcome("ok", 200)
    wrong = _run("greedy_completion", lambda r: _json(200, {"choices": [{"text": "other"}]}), reference)
    assert wrong.label == "greedy_mismatch"
    assert _run("greedy_completion", lambda r: _error(502), reference).server_error


def _sse(*events: dict[str, Any]) -> httpx.Response:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})


def test_streamed_greedy_text_is_joined_and_an_error_event_is_a_server_error() -> None:
    reference = {f"chat:{i}": "ab" for i in range(len(soak_traffic.CHAT_PROMPTS))}
    chunks = [{"choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in "ab"]
    assert _run("greedy_chat_stream", lambda r: _sse(*chunks), reference).label == "ok"
    failed = _run("greedy_chat_stream", lambda r: _sse(chunks[0], {"error": {"code": "engine_failed"}}), reference)
    assert failed.label == "stream_error" and failed.server_error


def test_structured_outputs_are_validated_against_their_schema() -> None:
    def answer(content: str) -> Callable[[httpx.Request], httpx.Response]:
        return lambda r: _json(200, {"choices": [{"message": {"content": content}, "finish_reason": "stop"}]})

    valid = {"name": "x", "ok": True, "color": "red", "tags": ["a"], "kind": "x"}
    for schema in soak_traffic.SCHEMAS:  # a valid object per schema: the fields it names
        item = {k: valid[k] for k in schema["properties"]}
        assert _run_with_schema(schema, answer(json.dumps(item))).label == "ok"
        assert _run_with_schema(schema, answer(json.dumps({**item, "extra": 1}))).label == "invalid_structured_output"
        assert _run_with_schema(schema, answer('{"name": ')).label == "invalid_structured_output"


def _run_with_schema(schema: dict[str, Any], handler: Callable[[httpx.Request], httpx.Response]) -> Outcome:
    index = soak_traffic.SCHEMAS.index(schema)

    def checked(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)["response_format"]["json_schema"]["schema"]
        return handler(request) if sent == schema else _error(418)

    # The schema is the request's first draw: find a seed whose first draw picks this one.
    seed = next(s for s in range(50) if random.Random(s).randrange(len(soak_traffic.SCHEMAS)) == index)

    async def main() -> Outcome:
        traffic = Traffic("m", {}, random.Random(seed))
        async with httpx.AsyncClient(transport=httpx.MockTransport(checked), base_url="http://gw") as client:
            return await traffic.json_schema(client)

    return asyncio.run(main())


def test_bad_requests_need_an_openai_shaped_4xx() -> None:
    assert _run("bad_request", lambda r: _error(400)) == Outcome("ok", 400)
    assert _run("bad_request", lambda r: _json(400, {"detail": "no"})).label == "bad_error_shape"
    assert _run("bad_request", lambda r: _error(500)).server_error


def test_sampled_n2_needs_two_finished_choices() -> None:
    two = {"choices": [{"index": 0, "text": "a", "finish_reason": "length"},
                       {"index": 1, "text": "b", "finish_reason": "stop"}]}
    assert _run("sampled_n2", lambda r: _json(200, two)).label == "ok"
    assert _run("sampled_n2", lambda r: _json(200, {"choices": two["choices"][:1]})).label == "bad_answer"


def test_tally_and_summary() -> None:
    tally = soak.Tally()
    tally.add("a", Outcome("ok", 200))
    tally.add("b", Outcome("server_error", 503, "x"))
    assert (tally.requests, tally.server_errors, tally.count("ok")) == (2, 1, 1)
    assert tally.failures == [{"kind": "b", "label": "server_error", "status": 503, "detail": "x"}]


def test_health_timeout_flag_reaches_the_probe() -> None:
    from specserve.commands.gateway import add_arguments, gateway_config
    from prometheus_client import CollectorRegistry

    from specserve.gateway.state import Gateway
    from specserve.gateway.metrics import GatewayMetrics

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert gateway_config(parser.parse_args(["--replica", "http://e:1"]), ["http://e:1"]).health_timeout_s == 5.0
    args = parser.parse_args(["--replica", "http://e:1", "--health-timeout", "42"])
    config = gateway_config(args, args.replica)
    gateway = Gateway(config, GatewayMetrics(CollectorRegistry()))
    assert (gateway.pool.timeout.read, gateway.pool.timeout.connect) == (42.0, 2.0)
