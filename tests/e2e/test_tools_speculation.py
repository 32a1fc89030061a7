"""Forced tool calls are the same with every drafter as without speculation (greedy, fp32 demo model).

One ``specserve serve`` after the other (module scope): no speculation, then each drafter with 4
draft tokens. The same tool-call requests at temperature 0 (``tool_choice`` named and
``required``, streaming and not, ``auto`` with the model's own call format forced, and ``auto``
where the model calls a strict tool on its own under the call's structural tag) must give
the same tokens and the same calls, and each speculative engine must really have drafted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.specserve_process import FP32, MODEL_NAME, ServeProcess, running_specserve

DRAFTERS = ("ngram", "recycling", "medusa", "hydra", "vllm-medusa")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "days": {"type": "integer"}},
           "required": ["city", "days"], "additionalProperties": False}
NOTE = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                  "maxItems": 3}},
        "required": ["title", "tags"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "save_note", "parameters": NOTE}}]
ASKS = ["What is the weather in Paris?", "Save a note about the meeting with the team."]
CALL_REGEX = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome|Oslo)", "days": [1-9]\}\}</tool_call>'
CASES: list[tuple[str, dict[str, Any]]] = [
    *[(f"named-{i}", {"messages": [{"role": "user", "content": ask}],
                      "tool_choice": {"type": "function", "function": {"name": name}}})
      for i, ask in enumerate(ASKS) for name in ("get_weather", "save_note")],
    *[(f"required-{i}", {"messages": [{"role": "user", "content": ask}], "tool_choice": "required",
                         "parallel_tool_calls": False})  # allowed more, the demo model repeats its call
      for i, ask in enumerate(ASKS)],
    ("auto", {"messages": [{"role": "user", "content": ASKS[0]}], "tool_choice": "auto",
              "extra_body": {"structured_outputs": {"regex": CALL_REGEX}}}),
    ("auto-own", {"messages": [{"role": "user", "content": "What is the weather in Paris for 3 days?"}],
                  "tool_choice": "auto",
                  "tools": [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]}),
]


def _calls(server: ServeProcess) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    out: dict[str, Any] = {}
    for label, case in CASES:
        extra = {"return_token_ids": True, **case.get("extra_body", {})}
        args = {k: v for k, v in case.items() if k != "extra_body"}
        args.setdefault("tools", TOOLS)
        r = client.chat.completions.create(model=MODEL_NAME, temperature=0, max_tokens=96,
                                           extra_body=extra, **args)
        choice = r.choices[0]
        out[label] = {"tokens": choice.model_extra.get("token_ids"), "finish": choice.finish_reason,
                      "calls": [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]}
        stream = client.chat.completions.create(model=MODEL_NAME, temperature=0, max_tokens=96,
                                                stream=True, extra_body=case.get("extra_body"), **args)
        joined: dict[int, list[str]] = {}
        for chunk in stream:
            for c in chunk.choices:
                for d in c.delta.tool_calls or []:
                    parts = joined.setdefault(d.index, ["", ""])
                    if d.function is not None:
                        parts[0] += d.function.name or ""
                        parts[1] += d.function.arguments or ""
        out[label]["streamed"] = [tuple(joined[i]) for i in sorted(joined)]
    return out


def _drafted(server: ServeProcess) -> float:
    text = httpx.get(f"{server.engine_url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "vllm:spec_decode_num_draft_tokens" for s in f.samples if s.name.endswith("_total"))


@pytest.fixture(scope="module")
def runs(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    log_dir = tmp_path_factory.mktemp("tools-spec")
    out: dict[str, dict[str, Any]] = {}
    with running_specserve(demo_model_dir, log_dir=log_dir, engine_args=FP32) as plain:
        out["none"] = _calls(plain)
    for drafter in DRAFTERS:
        with running_specserve(demo_model_dir, ["--drafter", drafter, "--num-speculative-tokens", "4"],
                               log_dir=log_dir, engine_args=FP32) as spec:
            out[drafter] = _calls(spec)
            out[drafter]["drafted"] = _drafted(spec)
    return out


def test_the_baseline_calls_are_complete_and_valid(runs: dict[str, dict[str, Any]]) -> None:
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for label, result in runs["none"].items():
        assert result["calls"], label
        # required: vLLM re-serialises whole arguments, streams them as generated
        parsed = [(name, json.loads(arguments)) for name, arguments in result["calls"]]
        assert [(name, json.loads(arguments)) for name, arguments in result["streamed"]] == parsed, label
        for name, arguments in result["calls"]:
            jsonschema.validate(json.loads(arguments), schemas[name])


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_forced_tool_calls_equal_no_speculation(runs: dict[str, dict[str, Any]], drafter: str) -> None:
    base, spec = runs["none"], runs[drafter]
    for label, _ in CASES:
        assert spec[label] == base[label], (drafter, label)
    assert spec["drafted"] > 0, f"{drafter} drafted nothing"
