"""Jump-forward drafting inside the real engine (CPU, in-process, demo model).

Greedy JSON-schema-constrained generation with an ngram drafter: outputs equal the
no-speculation engine's token for token, parse strictly and validate, with jump-forward on and
off (``settings.override(jump_forward=False)``, so one speculative engine serves both); with it
on, more drafts are accepted (grammar-forced keys, separators and enum tails).
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specserve.engine.local import local_llm
from specserve.engine import settings

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

K = 4
MAX_TOKENS = 48
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["accepted", "rejected", "pending"]},
            "verified": {"type": "boolean"},
        },
        "required": ["status", "verified"],
        "additionalProperties": False,
    },
]
PROMPTS = ["JSON: ", "record\n", "def main():\n"]


def _params(schema: dict[str, Any], extra_args: dict[str, Any] | None = None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra_args,
        structured_outputs=StructuredOutputsParams(json=schema),
    )


def _run(llm: Any) -> list[Any]:
    prompts = [p for _ in SCHEMAS for p in PROMPTS]
    params = [_params(s) for s in SCHEMAS for _ in PROMPTS]
    return llm.generate(prompts, params, use_tqdm=False)


def _run_spec_k(llm: Any) -> list[Any]:
    """The enum schema's first prompt with ``spec_k`` 0 and 1."""
    params = [_params(SCHEMAS[1], {"spec_k": k}) for k in (0, 1)]
    return llm.generate([PROMPTS[0]] * 2, params, use_tqdm=False)


@pytest.fixture(scope="module")
def runs(demo_model_dir: Path) -> Iterator[dict[str, list[Any]]]:
    plain = local_llm(demo_model_dir, structured_outputs_config=STRUCTURED)
    result = {"plain": _run(plain)}
    del plain
    gc.collect()
    spec = local_llm(
        demo_model_dir, structured_outputs_config=STRUCTURED, speculative_config=NGRAM,
        per_request_spec_decode_metrics="detailed",
    )
    with settings.override(jump_forward=False):
        result["ngram"] = _run(spec)
    result["jump_forward"] = _run(spec)
    result["spec_k"] = _run_spec_k(spec)
    yield result
    del spec
    gc.collect()


def _accepted(outputs: list[Any]) -> tuple[int, int]:
    metrics = [o.outputs[0].spec_decode_metrics.to_dict() for o in outputs]
    return (sum(m["num_accepted_draft_tokens"] for m in metrics),
            sum(m["num_draft_tokens"] for m in metrics))


@pytest.mark.parametrize("mode", ["ngram", "jump_forward"])
def test_greedy_outputs_equal_no_speculation(runs: dict[str, list[Any]], mode: str) -> None:
    for base, out in zip(runs["plain"], runs[mode]):
        assert list(out.outputs[0].token_ids) == list(base.outputs[0].token_ids), out.prompt


def test_outputs_parse_strictly_and_validate(runs: dict[str, list[Any]]) -> None:
    import jsonschema

    schemas = [s for s in SCHEMAS for _ in PROMPTS]
    for out, schema in zip(runs["jump_forward"], schemas):
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text, strict=True), schema)


def test_jump_forward_accepts_more_drafts(runs: dict[str, list[Any]]) -> None:
    accepted_off, drafted_off = _accepted(runs["ngram"])
    accepted_on, drafted_on = _accepted(runs["jump_forward"])
    assert accepted_on > accepted_off, (accepted_on, drafted_on, accepted_off, drafted_off)
    assert drafted_on >= accepted_on


def test_spec_k_caps_jump_forward(runs: dict[str, list[Any]]) -> None:
    off, one = (o.outputs[0] for o in runs["spec_k"])
    base = runs["plain"][len(PROMPTS)].outputs[0]  # same schema and prompt, no speculation
    assert off.spec_decode_metrics.to_dict()["num_draft_tokens"] == 0
    assert max(one.spec_decode_metrics.to_dict()["per_step_drafted"] or [0]) <= 1
    assert list(off.token_ids) == list(one.token_ids) == list(base.token_ids)


def test_drafts_never_exceed_the_engine_length(runs: dict[str, list[Any]]) -> None:
    for out in runs["jump_forward"]:
        metrics = out.outputs[0].spec_decode_metrics.to_dict()
        assert max(metrics["per_step_drafted"] or [0]) <= K
        assert metrics["num_accepted_draft_tokens"] <= metrics["num_draft_tokens"]
