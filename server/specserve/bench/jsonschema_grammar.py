"""Grammar-level measurements on JSONSchemaBench: compile coverage/time and MaskBench agreement.

Grammars are built exactly as the engine builds them for ``json_schema`` requests
(:func:`specserve.structured.engine_grammar.json_schema_ebnf` with ``disable_any_whitespace``'s
compact separators: the schema rewrite, xgrammar's conversion, the strict-string and compact
free-form fixes) and compiled against a real tokenizer. ``--raw-xgrammar`` measures xgrammar's
own conversion instead, ``--semantic`` its any-order, non-strict mode.

MaskBench agreement also times each token-mask fill on the way (``mask_fill_us_p50/p99``): the
grammar's work per constrained request and decoding step.

MaskBench agreement: an instance agrees when the compiled grammar accepts its compact JSON text
(tokenized with the model's tokenizer, fed token by token to a ``GrammarMatcher``, then the stop
token) exactly when the instance is marked valid.

Example: for ``{"type": "integer", "minimum": 0}`` the valid instance ``3`` is accepted and the
invalid instance ``-1`` is rejected at the ``-`` token: 2 of 2 instances agree.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specserve.structured.engine_grammar import json_schema_ebnf
from specserve.structured.strict_json import fix_json_ebnf

logger = logging.getLogger(__name__)


@dataclass
class CompiledSchema:
    """A schema's compile outcome."""

    ok: bool
    seconds: float
    error: str | None = None
    compiled: Any = None


