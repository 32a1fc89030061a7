"""The ``specserve`` tool parser inside vLLM's parser layer (no engine): registration, parsing of
whole and streamed answers, plain text passing through, and the upstream code it relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.tool_parsers.abstract_tool_parser import ToolParserManager  # noqa: E402

from specserve.structured.engine_grammar import STRICT_KEYWORD  # noqa: E402
from specserve_vllm.compat import tool_parser  # noqa: E402
from specserve_vllm.compat.upstream import UpstreamFunction  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("fn", tool_parser.UPSTREAM, ids=lambda fn: fn.qualname)
def test_upstream_source_unchanged(fn: UpstreamFunction) -> None:
    assert fn.digest() == fn.sha256, f"{fn.qualname} changed upstream: review the parser, record {fn.digest()}"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from specserve.demo import ARTIFACT_DIR

    return AutoTokenizer.from_pretrained(str(Path(ARTIFACT_DIR)))


def _request(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def _parser(tokenizer: Any, request: ChatCompletionRequest) -> Any:
    cls = ToolParserManager.get_tool_parser(tool_parser.PARSER_NAME)
    return cls(tokenizer, request.tools)


def _stream(parser: Any, request: ChatCompletionRequest, pieces: list[str], eos: bool = True) -> list[Any]:
    deltas, text = [], ""
    for i, piece in enumerate(pieces):
        ids = [parser.model_tokenizer.eos_token_id] if eos and i == len(pieces) - 1 else [7]
        delta = parser.extract_tool_calls_streaming(text, text + piece, piece, [], [], ids, request)
        text += piece
        if delta is not None:
            deltas.append(delta)
    return deltas


def test_registered_under_its_name_with_the_json_path_for_forced_calls() -> None:
    cls = ToolParserManager.get_tool_parser("specserve")
    assert cls is tool_parser.SpecserveToolParser
    assert cls.supports_required_and_named is True  # Hermes turns it off under strict tool calling
    tool_parser.register()  # idempotent
    assert ToolParserManager.get_tool_parser("specserve") is cls


def test_forced_calls_get_the_json_schema_and_keep_special_tokens_skipped(tokenizer: Any) -> None:
    request = _request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    adjusted = _parser(tokenizer, request).adjust_request(request)
    assert adjusted.structured_outputs.json == TOOLS[0]["function"]["parameters"]
    assert adjusted.skip_special_tokens is True
    required = _request(tools=TOOLS, tool_choice="required")
    schema = _parser(tokenizer, required).adjust_request(required).structured_outputs.json
    assert schema["type"] == "array" and schema["minItems"] == 1
    # each call's envelope is closed; the strict reading only when every tool asks for it
    assert [b["additionalProperties"] for b in schema["items"]["anyOf"]] == [False]
    assert STRICT_KEYWORD not in schema
    strict_tools = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    strict = _request(tools=strict_tools, tool_choice="required")
    assert _parser(tokenizer, strict).adjust_request(strict).structured_outputs.json[STRICT_KEYWORD] is True


def test_required_keeps_definitions_references_resolvable(tokenizer: Any) -> None:
    from specserve.bench.jsonschema_tools import output_valid
    from specserve.structured.engine_grammar import json_schema_ebnf

    params = {"type": "object", "properties": {"p": {"$ref": "#/definitions/point"}}, "required": ["p"],
              "additionalProperties": False,
              "definitions": {"point": {"type": "object", "properties": {"x": {"type": "integer"}},
                                        "required": ["x"], "additionalProperties": False}}}
    tools = [{"type": "function", "function": {"name": "tool", "parameters": params}}]
    request = _request(tools=tools, tool_choice="required")
    schema = _parser(tokenizer, request).adjust_request(request).structured_outputs.json
    assert schema["definitions"] == params["definitions"]
    json_schema_ebnf(json.dumps(schema))  # xgrammar resolves the reference from the root
    assert output_valid("required", '[{"name": "tool", "parameters": {"p": {"x": 1}}}]', params)


def test_whole_answers_with_calls_text_or_both(tokenizer: Any) -> None:
    request = _request(tools=TOOLS)
    parser = _parser(tokenizer, request)
    out = parser.extract_tool_calls(
        'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>', request)
    assert out.tools_called and out.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    plain = parser.extract_tool_calls("It is sunny.", request)
    assert not plain.tools_called and plain.content == "It is sunny."


def test_streamed_calls_arrive_as_name_then_argument_fragments(tokenizer: Any) -> None:
    request = _request(tools=TOOLS)
    pieces = ["Sure.", "<tool", '_call>{"name": "get_', 'weather", "arguments": {"ci', 'ty": "Pa', 'ris"}}',
              "</tool_call>"]
    deltas = _stream(_parser(tokenizer, request), request, pieces)
    content = "".join(d.content or "" for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls or []]
    assert content == "Sure."
    assert calls[0].function.name == "get_weather" and calls[0].id and calls[0].index == 0
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}


def test_plain_text_streams_unchanged_even_ending_in_a_tag_prefix(tokenizer: Any) -> None:
    pieces = ["if a ", "<", " b:", " x <"]
    for request in (_request(), _request(tools=TOOLS, tool_choice="none")):
        deltas = _stream(_parser(tokenizer, request), request, pieces, eos=False)
        assert "".join(d.content or "" for d in deltas) == "".join(pieces)
    # with tools offered, a possible tag is held back until it cannot be one, and flushed at the end
    request = _request(tools=TOOLS)
    deltas = _stream(_parser(tokenizer, request), request, pieces)
    assert "".join(d.content or "" for d in deltas) == "".join(pieces)


def test_a_tag_prefix_cut_by_max_tokens_is_flushed(tokenizer: Any) -> None:
    request = _request(tools=TOOLS, max_tokens=3)
    parser = _parser(tokenizer, request)
    pieces, text, ids, out = ["It is", " sunny", " <tool_ca"], "", [], ""
    for piece in pieces:  # one token each, no end-of-sequence: the answer stops at max_tokens
        ids.append(7)
        delta = parser.extract_tool_calls_streaming(text, text + piece, piece, ids[:-1], list(ids), [7], request)
        text += piece
        out += (delta.content or "") if delta is not None else ""
    assert out == "".join(pieces)


def _served_parser(tokenizer: Any, request: ChatCompletionRequest) -> Any:
    """vLLM's parser wrapper as its chat server builds it with ``--tool-call-parser specserve``."""
    from vllm.parser.parser_manager import ParserManager

    cls = ParserManager.get_parser(tool_parser_name=tool_parser.PARSER_NAME, enable_auto_tools=True)
    return cls(tokenizer, request.tools)


