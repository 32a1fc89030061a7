"""Tool calling around the engine: the pre-check of tool definitions, the strict reading of a
forced tool, the serve flags, the demo chat template, and how answers' calls are checked."""

from __future__ import annotations

import json
from typing import Any

import pytest

from specserve.commands.serve import tool_options
from specserve.demo.spec import CHAT_TEMPLATE
from specserve.engine.process import EngineSpec, engine_command
from specserve.errors import APIError
from specserve.gateway.tools import Call, StreamedCalls, ToolRequest, failures, tool_request
from specserve.structured.engine_grammar import STRICT_KEYWORD
from specserve.structured.tools import mark_strict_tools, tool_choice_kind
from support.schema_precheck import precheck

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"], "additionalProperties": False}


def _tool(name: str = "get_weather", parameters: Any = WEATHER, **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters, **extra}}


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def _refused(body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(APIError) as info:
        precheck({"messages": [{"role": "user", "content": "hi"}], **body}, "chat")
    assert info.value.status == 400
    return info.value.body()["error"]


def test_good_tools_pass_the_precheck() -> None:
    precheck({"tools": [_tool(), _tool("noop", None)], "tool_choice": _named("get_weather")}, "chat")
    precheck({"tools": [_tool()], "tool_choice": "required"}, "chat")
    precheck({"tools": [_tool()]}, "chat")


def test_a_bad_parameters_schema_is_a_400_naming_the_tool_and_the_schema_path() -> None:
    bad = {"type": "object", "properties": {"city": {"type": "string", "pattern": "a{1,99999}"}}}
    error = _refused({"tools": [_tool("ok"), _tool("get_weather", bad)], "tool_choice": "auto"})
    assert error["param"] == "tools[1].function.parameters"
    assert error["code"] == "invalid_function_parameters"
    assert "/properties/city/pattern" in error["message"]
    dangling = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    error = _refused({"tools": [_tool(parameters=dangling)]})
    assert error["param"] == "tools[0].function.parameters" and "/properties/a" in error["message"]
    error = _refused({"tools": [_tool(parameters={"type": "object", "properties": {"x": {"type": "strin"}}})]})
    assert error["param"] == "tools[0].function.parameters"


def test_bad_envelopes_are_400s() -> None:
    assert _refused({"tools": [_tool("has space")]})["param"] == "tools[0].function.name"
    assert _refused({"tools": [_tool(), _tool()]})["param"] == "tools[1].function.name"
    assert _refused({"tools": [_tool()], "tool_choice": _named("other")})["param"] == "tool_choice.function.name"
    assert _refused({"tool_choice": "required"})["param"] == "tool_choice"
    assert _refused({"tools": [_tool()], "tool_choice": {"type": "function"}})["param"] == "tool_choice"


def test_tool_choice_kinds() -> None:
    assert tool_choice_kind({"tools": [_tool()]}) == "auto"
    assert tool_choice_kind({"tools": [_tool()], "tool_choice": "none"}) == "none"
    assert tool_choice_kind({"tools": [_tool()], "tool_choice": _named("get_weather")}) == "named"


def test_a_forced_strict_tool_gets_the_strict_reading_only_when_forced() -> None:
    body = {"tools": [_tool(strict=True), _tool("other", strict=True)], "tool_choice": _named("get_weather")}
    marked = mark_strict_tools(body)
    assert marked["tools"][0]["function"]["parameters"][STRICT_KEYWORD] is True
    assert STRICT_KEYWORD not in marked["tools"][1]["function"]["parameters"]
    assert STRICT_KEYWORD not in body["tools"][0]["function"]["parameters"]  # a copy
    unforced = {"tools": [_tool(strict=True)], "tool_choice": "required"}
    assert mark_strict_tools(unforced) is unforced
    not_strict = {"tools": [_tool()], "tool_choice": _named("get_weather")}
    assert mark_strict_tools(not_strict) is not_strict


def test_serve_turns_tools_on_for_the_demo_model_and_passes_the_flags() -> None:
    demo = tool_options(None, None, None, is_demo=True)
    assert (demo.parser, demo.auto) == ("specserve", True)
    assert tool_options(None, None, None, is_demo=False).parser is None
    assert tool_options("none", None, None, is_demo=True).parser is None
    hermes = tool_options("hermes", False, None, is_demo=False)
    cmd = engine_command(EngineSpec(model="/m", port=1, served_model_name="m", tool_call_parser=hermes.parser,
                                    enable_auto_tool_choice=hermes.auto, tool_parser_plugin=hermes.plugin,
                                    chat_template="/t.jinja"), python="py")
    joined = " ".join(cmd)
    assert "--tool-call-parser hermes" in joined and "--enable-auto-tool-choice" not in cmd
    assert "--tool-parser-plugin specserve_vllm.compat.tool_parser" in joined
    assert "--chat-template /t.jinja" in joined
    plain = engine_command(EngineSpec(model="/m", port=1, served_model_name="m"), python="py")
    assert not any(a.startswith("--tool") for a in plain)


def _render(messages: list[dict[str, Any]], **kw: Any) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True, **kw)


def test_the_demo_template_renders_tools_calls_and_results() -> None:
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert _render(plain) == "<|system|>\ns<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    dict_args = {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    for c in (call, dict_args):  # vLLM hands the template parsed arguments
        text = _render([{"role": "user", "content": "weather?"},
                        {"role": "assistant", "content": None, "tool_calls": [c]},
                        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], tools=[_tool()])
        assert text.startswith("<|system|>\nYou can call these tools.")
        assert '"name": "get_weather"' in text.split("<|end|>")[0]
        assert ('<|assistant|>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
                '<|end|>\n<|tool|>\nsunny<|end|>\n<|assistant|>\n') in text


def test_failures_of_answers() -> None:
    req = ToolRequest("required", {"get_weather": WEATHER, "noop": None})
    assert failures(req, []) == ["no_call"]
    assert failures(ToolRequest("auto", req.parameters), []) == []
    assert failures(req, [Call("get_weather", '{"city": "Paris"}'), Call("noop", "{}")]) == []
    assert failures(req, [Call("nope", "{}")]) == ["unknown_tool"]
    assert failures(req, [Call("get_weather", '{"city": "Par')]) == ["arguments"]
    assert failures(req, [Call("get_weather", "[1]")]) == ["arguments"]
    assert failures(req, [Call("get_weather", '{"city": 3}')]) == ["schema"]
    assert tool_request({"tools": [_tool()], "tool_choice": "required"}) == ToolRequest(
        "required", {"get_weather": WEATHER})


def test_streamed_calls_join_fragments_split_anywhere() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "1}"}},
            {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for size in (1, 7, len(raw)):
        collected = StreamedCalls()
        for i in range(0, len(raw), size):
            collected.feed(raw[i:i + size])
        assert collected.by_choice() == [[Call("f", '{"x": 1}'), Call("g", "{}")]]