class SchemaCompiler:
    """Compiles JSON schemas the way the engine does, each within a time limit."""

    def __init__(
        self,
        model_dir: Path,
        strict: bool = True,
        timeout_s: float = 20.0,
        semantic: bool = False,
    ) -> None:
        import xgrammar as xgr
        from transformers import AutoConfig, AutoTokenizer

        self.xgr = xgr
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        vocab_size = AutoConfig.from_pretrained(str(model_dir)).vocab_size
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.strict = strict
        self.timeout_s = timeout_s
        # Shipped: what vLLM compiles (properties in schema order, no undeclared properties).
        # Semantic: the schema's own meaning (any order, additionalProperties as written).
        self.json_options = {"any_order": True, "strict_mode": False} if semantic else {}
        # Seconds of each token-mask fill while walking instances (the engine fills one per
        # constrained request and step): the grammar's share of a decoding step.
        self.fill_s: list[float] = []
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-compile")

    def _compile(self, schema: Any) -> Any:
        options: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":")}
        if self.strict and not self.json_options:
            # What the engine compiles (the compat patch calls the same function).
            return self.compiler.compile_grammar(json_schema_ebnf(json.dumps(schema), **options))
        grammar = self.xgr.Grammar.from_json_schema(
            json.dumps(schema), **options, **self.json_options
        )
        ebnf = str(grammar)
        if self.strict:
            ebnf = fix_json_ebnf(ebnf, compact=True)
        return self.compiler.compile_grammar(ebnf)

    def compile(self, schema: Any) -> CompiledSchema:
        start = time.perf_counter()
        future = self._pool.submit(self._compile, schema)
        try:
            compiled = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            # The worker cannot be interrupted; use a fresh one for the next schema.
            self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-compile")
            return CompiledSchema(False, time.perf_counter() - start, "timeout")
        except Exception as err:  # xgrammar raises several types from native code
            return CompiledSchema(False, time.perf_counter() - start, str(err).splitlines()[0][:200])
        return CompiledSchema(True, time.perf_counter() - start, None, compiled)

    def accepts(self, compiled: Any, text: str) -> bool:
        """Does the grammar accept ``text`` followed by the stop token?"""
        matcher = self.xgr.GrammarMatcher(compiled)
        for token in self.tokenizer.encode(text, add_special_tokens=False):
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(self._bitmask)
            self.fill_s.append(time.perf_counter() - start)
            if not matcher.accept_token(token):
                return False
        if matcher.is_terminated():
            return True
        stops = matcher.stop_token_ids
        return bool(stops) and matcher.accept_token(stops[0]) and matcher.is_terminated()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
    (2.0, 4.0)
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def dataset_of(path: Path) -> str:
    """MaskBench file names are ``<dataset>---<name>.json`` or ``<dataset>_<n>.json``.

    >>> dataset_of(Path("Github_easy---o1.json")), dataset_of(Path("BFCL_java_12.json"))
    ('Github_easy', 'BFCL_java')
    """
    stem = path.stem
    if "---" in stem:
        return stem.split("---", 1)[0]
    head, _, tail = stem.rpartition("_")
    return head if tail.isdigit() and head else stem


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _load(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def maskbench(
    files: list[Path], compiler: SchemaCompiler, precheck_ok: Any
) -> dict[str, Any]:
    """MaskBench agreement per dataset; ``precheck_ok(schema) -> bool`` marks served schemas."""
    per: dict[str, dict[str, int]] = {}
    fills: dict[str, list[float]] = {}
    for i, path in enumerate(files):
        doc = _load(path)
        ds = dataset_of(path)
        compiler.fill_s = fills.setdefault(ds, [])
        row = per.setdefault(
            ds,
            {"schemas": 0, "compiled": 0, "served": 0, "instances": 0, "agree": 0,
             "served_instances": 0, "served_agree": 0, "false_accept": 0, "false_reject": 0},
        )
        if i % 100 == 0:
            logger.info("maskbench progress", extra={"fields": {"done": i, "total": len(files)}})
        if not isinstance(doc, dict) or not isinstance(doc.get("tests"), list):
            continue
        row["schemas"] += 1
        outcome = compiler.compile(doc.get("schema"))
        if not outcome.ok:
            continue
        row["compiled"] += 1
        served = bool(precheck_ok(doc.get("schema")))
        row["served"] += int(served)
        for test in doc["tests"]:
            valid = bool(test.get("valid"))
            accepted = compiler.accepts(outcome.compiled, compact(test.get("data")))
            agree = int(accepted == valid)
            row["instances"] += 1
            row["agree"] += agree
            row["false_accept"] += int(accepted and not valid)
            row["false_reject"] += int(valid and not accepted)
            if served:
                row["served_instances"] += 1
                row["served_agree"] += agree
    result = _with_totals(per, ("agree", "instances"), ("served_agree", "served_instances"))
    everything = [t for times in fills.values() for t in times]
    for row, times in [*((per[ds], fills.get(ds, [])) for ds in per), (result["total"], everything)]:
        for q in (50, 99):
            value = percentile(times, q)
            row[f"mask_fill_us_p{q}"] = None if value is None else round(value * 1e6, 1)
    return result


def compile_coverage(
    files_by_dataset: dict[str, list[Path]], compiler: SchemaCompiler, precheck_ok: Any
) -> dict[str, Any]:
    """Per dataset: schemas the gateway serves, schemas that compile, compile time p50/p99 (ms)."""
    per: dict[str, dict[str, Any]] = {}
    done = 0
    total = sum(len(v) for v in files_by_dataset.values())
    for ds, files in sorted(files_by_dataset.items()):
        times: list[float] = []
        row: dict[str, Any] = {"schemas": 0, "served": 0, "compiled": 0, "timeouts": 0}
        for path in files:
            done += 1
            if done % 100 == 0:
                logger.info("compile progress", extra={"fields": {"done": done, "total": total}})
            schema = _load(path)
            if schema is None:
                continue
            row["schemas"] += 1
            row["served"] += int(bool(precheck_ok(schema)))
            outcome = compiler.compile(schema)
            row["compiled"] += int(outcome.ok)
            row["timeouts"] += int(outcome.error == "timeout")
            if outcome.ok:
                times.append(outcome.seconds * 1000)
        row["compile_ms_p50"] = _round(percentile(times, 50))
        row["compile_ms_p99"] = _round(percentile(times, 99))
        per[ds] = row
    return _with_totals(per, ("compiled", "schemas"), ("served", "schemas"))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _with_totals(
    per: dict[str, dict[str, Any]], *ratios: tuple[str, str]
) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for row in per.values():
        for k, v in row.items():
            if isinstance(v, int) and not k.startswith("compile_ms"):
                total[k] = total.get(k, 0) + v
    for row in [*per.values(), total]:
        for num, den in ratios:
            row[f"{num}_rate"] = round(row[num] / row[den], 4) if row.get(den) else None
    return {"per_dataset": per, "total": total}
