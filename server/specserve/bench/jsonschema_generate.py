"""Generation coverage on JSONSchemaBench with the real engine, xgrammar vs guidance.

For each backend one in-process engine is started (the structured-output backend is per engine),
and every schema gets the same prompts, sampled with a fixed seed and bounded ``max_tokens``.
An output counts as *valid* when it finished (stop, not length), parses with
``json.loads(strict=True)`` and validates against the schema with ``jsonschema``. A schema the
engine refuses at submission counts as *refused*. Throughput: generated tokens per second of
constrained calls, next to the same calls without a constraint (``ignore_eos`` so lengths match
``max_tokens``); their ratio is the constraint's overhead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROMPTS = ("Return a JSON document.\n", '{"')


def _engine(model: Path, backend: str) -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON
    from specserve.engine.local import local_llm

    return local_llm(model, structured_outputs_config={"backend": backend, "disable_any_whitespace": True})


def _is_valid(text: str, schema: Any) -> bool:
    import jsonschema

    try:
        value = json.loads(text, strict=True)
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True


def _run_backend(
    model: Path, backend: str, schemas: list[tuple[str, Any]], max_tokens: int, gate: Any
) -> dict[str, Any]:
    llm = _engine(model, backend)
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import StructuredOutputsParams

    per: dict[str, dict[str, int]] = {}
    tokens = 0
    seconds = 0.0
    free_tokens = 0
    free_seconds = 0.0
    for i, (ds, schema) in enumerate(schemas):
        if i % 10 == 0:
            logger.info("generation progress", extra={"fields": {"backend": backend, "done": i}})
        row = per.setdefault(
            ds, {"schemas": 0, "refused": 0, "outputs": 0, "finished": 0, "valid": 0}
        )
        row["schemas"] += 1
        if backend == "xgrammar" and not gate(schema):
            row["refused"] += 1  # the gateway answers 400 before the engine sees it
            continue
        params = [
            SamplingParams(
                temperature=0.8, seed=k, max_tokens=max_tokens,
                structured_outputs=StructuredOutputsParams(json=schema),
            )
            for k in range(len(PROMPTS))
        ]
        warm = SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(json=schema))
        try:
            # Compile (and cache) the grammar first: compile time is reported by the compile part,
            # tokens/s here is decoding only.
            llm.generate([PROMPTS[0]], warm, use_tqdm=False)
            start = time.perf_counter()
            outs = llm.generate(list(PROMPTS), params, use_tqdm=False)
        except (ValueError, TypeError, VLLMClientError) as err:
            row["refused"] += 1
            logger.info("schema refused", extra={"fields": {"backend": backend, "error": str(err)[:200]}})
            continue
        seconds += time.perf_counter() - start
        for out in outs:
            completion = out.outputs[0]
            tokens += len(completion.token_ids)
            row["outputs"] += 1
            if completion.finish_reason == "stop":
                row["finished"] += 1
                row["valid"] += int(_is_valid(completion.text, schema))
        # The same prompts, unconstrained, each as long as its constrained counterpart (so both
        # sides pay the same prefill per generated token).
        lengths = [max(1, len(o.outputs[0].token_ids)) for o in outs]
        free = [
            SamplingParams(temperature=0.8, seed=k, max_tokens=lengths[k], ignore_eos=True)
            for k in range(len(PROMPTS))
        ]
        start = time.perf_counter()
        outs = llm.generate(list(PROMPTS), free, use_tqdm=False)
        free_seconds += time.perf_counter() - start
        free_tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    total: dict[str, Any] = {}
    for row in per.values():
        for k, v in row.items():
            total[k] = total.get(k, 0) + v
    for row in [*per.values(), total]:
        row["valid_of_finished"] = round(row["valid"] / row["finished"], 4) if row["finished"] else None
    constrained = tokens / seconds if seconds else None
    free_rate = free_tokens / free_seconds if free_seconds else None
    return {
        "per_dataset": per,
        "total": total,
        "constrained_tok_s": None if constrained is None else round(constrained, 1),
        "unconstrained_tok_s": None if free_rate is None else round(free_rate, 1),
        "throughput_ratio": round(constrained / free_rate, 3) if constrained and free_rate else None,
    }


def generation_coverage(
    model: Path,
    files_by_dataset: dict[str, list[Path]],
    backends: list[str],
    max_tokens: int,
    gate: Any,
) -> dict[str, Any]:
    """Per backend: refused / finished / valid counts per dataset and constrained throughput.

    ``gate(schema) -> bool`` is the gateway's pre-check, applied to xgrammar requests (the
    backend the gateway fronts).
    """
    schemas: list[tuple[str, Any]] = []
    for ds, files in sorted(files_by_dataset.items()):
        for f in files:
            try:
                schemas.append((ds, json.loads(f.read_text(encoding="utf-8"))))
            except (OSError, ValueError):
                continue
    return {b: _run_backend(model, b, schemas, max_tokens, gate) for b in backends}
