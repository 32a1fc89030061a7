"""JSONSchemaBench schemas as tool parameters: forced tool calls vs ``response_format``.

One in-process engine (xgrammar). Each schema is served three ways, with the constraint the
server builds for it (vLLM's tool schema, then the ``specserve`` parser's ``adjust_request``):

* ``response_format``: the schema itself, the chat prompt without tools;
* ``named``: ``tool_choice`` naming the function: the arguments are generated under the schema,
  the prompt lists the tool (the demo chat template writes each tool's schema into it);
* ``required``: the array of ``{"name", "parameters"}`` calls, with ``parallel_tool_calls: false``
  (one call: allowed more, the demo model repeats its call until ``max_tokens``).

A schema is used when the gateway's pre-check serves it (as ``response_format`` and as tool
parameters alike) and the prompt with the tool fits the context with room to answer (large
schemas written into the prompt do not fit the demo model's 512 tokens: counted as
``too_long``). An output is *valid* when it finished and what a client gets parses and validates:
the arguments (named), every call's parameters (required). Tokens/s: decoding only (each grammar
compiled first, prefill included: the tool modes' prompts are longer, they list the schema), the
same seeds in every mode.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("response_format", "named", "required")
SEEDS = (0, 1)
ASK_JSON = "Return a JSON document."
ASK_TOOL = "Call the tool."
MIN_ANSWER_TOKENS = 64
TOOL_NAME = "tool"


def _valid(value: Any, schema: Any) -> bool:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except (jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True


def output_valid(mode: str, text: str, schema: Any) -> bool:
    """Whether ``text`` gives a client a value valid for ``schema`` in ``mode``.

    >>> s = {"type": "object", "properties": {"a": {"type": "integer"}}}
    >>> output_valid("named", '{"a": 1}', s), output_valid("required", '[{"name": "tool", "parameters": {"a": "x"}}]', s)
    (True, False)
    """
    try:
        value = json.loads(text, strict=True)
    except ValueError:
        return False
    if mode != "required":
        return _valid(value, schema)
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(c, dict) and c.get("name") == TOOL_NAME and _valid(c.get("parameters"), schema)
               for c in value)


def served_constraints(tokenizer: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema the server compiles for each tool mode (vLLM's tool schema as adjusted by
    the ``specserve`` parser)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from specserve_vllm.compat.tool_parser import SpecserveToolParser

    tools = [{"type": "function", "function": {"name": TOOL_NAME, "parameters": schema}}]
    out: dict[str, Any] = {"response_format": schema}
    for mode, choice in (("named", {"type": "function", "function": {"name": TOOL_NAME}}),
                         ("required", "required")):
        request = ChatCompletionRequest.model_validate({
            "model": "m", "messages": [{"role": "user", "content": ASK_TOOL}], "tools": tools,
            "tool_choice": choice, "parallel_tool_calls": False})
        adjusted = SpecserveToolParser(tokenizer, request.tools).adjust_request(request)
        out[mode] = adjusted.structured_outputs.json
    return out


def _prompts(tokenizer: Any, schema: Any) -> dict[str, str]:
    tools = [{"type": "function", "function": {"name": TOOL_NAME, "description": None, "parameters": schema}}]
    plain = tokenizer.apply_chat_template([{"role": "user", "content": ASK_JSON}], tokenize=False,
                                          add_generation_prompt=True)
    with_tools = tokenizer.apply_chat_template([{"role": "user", "content": ASK_TOOL}], tools=tools,
                                               tokenize=False, add_generation_prompt=True)
    return {"response_format": plain, "named": with_tools, "required": with_tools}


def tool_call_coverage(
    model: Path, files_by_dataset: dict[str, list[Path]], max_tokens: int, gate: Any, tool_gate: Any,
) -> dict[str, Any]:
    """Per mode: schemas, outputs finished, valid, tokens/s; and schemas skipped (refused, too long)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import StructuredOutputsParams

    from specserve.bench.jsonschema_generate import _engine

    llm = _engine(model, "xgrammar")
    tokenizer = llm.get_tokenizer()
    context = llm.llm_engine.model_config.max_model_len
    rows = {m: {"outputs": 0, "finished": 0, "valid": 0, "tokens": 0, "seconds": 0.0} for m in MODES}
    skipped = {"refused": 0, "too_long": 0, "engine_refused": 0}
    used = 0
    for ds, files in sorted(files_by_dataset.items()):
        for f in files:
            try:
                schema = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not (isinstance(schema, dict) and gate(schema) and tool_gate(schema)):
                skipped["refused"] += 1
                continue
            prompts = _prompts(tokenizer, schema)
            room = context - len(tokenizer.encode(prompts["named"]))
            if room < MIN_ANSWER_TOKENS:
                skipped["too_long"] += 1
                continue
            limit = min(max_tokens, room)
            constraints = served_constraints(tokenizer, schema)
            try:
                for mode in MODES:  # compile every grammar before timing
                    warm = SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(
                        json=constraints[mode]))
                    llm.generate([prompts[mode]], warm, use_tqdm=False)
            except (ValueError, TypeError, VLLMClientError) as err:
                skipped["engine_refused"] += 1
                logger.info("schema refused", extra={"fields": {"dataset": ds, "error": str(err)[:200]}})
                continue
            used += 1
            for mode in MODES:
                params = [SamplingParams(temperature=0.8, seed=s, max_tokens=limit,
                                         structured_outputs=StructuredOutputsParams(json=constraints[mode]))
                          for s in SEEDS]
                start = time.perf_counter()
                outs = llm.generate([prompts[mode]] * len(SEEDS), params, use_tqdm=False)
                row = rows[mode]
                row["seconds"] += time.perf_counter() - start
                for out in outs:
                    completion = out.outputs[0]
                    row["outputs"] += 1
                    row["tokens"] += len(completion.token_ids)
                    if completion.finish_reason == "stop":
                        row["finished"] += 1
                        row["valid"] += int(output_valid(mode, completion.text, schema))
            logger.info("tool-call progress", extra={"fields": {"dataset": ds, "schemas": used}})
    del llm
    result: dict[str, Any] = {"schemas": used, "skipped": skipped}
    for mode, row in rows.items():
        seconds = row.pop("seconds")
        row["valid_of_finished"] = round(row["valid"] / row["finished"], 4) if row["finished"] else None
        row["tok_s"] = round(row["tokens"] / seconds, 1) if seconds else None
        result[mode] = row
    base = result["response_format"]["tok_s"]
    result["tok_s_ratio_vs_response_format"] = {
        m: round(result[m]["tok_s"] / base, 3) if base and result[m]["tok_s"] else None for m in MODES[1:]}
    return result


def tools_summary(result: dict[str, Any]) -> str:
    """One line for the tool-call part.

    >>> tools_summary({"schemas": 2, "named": {"valid": 3, "finished": 4, "tok_s": 10.0},
    ...                "required": {"valid": 1, "finished": 2, "tok_s": 8.0},
    ...                "response_format": {"valid": 4, "finished": 4, "tok_s": 11.0}})
    'tools on 2 schemas: response_format valid 4/4 at 11.0 tok/s, named valid 3/4 at 10.0 tok/s, required valid 1/2 at 8.0 tok/s'
    """
    parts = [f"{m} valid {result[m]['valid']}/{result[m]['finished']} at {result[m]['tok_s']} tok/s"
             for m in MODES]
    return f"tools on {result['schemas']} schemas: " + ", ".join(parts)
