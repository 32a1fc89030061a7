"""Tool calling through ``specserve serve`` (the demo model, its default parser) with real clients.

One server for the module: the ``openai`` SDK with ``tool_choice`` named, ``required`` and
``auto``, streaming and not; a tool-result round trip; bad tool definitions refused with an
OpenAI-shaped 400; LangChain's ``with_structured_output(method="function_calling")`` and
instructor's ``Mode.TOOLS`` each returning a validated object; the gateway's tool metrics.

Under ``auto`` the demo model (tuned on tool-call chats) calls a tool when the ask plainly wants
one and answers in text otherwise; with a ``strict`` tool the call is held to the tool's schema
once it starts. Two tests also force the model's own ``<tool_call>`` format with a regex, to check
the parser on parallel calls, which the model does not reliably make on its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict

from support.specserve_process import MODEL_NAME, ServeProcess, running_specserve

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# What the demo model calls a tool for under ``auto`` (it was tuned on asks like these).
CALL_ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
PLAIN_ASK = [{"role": "user", "content": "Hello!"}]
STRICT_TOOLS = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MAX_TOKENS = 120
# The model's own call format, forced for tool_choice auto (see the module doc).
CALL_REGEX = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET|PST)"\}\}</tool_call>'
TWO_CALLS_REGEX = (CALL_REGEX + r'<tool_call>\{"name": "get_weather", "arguments": '
                   r'\{"city": "(Paris|Rome|Oslo)", "days": [1-7]\}\}</tool_call>')


class Weather(BaseModel):
    """What LangChain and instructor ask for (closed, as their strict modes would make it)."""

    model_config = ConfigDict(extra="forbid")
    city: str
    days: int


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with running_specserve(demo_model_dir, log_dir=tmp_path_factory.mktemp("tools")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _create(client: openai.OpenAI, **kw: Any) -> Any:
    args: dict[str, Any] = {"model": MODEL_NAME, "messages": ASK, "tools": TOOLS, "temperature": 0,
                            "max_tokens": MAX_TOKENS}
    return client.chat.completions.create(**{**args, **kw})


def _assert_valid(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _stream(client: openai.OpenAI, **kw: Any) -> dict[str, Any]:
    """A streamed answer's chunks, the calls joined from its deltas, its finish reason and usage."""
    chunks = list(_create(client, stream=True, stream_options={"include_usage": True}, **kw))
    calls: dict[int, dict[str, Any]] = {}
    finish, content = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": "", "deltas": 0})
                call["deltas"] += 1
                if delta.id:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    assert call["name"] is None, "a call's name comes once"
                    call["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, "usage comes in the last chunk"
    return {"calls": [calls[i] for i in sorted(calls)], "finish": finish, "usage": last.usage, "content": content}


def test_named_tool_choice_returns_a_call_that_validates(client: openai.OpenAI) -> None:
    r = _create(client, tool_choice=NAMED)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's finish reason for a forced function
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _assert_valid(choice.message.tool_calls)
    assert not choice.message.content


def test_named_tool_choice_streams_the_same_call(client: openai.OpenAI) -> None:
    whole = _create(client, tool_choice=NAMED).choices[0].message.tool_calls[0]
    streamed = _stream(client, tool_choice=NAMED)
    [call] = streamed["calls"]
    assert call["name"] == "get_weather" and call["id"]
    assert call["arguments"] == whole.function.arguments
    assert call["deltas"] > 2  # the arguments arrive in fragments
    assert streamed["finish"] == "stop" and streamed["usage"].completion_tokens > 0


def test_required_tool_choice_returns_calls_that_validate(client: openai.OpenAI) -> None:
    # parallel_tool_calls false: allowed more calls, the demo model repeats its call until max_tokens
    r = _create(client, tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    _assert_valid(choice.message.tool_calls)
    streamed = _stream(client, tool_choice="required", parallel_tool_calls=False)
    assert streamed["finish"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert all(c["id"] for c in streamed["calls"])


def test_auto_passes_a_plain_answer_through(client: openai.OpenAI) -> None:
    r = _create(client, messages=PLAIN_ASK, tool_choice="auto", max_tokens=24)
    choice = r.choices[0]
    assert choice.message.tool_calls in (None, []) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    streamed = _stream(client, messages=PLAIN_ASK, tool_choice="auto", max_tokens=24)
    assert streamed["calls"] == [] and streamed["content"] == choice.message.content


@pytest.mark.parametrize("tools", [TOOLS, STRICT_TOOLS], ids=["free", "strict"])
def test_auto_calls_the_tool_the_ask_wants(client: openai.OpenAI, tools: list[dict[str, Any]]) -> None:
    """The model decides: asked for the weather, it calls get_weather in its own format; the parser
    finds the call (the strict tools' grammar only holds a started call to the schema)."""
    r = _create(client, messages=CALL_ASK, tools=tools, tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _assert_valid(choice.message.tool_calls)
    assert not choice.message.content
    streamed = _stream(client, messages=CALL_ASK, tools=tools, tool_choice="auto")
    assert streamed["finish"] == "tool_calls" and not streamed["content"]
    [call] = streamed["calls"]
    assert call["name"] == "get_weather" and call["id"]
    assert json.loads(call["arguments"]) == json.loads(choice.message.tool_calls[0].function.arguments)


def test_auto_round_trip_without_forcing(client: openai.OpenAI) -> None:
    """Ask, the model's own call, the tool's result, the model's answer in text."""
    first = _create(client, messages=CALL_ASK, tools=STRICT_TOOLS, tool_choice="auto").choices[0]
    [call] = first.message.tool_calls
    messages = [*CALL_ASK, first.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id,
                 "content": json.dumps({"city": "Paris", "temperature": 24, "conditions": "sunny"})}]
    final = _create(client, messages=messages, tools=STRICT_TOOLS, tool_choice="auto", max_tokens=32).choices[0]
    assert final.message.content and not final.message.tool_calls
    assert final.finish_reason == "stop"


def test_auto_finds_a_call_in_the_models_format(client: openai.OpenAI) -> None:
    forced = {"structured_outputs": {"regex": CALL_REGEX}}
    r = _create(client, tool_choice="auto", extra_body=forced)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    _assert_valid(choice.message.tool_calls)
    assert not choice.message.content
    streamed = _stream(client, tool_choice="auto", extra_body=forced)
    assert streamed["finish"] == "tool_calls" and not streamed["content"]
    [call] = streamed["calls"]
    assert call["name"] == "get_time" and call["id"]
    assert json.loads(call["arguments"]) == json.loads(choice.message.tool_calls[0].function.arguments)


def test_auto_streams_parallel_calls_with_their_own_indices(client: openai.OpenAI) -> None:
    forced = {"structured_outputs": {"regex": TWO_CALLS_REGEX}}
    whole = _create(client, tool_choice="auto", extra_body=forced, max_tokens=200).choices[0]
    assert [c.function.name for c in whole.message.tool_calls] == ["get_time", "get_weather"]
    _assert_valid(whole.message.tool_calls)
    assert len({c.id for c in whole.message.tool_calls}) == 2
    streamed = _stream(client, tool_choice="auto", extra_body=forced, max_tokens=200)
    assert streamed["finish"] == "tool_calls"
    assert [c["name"] for c in streamed["calls"]] == ["get_time", "get_weather"]
    assert all(c["id"] for c in streamed["calls"]) and streamed["calls"][0]["id"] != streamed["calls"][1]["id"]
    assert [json.loads(c["arguments"]) for c in streamed["calls"]] == [
        json.loads(c.function.arguments) for c in whole.message.tool_calls]


def test_a_tool_result_round_trip(client: openai.OpenAI) -> None:
    call = _create(client, tool_choice=NAMED).choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C."},
    ]
    r = _create(client, messages=messages, tool_choice="auto", max_tokens=16,
                extra_body={"return_prompt_text": True})
    choice = r.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    prompt = r.model_extra["prompt_text"]
    arguments = json.dumps(json.loads(call.function.arguments))
    assert f'<tool_call>{{"name": "get_weather", "arguments": {arguments}}}</tool_call><|end|>' in prompt
    assert prompt.endswith("<|tool|>\nSunny, 24 C.<|end|>\n<|assistant|>\n")
    assert '"name": "get_time"' in prompt.split("<|end|>")[0]  # the tools were listed


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "a{1,99999}"}}}}}],
     "auto", "tools[0].function.parameters"),
    ([TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"y": {"$ref": "#/$defs/missing"}}}}}],
     "required", "tools[1].function.parameters"),
    ([TOOLS[0], TOOLS[0]], "auto", "tools[1].function.name"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
])
def test_bad_tool_definitions_are_openai_shaped_400s(client: openai.OpenAI, tools: list, choice: Any,
                                                     param: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        _create(client, tools=tools, tool_choice=choice)
    assert bad.value.status_code == 400
    body = bad.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"]
    if param.endswith("parameters"):
        assert body["code"] == "invalid_function_parameters"
        assert "/properties/" in body["message"]  # the schema path


def test_langchain_function_calling_returns_a_validated_object(server: ServeProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", model=MODEL_NAME, temperature=0,
                     max_tokens=MAX_TOKENS, max_retries=0, timeout=300)
    result = llm.with_structured_output(Weather, method="function_calling").invoke(ASK[0]["content"])
    assert isinstance(result, Weather)


def test_instructor_tools_mode_returns_a_validated_object(server: ServeProcess) -> None:
    import instructor

    raw = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
    result = client.chat.completions.create(model=MODEL_NAME, response_model=Weather, messages=ASK,
                                            temperature=0, max_tokens=MAX_TOKENS, max_retries=0)
    assert isinstance(result, Weather)


def _metric(server: ServeProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name.endswith("_total")
                         and all(s.labels.get(k) == v for k, v in labels.items()))
    return total


def _metric_when(expected: float, server: ServeProcess, name: str, **labels: str) -> float:
    """:func:`_metric` once it reaches ``expected``, or its value after 30 s."""
    deadline = time.monotonic() + 30
    value = _metric(server, name, **labels)
    while value < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = _metric(server, name, **labels)
    return value


def test_metrics_count_tool_requests_calls_and_failures(client: openai.OpenAI, server: ServeProcess) -> None:
    before = {kind: _metric(server, "specserve_gateway_tool_requests", tool_choice=kind)
              for kind in ("named", "required")}
    calls = _metric(server, "specserve_gateway_tool_calls", tool_choice="named")
    failed = _metric(server, "specserve_gateway_tool_call_failures", tool_choice="named", reason="arguments")
    _create(client, tool_choice=NAMED)
    _create(client, tool_choice="required", parallel_tool_calls=False)
    # cut short: the arguments cannot be complete JSON (streamed, to count from the SSE deltas)
    cut = _stream(client, tool_choice=NAMED, max_tokens=3)
    assert cut["finish"] == "length"
    assert _metric(server, "specserve_gateway_tool_requests", tool_choice="named") == before["named"] + 2
    assert _metric(server, "specserve_gateway_tool_requests", tool_choice="required") == before["required"] + 1
    # A stream's calls are counted when the gateway closes it, which can come after the client
    # read its last event: wait (bounded) for the counts the client's view implies. Three tokens
    # may or may not have reached a call delta; a call they reached has incomplete arguments.
    cut_calls = len(cut["calls"])
    assert _metric_when(calls + 1 + cut_calls, server, "specserve_gateway_tool_calls",
                        tool_choice="named") == calls + 1 + cut_calls
    assert _metric_when(failed + cut_calls, server, "specserve_gateway_tool_call_failures", tool_choice="named",
                        reason="arguments") == failed + cut_calls
    assert _metric(server, "specserve_gateway_tool_call_failures", reason="schema") == 0