@pytest.mark.parametrize("pieces", [["It is", " sunny", " <tool_ca"], ["x <", "tool"], ["a", " <"]])
def test_a_tag_prefix_at_a_stop_string_is_flushed(tokenizer: Any, pieces: list[str]) -> None:
    """A stop string (or any end the parser cannot see in its tokens) ends the answer inside a
    possible tag: the last delta, marked ``finished`` by the server, carries the held-back tail."""
    request = _request(tools=TOOLS, max_tokens=100)
    parser = _served_parser(tokenizer, request)
    out = ""
    for i, piece in enumerate(pieces):  # no end-of-sequence token, far from max_tokens
        delta = parser.parse_delta(piece, [7], request, prompt_token_ids=[1], finished=i == len(pieces) - 1)
        out += (delta.content or "") if delta is not None else ""
    assert out == "".join(pieces)


def test_a_started_call_is_not_flushed_as_content(tokenizer: Any) -> None:
    request = _request(tools=TOOLS, max_tokens=100)
    parser = _served_parser(tokenizer, request)
    pieces = ["<tool_call>", '{"name": "get_weather", ', '"arguments": {"city": "Par']
    deltas = [parser.parse_delta(p, [7], request, prompt_token_ids=[1], finished=i == len(pieces) - 1)
              for i, p in enumerate(pieces)]
    assert not any(d.content for d in deltas if d is not None)
    assert [c.function.name for d in deltas if d is not None for c in d.tool_calls or [] if c.function.name] == [
        "get_weather"]


def test_the_bench_uses_the_constraints_the_server_compiles(tokenizer: Any) -> None:
    from specserve.bench.jsonschema_tools import output_valid, served_constraints

    schema = TOOLS[0]["function"]["parameters"]
    constraints = served_constraints(tokenizer, schema)
    assert constraints["response_format"] == schema and constraints["named"] == schema
    required = constraints["required"]
    assert required["maxItems"] == 1 and required["items"]["anyOf"][0]["additionalProperties"] is False
    assert output_valid("required", '[{"name": "tool", "parameters": {"city": "Oslo"}}]', schema)
    assert not output_valid("named", '{"city": 1}', schema)


def _strict(tool: dict[str, Any], strict: bool | None) -> dict[str, Any]:
    function = {k: v for k, v in tool["function"].items() if k != "strict"}
    return {**tool, "function": {**function, **({} if strict is None else {"strict": strict})}}


def _accepts(tag: str, text: str) -> bool:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    return bool(_is_grammar_accept_string(xgr.Grammar.from_structural_tag(tag), text))


def test_auto_with_a_strict_tool_constrains_calls_once_one_starts(tokenizer: Any) -> None:
    closed = {**TOOLS[0]["function"]["parameters"], "additionalProperties": False}
    tools = [_strict({**TOOLS[0], "function": {**TOOLS[0]["function"], "parameters": closed}}, True)]
    request = _request(tools=tools, tool_choice="auto")
    tag = _parser(tokenizer, request).adjust_request(request).structured_outputs.structural_tag
    assert tag is not None
    assert _accepts(tag, "Plain text, no call.")
    assert _accepts(tag, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert not _accepts(tag, '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')  # not offered
    assert not _accepts(tag, '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>')


@pytest.mark.parametrize("strict", [None, False])
def test_auto_without_a_strict_tool_stays_free(tokenizer: Any, strict: bool | None) -> None:
    request = _request(tools=[_strict(TOOLS[0], strict)], tool_choice="auto")
    assert _parser(tokenizer, request).adjust_request(request).structured_outputs is None


def test_auto_keeps_the_requests_own_structured_output(tokenizer: Any) -> None:
    request = _request(tools=[_strict(TOOLS[0], True)], tool_choice="auto",
                       response_format={"type": "json_object"})
    adjusted = _parser(tokenizer, request).adjust_request(request)
    assert adjusted.structured_outputs is None or adjusted.structured_outputs.structural_tag is None
