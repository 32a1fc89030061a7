"""τ of constrained JSON generation with a drafter, with and without jump-forward drafting.

One in-process engine (xgrammar, compact JSON, ``--spec-drafter`` drafting up to ``--spec-k``
tokens, per-request speculative metrics) generates greedily for every schema the gateway serves,
twice: with jump-forward drafting off, then on (the patch's module switch, read per call). Per
mode, summed over requests:

* ``tau``: tokens per verification step that carried drafts, ``1 + accepted / spec_steps``
  (the ``specserve bench drafters`` definition);
* ``tokens_per_forward``: generated tokens per decode forward pass,
  ``tokens / (tokens - accepted)``; steps without drafts count, so it compares modes fairly;
* drafted / accepted draft tokens, finished and strict-JSON + schema-valid outputs.

``identical`` counts requests whose token ids agree between the two modes (greedy: all of them);
each mode's ``digest`` hashes its outputs, so runs with other drafters or tree shapes compare too.
With ``tree`` = ``static`` or ``dynamic`` the drafter drafts trees, which structured-output
requests verify pruned by their grammar; ``grammar_trees`` counts those verifications per mode.

``constraint="required"`` measures forced tool calls instead: each schema is a function's
``parameters`` and the grammar is the one the server compiles for ``tool_choice: "required"``
(``[{"name": "tool", "parameters": {...}}]``, the ``specserve`` parser's closed envelope), so the
call's scaffolding (bracket, keys, the function's name) is forced and jump-forward can draft it.
Valid means every call's parameters validate. The prompts are short (the tool is not listed in
them): the figure is about the grammar's forced tokens, not the model's choice of call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from specserve.bench.drafters import tau

logger = logging.getLogger(__name__)

PROMPTS = ("Return a JSON document.\n", '{"')
TOOL_PROMPTS = ("Call the tool.\n", "[")
MODES = ("off", "jump_forward")
CONSTRAINTS = ("response_format", "required")


def tokens_per_forward(tokens: int, accepted: int) -> float:
    """Generated tokens per decode forward pass (each pass emits one token plus its accepted drafts).

    >>> tokens_per_forward(30, 10)
    1.5
    >>> tokens_per_forward(0, 0)
    1.0
    """
    passes = tokens - accepted
    return 1.0 if passes <= 0 else round(tokens / passes, 3)


def speculation_totals(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum per-request rows (``tokens``, ``drafted``, ``accepted``, ``spec_steps``, ``finished``,
    ``valid``) and derive τ and tokens per forward pass.

    >>> t = speculation_totals([
    ...     {"tokens": 20, "drafted": 8, "accepted": 6, "spec_steps": 4, "finished": 1, "valid": 1},
    ...     {"tokens": 10, "drafted": 4, "accepted": 4, "spec_steps": 2, "finished": 0, "valid": 0}])
    >>> t["tau"], t["tokens_per_forward"], t["acceptance_rate"], t["requests"]
    (2.667, 1.5, 0.833, 2)
    """
    keys = ("tokens", "drafted", "accepted", "spec_steps", "finished", "valid")
    total: dict[str, Any] = dict.fromkeys(keys, 0)
    total["requests"] = 0
    for row in rows:
        total["requests"] += 1
        for k in keys:
            total[k] += int(row[k])
    total["tau"] = tau(total["spec_steps"], total["accepted"])
    total["tokens_per_forward"] = tokens_per_forward(total["tokens"], total["accepted"])
    total["acceptance_rate"] = (
        round(total["accepted"] / total["drafted"], 3) if total["drafted"] else None
    )
    return total


def _row(completion: Any, schema: Any, constraint: str = "response_format") -> dict[str, Any]:
    from specserve.bench.jsonschema_generate import _is_valid
    from specserve.bench.jsonschema_tools import output_valid

    metrics = completion.spec_decode_metrics.to_dict() if completion.spec_decode_metrics else {}
    finished = completion.finish_reason == "stop"
    valid = (_is_valid(completion.text, schema) if constraint == "response_format"
             else output_valid(constraint, completion.text, schema))
    return {
        "tokens": len(completion.token_ids),
        "drafted": metrics.get("num_draft_tokens", 0),
        "accepted": metrics.get("num_accepted_draft_tokens", 0),
        "spec_steps": metrics.get("num_spec_steps", 0),
        "finished": int(finished),
        "valid": int(finished and valid),
    }


def _engine(model: Path, drafter: str, k: int, tree: str = "chain") -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON
    from specserve.engine import settings
    from specserve.engine.local import local_llm
    from specserve.speculative_config import speculative_config

    with settings.override(tree=tree):
        return local_llm(
            model,
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            speculative_config=speculative_config(drafter, k),  # type: ignore[arg-type]
            per_request_spec_decode_metrics="detailed",
        )


