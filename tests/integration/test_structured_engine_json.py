"""Constrained JSON from the real engine parses strictly and validates, without speculation and
with every drafter (vLLM's ngram; specserve's Token Recycling, Medusa and Hydra heads).

The schemas include length-bounded strings, where xgrammar 0.2.8 on its own admits raw control
characters; a barely trained model samples such bytes readily at temperature 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "maxItems": 3,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["tags", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "kind": {"enum": ["a", "b", "c"]},
            "note": {"type": "string", "maxLength": 10},
        },
        "required": ["kind", "note"],
        "additionalProperties": False,
    },
]

PROMPTS = ['{"name": "', "JSON: ", "[1, 2, 3] {", "record\n"]


DRAFTERS = ("plain", "ngram", "recycling", "medusa", "hydra")
"""Every drafter specserve has: constrained outputs must stay strict and valid with each."""


def _engine(model: Path, drafter: str) -> Any:
    from support.spec_runs import heads_env

    from specserve.speculative_config import speculative_config
    from specserve.engine.local import local_llm
    from specserve.head_training import demo_heads_dir

    kwargs: dict[str, Any] = {}
    if drafter == "ngram":
        kwargs["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": 3,
            "prompt_lookup_max": 3,
            "prompt_lookup_min": 1,
        }
    elif drafter != "plain":
        kwargs["speculative_config"] = speculative_config(drafter, 3)  # type: ignore[arg-type]
    heads = str(demo_heads_dir(drafter)) if drafter in ("medusa", "hydra") else None
    with heads_env(heads):  # read once, when the engine builds its proposer
        return local_llm(
            model,
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **kwargs,
        )


def _generate(llm: Any, schema: dict[str, Any], n: int) -> list[tuple[str, str | None]]:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    params = [
        SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=120,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        for i in range(n)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


@pytest.fixture(scope="module", params=DRAFTERS)
def engine(request: pytest.FixtureRequest, demo_model_dir: Path) -> Iterator[Any]:
    import gc

    llm = _engine(demo_model_dir, request.param)
    yield llm
    del llm
    gc.collect()


@pytest.mark.parametrize("schema_index", range(len(SCHEMAS)))
def test_constrained_outputs_are_strict_and_valid(engine: Any, schema_index: int) -> None:
    import jsonschema

    schema = SCHEMAS[schema_index]
    results = _generate(engine, schema, n=6)
    finished = [text for text, reason in results if reason == "stop"]
    assert finished, f"no constrained generation finished: {results!r}"
    for text in finished:
        value = json.loads(text, strict=True)
        jsonschema.validate(value, schema)
