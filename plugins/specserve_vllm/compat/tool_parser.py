"""The ``specserve`` tool-call parser: ``--tool-call-parser specserve`` in vLLM's OpenAI server.

The demo model's chat template writes a call as
``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` (several in a row for parallel calls),
the Hermes format, so the parser reuses vLLM's Hermes parser and changes what it gets wrong for a
server where tools are optional:

* requests without tools (or with ``tool_choice: "none"``) stream their text unchanged: the Hermes
  parser holds back a trailing ``<`` that might open a tag, and loses it when the answer ends there;
* a held-back tail is flushed when the end-of-sequence token arrives or the answer reaches its
  ``max_tokens``, and when the stream ends for any other reason (a stop string, a length cut by
  the context): vLLM's parser wrapper calls ``finalize_generation`` on the last delta, and
  :func:`install_end_flush` appends :meth:`SpecserveToolParser.flush_held_back` there (a stream
  cut inside ``<tool_ca`` still gets its last characters);
* special tokens stay skipped (the markers are plain text here, unlike Hermes models' own tokens);
* ``tool_choice`` named / ``required`` keep vLLM's grammar-forced JSON path
  (``supports_required_and_named``), which works with any model; for ``required`` the
  ``{"name", "parameters"}`` envelope of each call is closed (vLLM leaves it open, and under the
  JSON-Schema reading a model may then add names to it without end), each tool's ``definitions``
  move to the root with the ``$defs`` vLLM already moves (``#/definitions/...`` references
  resolve from the root, where a tool's schema no longer is), and when every tool says
  ``strict: true`` the whole array gets the strict reading;
* ``tool_choice: "auto"`` with a tool that says ``strict: true`` (OpenAI's structured function
  calling) gets vLLM's Hermes structural tag: the text is free until the model writes
  ``<tool_call>``; from there the call must name an offered tool, a strict tool's arguments follow
  its ``parameters`` and the others' are JSON (:func:`auto_call_tag`). Without a strict tool, or
  when the request carries its own structured output, ``auto`` stays unconstrained, as in vLLM.

vLLM loads it with ``--tool-parser-plugin specserve_vllm.compat.tool_parser`` (``specserve serve``
passes both flags); importing the module registers the name. It relies on the Hermes parser's
streaming internals, so their sources are pinned below (drift test in tests/unit).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

from specserve_vllm.compat.upstream import UpstreamFunction, warn_if_drifted

logger = logging.getLogger(__name__)

PARSER_NAME = "specserve"
PLUGIN_MODULE = "specserve_vllm.compat.tool_parser"

_HERMES = "vllm.tool_parsers.hermes_tool_parser"
_PARSER = "vllm.parser.abstract_parser"
_TAGS = "vllm.tool_parsers.structural_tag_registry"
_MARK = "_specserve_end_flush"
UPSTREAM = (
    UpstreamFunction(_HERMES, "Hermes2ProToolParser._extract_content",
                     "ca5f636da912d8aaa427216de14a8bb81a65539c213eb9c66d17a123906632d5"),
    UpstreamFunction(_HERMES, "Hermes2ProToolParser.extract_tool_calls_streaming",
                     "32d9c6c1c79c72335d808096c1d6248b196b8cc36e6344350ace79eb8c66a333"),
    UpstreamFunction(_HERMES, "Hermes2ProToolParser.extract_tool_calls",
                     "01020f0bb288fbc3f32246214f29ece8481abf38c59d7fa879b51bbf223294a4"),
    UpstreamFunction("vllm.tool_parsers.abstract_tool_parser", "ToolParser.adjust_request",
                     "7f015ae2866b25df4908672f28ff34b67178f6b93276737fc9facce32e0ce95f"),
    # Wrapped: called on a stream's last delta (``finished``), where the held-back tail is flushed.
    UpstreamFunction(_PARSER, "DelegatingParser.finalize_generation",
                     "ad4553af67cc78f1007e1d309919b16add15f87af7781eac833924866a6ce7e9"),
    # Relied on: it calls ``finalize_generation`` whenever the delta is the stream's last.
    UpstreamFunction(_PARSER, "DelegatingParser.parse_delta",
                     "a5a77549e528b74e73e49a8f00171a78867e831171778636115c6dd96000d400"),
    # Called for tool_choice "auto" with a strict tool: the Hermes call tags, triggered.
    UpstreamFunction(_TAGS, "get_model_structural_tag",
                     "6f2af3ec73ec2227674efbd79371b8a1fbf840bd5f2e21bf4cfb71b9ab7fa33a"),
    UpstreamFunction(_TAGS, "resolve_tool_strictness",
                     "a62e74e6cbf69feb6bbcf664d309fe6f6b0b6301c6a45bcd0382c880effb510f"),
    UpstreamFunction(_TAGS, "_hermes_tool_tags",
                     "2a0dadf6c5391d3c7f5d4895c575df60fff16ce037ff3b18e025e3c6733cad4f"),
    UpstreamFunction(_TAGS, "_hermes_style_structural_tag",
                     "20b7ec29559e85102b3f67a0798e8034a03fa52097c6863ec87a90cca77b60c2"),
)


def wants_tools(request: Any) -> bool:
    """Whether ``request`` offers tools the model may call in its own format."""
    return bool(getattr(request, "tools", None)) and getattr(request, "tool_choice", None) != "none"


class SpecserveToolParser(Hermes2ProToolParser):  # type: ignore[misc]
    """Hermes-format calls; plain text passes through untouched when no tools are offered."""

    structural_tag_model = None
    # The Hermes class turns this off when vLLM's strict tool calling (structural tags, on by
    # default) is on; named / required here take vLLM's JSON path: the output is the arguments
    # (or the array of calls), forced by the schema's grammar.
    supports_required_and_named = True

    def adjust_request(self, request: Any) -> Any:
        # The Hermes parser turns skip_special_tokens off for its special tag tokens; the demo
        # model's tags are text, and its role markers must stay out of the answer.
        request = ToolParser.adjust_request(self, request)
        if getattr(request, "tool_choice", None) == "auto" and request.tools:
            tag = auto_call_tag(request)
            if tag is not None:
                from vllm.sampling_params import StructuredOutputsParams

                request.structured_outputs = StructuredOutputsParams(structural_tag=tag)
        if getattr(request, "tool_choice", None) == "required":
            so = getattr(request, "structured_outputs", None)
            if so is not None and isinstance(so.json, dict):
                tools = request.tools or []
                strict = all(getattr(t.function, "strict", None) is True for t in tools)
                definitions = [getattr(t.function, "parameters", None) or {} for t in tools]
                so.json = close_call_envelopes(
                    so.json, strict=strict,
                    definitions=[d["definitions"] for d in definitions if isinstance(d.get("definitions"), dict)])
        return request

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> DeltaMessage | None:
        if not wants_tools(request):
            return DeltaMessage(content=delta_text) if delta_text else None
        self._seen_text = current_text
        delta = super().extract_tool_calls_streaming(
            previous_text, current_text, delta_text, previous_token_ids, current_token_ids,
            delta_token_ids, request)
        eos = getattr(self.model_tokenizer, "eos_token_id", None)
        last = (eos is not None and eos in delta_token_ids) or at_token_limit(request, current_token_ids)
        if last and self.tool_call_start_token not in current_text and self._sent_content_idx < len(current_text):
            rest = current_text[self._sent_content_idx:]
            self._sent_content_idx = len(current_text)
            if delta is None:
                return DeltaMessage(content=rest)
            delta.content = (delta.content or "") + rest
        return delta

    def flush_held_back(self) -> str:
        """The text held back as a possible ``<tool_call>`` start when the stream ended: with no
        call begun, it was content (empty when nothing is held back or a call started)."""
        text = getattr(self, "_seen_text", "")
        start = self._sent_content_idx
        if not text or self.tool_call_start_token in text or start >= len(text):
            return ""
        self._sent_content_idx = len(text)
        return text[start:]


def auto_call_tag(request: Any) -> str | None:
    """The structural tag (JSON) that constrains ``auto`` calls, or ``None`` to leave them free.

    Only when some offered tool says ``strict: true`` and the request has no structured output of
    its own (``response_format`` or ``structured_outputs``): vLLM's reading of ``auto`` at its
    default strict level, for the Hermes format the demo model writes.
    """
    import json

    from vllm.tool_parsers.structural_tag_registry import get_model_structural_tag
    from vllm.tool_parsers.tool_strict_level import ToolStrictLevel

    if request.extract_structured_outputs() is not None:
        return None
    tag = get_model_structural_tag(model="hermes", tools=request.tools, tool_choice="auto",
                                   reasoning=False, strict_level=ToolStrictLevel.AUTO)
    return None if tag is None else json.dumps(tag.model_dump())


def with_flushed_tail(delta: DeltaMessage | None, rest: str) -> DeltaMessage | None:
    """``delta`` with ``rest`` appended to its content (a new delta when there is none).

    >>> with_flushed_tail(None, "<tool_ca").content
    '<tool_ca'
    >>> with_flushed_tail(DeltaMessage(content="a "), "<").content
    'a <'
    >>> with_flushed_tail(None, "") is None
    True
    """
    if not rest:
        return delta
    if delta is None:
        return DeltaMessage(content=rest)
    delta.content = (delta.content or "") + rest
    return delta


def install_end_flush() -> None:
    """Wrap ``DelegatingParser.finalize_generation`` (a stream's last delta) to append what the
    specserve parser still holds back (idempotent)."""
    from vllm.parser.abstract_parser import DelegatingParser

    finalize = DelegatingParser.finalize_generation
    if getattr(finalize, _MARK, False):
        return

    @functools.wraps(finalize)
    def finalize_generation(self: Any, delta_message: Any, *args: Any, **kwargs: Any) -> Any:
        delta_message = finalize(self, delta_message, *args, **kwargs)
        parser = getattr(self, "_tool_parser", None)
        if isinstance(parser, SpecserveToolParser):
            delta_message = with_flushed_tail(delta_message, parser.flush_held_back())
        return delta_message

    setattr(finalize_generation, _MARK, True)
    DelegatingParser.finalize_generation = finalize_generation  # type: ignore[method-assign]


def at_token_limit(request: Any, token_ids: Sequence[int]) -> bool:
    """Whether an answer of ``token_ids`` has reached the request's ``max_completion_tokens`` /
    ``max_tokens`` (so this delta is its last).

    >>> from types import SimpleNamespace as NS
    >>> at_token_limit(NS(max_completion_tokens=None, max_tokens=3), [1, 2, 3])
    True
    >>> at_token_limit(NS(max_completion_tokens=None, max_tokens=None), [1, 2, 3])
    False
    """
    limit = getattr(request, "max_completion_tokens", None) or getattr(request, "max_tokens", None)
    return bool(limit) and len(token_ids) >= limit


def close_call_envelopes(schema: dict[str, Any], *, strict: bool,
                         definitions: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """vLLM's ``required`` array schema with each ``{"name", "parameters"}`` item closed, the tools'
    ``definitions`` at the root (the first of a name wins), and the strict keyword at the root
    when ``strict``.

    >>> s = {"type": "array", "items": {"type": "object", "anyOf": [{"properties": {}, "required": []}]}}
    >>> close_call_envelopes(s, strict=False)["items"]["anyOf"][0]["additionalProperties"]
    False
    """
    from specserve.structured.engine_grammar import STRICT_KEYWORD

    items = schema.get("items")
    if not isinstance(items, dict) or not isinstance(items.get("anyOf"), list):
        return schema
    closed = [{**b, "additionalProperties": False} if isinstance(b, dict) else b for b in items["anyOf"]]
    out = {**schema, "items": {**items, "anyOf": closed}}
    hoisted: dict[str, Any] = {}
    for group in definitions:
        for name, subschema in group.items():
            hoisted.setdefault(name, subschema)
    if hoisted:
        out["definitions"] = {**hoisted, **(schema.get("definitions") or {})}
    if strict:
        out[STRICT_KEYWORD] = True
    return out


def register() -> None:
    """Register ``specserve`` with vLLM's ToolParserManager (idempotent)."""
    if ToolParserManager.tool_parsers.get(PARSER_NAME) is SpecserveToolParser:
        return
    warn_if_drifted(__name__, UPSTREAM)
    install_end_flush()
    ToolParserManager.register_module(PARSER_NAME, module=SpecserveToolParser)
    logger.debug("registered the specserve tool parser")


register()