def _grammar_trees(llm: Any) -> int:
    """Tree verifications of structured-output requests so far (0 with chains)."""
    from specserve.engine.local import model_runner
    from specserve_vllm.compat.tree_steps import COUNTERS_ATTR

    found = getattr(model_runner(llm), COUNTERS_ATTR, None)
    return 0 if found is None else int(found.grammar)


def _generate(llm: Any, schema: Any, max_tokens: int, prompts: tuple[str, ...] = PROMPTS) -> list[Any] | None:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import StructuredOutputsParams

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens,
        structured_outputs=StructuredOutputsParams(json=schema),
    )
    try:
        outs = llm.generate(list(prompts), [params] * len(prompts), use_tqdm=False)
    except (ValueError, TypeError, VLLMClientError) as err:
        logger.info("schema refused", extra={"fields": {"error": str(err)[:200]}})
        return None
    return [o.outputs[0] for o in outs]


def _load(files_by_dataset: dict[str, list[Path]], gate: Any) -> list[Any]:
    schemas: list[Any] = []
    for _, files in sorted(files_by_dataset.items()):
        for f in files:
            try:
                schema = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if gate(schema):
                schemas.append(schema)
    return schemas


def speculation_coverage(
    model: Path,
    files_by_dataset: dict[str, list[Path]],
    drafter: str,
    k: int,
    max_tokens: int,
    gate: Any,
    constraint: str = "response_format",
    tree: str = "chain",
) -> dict[str, Any]:
    """τ and acceptance per mode (``off``, ``jump_forward``) over the served schemas, each used
    as ``constraint`` (one of :data:`CONSTRAINTS`); ``tree``: the drafter's shape (``static`` and
    ``dynamic`` verify grammar-pruned trees, counted per mode as ``grammar_trees``)."""
    from specserve.engine import settings

    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {', '.join(CONSTRAINTS)}, got {constraint!r}")
    schemas = _load(files_by_dataset, gate)
    llm = _engine(model, drafter, k, tree)
    trees = dict.fromkeys(MODES, 0)
    prompts = PROMPTS if constraint == "response_format" else TOOL_PROMPTS
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    tokens: dict[str, list[list[int]]] = {m: [] for m in MODES}
    try:
        for i, schema in enumerate(schemas):
            logger.info("speculation progress", extra={"fields": {"done": i, "of": len(schemas)}})
            done: dict[str, list[Any]] = {}
            grammar = schema
            if constraint != "response_format":
                from specserve.bench.jsonschema_tools import served_constraints

                grammar = served_constraints(llm.get_tokenizer(), schema)[constraint]
            for mode in MODES:
                before = _grammar_trees(llm)
                with settings.override(jump_forward=mode == "jump_forward"):
                    outs = _generate(llm, grammar, max_tokens, prompts)
                trees[mode] += _grammar_trees(llm) - before
                if outs is None:
                    break
                done[mode] = outs
            if len(done) < len(MODES):
                continue
            for mode, outs in done.items():
                rows[mode] += [_row(c, schema, constraint) for c in outs]
                tokens[mode] += [list(c.token_ids) for c in outs]
    finally:
        del llm
    identical = sum(a == b for a, b in zip(tokens["off"], tokens["jump_forward"]))
    result: dict[str, Any] = {
        "drafter": drafter, "k": k, "tree": tree, "max_tokens": max_tokens, "constraint": constraint,
        "schemas": len(schemas), "identical": identical,
    }
    result.update({m: {**speculation_totals(rows[m]), "grammar_trees": trees[m], "digest": tokens_digest(tokens[m])}
                   for m in MODES})
    return result


def tokens_digest(outputs: list[list[int]]) -> str:
    """A short digest of every output's token ids, in order: equal digests across runs (chains
    and trees, drafters) mean token-identical outputs.

    >>> tokens_digest([[1, 2], [3]]) == tokens_digest([[1, 2], [3]]) != tokens_digest([[1], [2, 3]])
    True
    """
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:16]


def speculation_summary(spec: Mapping[str, Any]) -> str:
    """One clause for the bench's summary line.

    >>> speculation_summary({"drafter": "ngram", "k": 4, "schemas": 2, "identical": 4,
    ...     "off": {"tau": 2.0, "tokens_per_forward": 1.1, "requests": 4},
    ...     "jump_forward": {"tau": 1.8, "tokens_per_forward": 1.4, "requests": 4}})
    'ngram k=4 on 2 schemas: tau 2.0 -> 1.8, tokens/forward 1.1 -> 1.4 with jump-forward (4/4 identical)'
    """
    off, on = spec["off"], spec["jump_forward"]
    shape = f" {spec['tree']} trees" if spec.get("tree", "chain") != "chain" else ""
    return (
        f"{spec['drafter']}{shape} k={spec['k']} on {spec['schemas']} schemas: "
        f"tau {off['tau']} -> {on['tau']}, tokens/forward {off['tokens_per_forward']} -> "
        f"{on['tokens_per_forward']} with jump-forward ({spec['identical']}/{on['requests']} identical)"
    )
