"""``specserve bench jsonschema``: structured outputs measured on JSONSchemaBench.

Reads ``--data DIR`` (``schemas/<dataset>/*.json`` and ``maskbench/*.json``) and reports, as JSON
on stdout followed by a one-line summary on stderr:

* ``maskbench``: per dataset, how many instances the compiled grammar classifies like the
  ``valid`` flag (overall, and for the schemas the gateway serves), false accepts / rejects;
* ``compile``: per dataset, schemas the gateway's pre-check serves, schemas that compile with the
  model's tokenizer, compile time p50/p99 in ms;
* ``generate`` (opt-in, starts engines): per backend (xgrammar, guidance), schemas refused,
  generations finished and strict-JSON + schema-valid, constrained vs unconstrained tokens/s
  (each grammar compiled before timing: compile time is the compile part's figure);
* ``tools`` (opt-in, starts an engine): the schemas as tool parameters, tool_choice named and
  ``required`` next to ``response_format``: validity and tokens/s (:mod:`.jsonschema_tools`).

``--limit N`` takes the first N files (sorted) per dataset, so runs are repeatable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from specserve.structured.engine_grammar import objects_open_by_default, strict_by_default

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="JSONSchemaBench directory")
    parser.add_argument("--limit", type=int, default=None, help="files per dataset (default all)")
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument(
        "--parts",
        default="maskbench,compile",
        help="comma-separated: maskbench, compile, generate, speculation, tool-speculation, tools "
        "(the last four start engines; tool-speculation = speculation under forced tool calls)",
    )
    parser.add_argument("--gen-limit", type=int, default=2, help="schemas per dataset to generate")
    parser.add_argument("--max-tokens", type=int, default=256, help="generation length bound")
    parser.add_argument("--backends", default="xgrammar,guidance", help="engines to compare")
    parser.add_argument("--spec-drafter", default="ngram", help="speculation part: drafter name")
    parser.add_argument("--spec-k", type=int, default=4, help="speculation part: draft length (tree nodes)")
    parser.add_argument("--spec-tree", choices=("chain", "static", "dynamic"), default="chain",
                        help="speculation parts: draft chains, or grammar-pruned static or DySpec trees")
    parser.add_argument("--compile-timeout", type=float, default=20.0, help="seconds per schema")
    parser.add_argument(
        "--semantic",
        action="store_true",
        help="grammar by the schema's meaning (any property order, additionalProperties as "
        "written) instead of the engine's (schema order, no undeclared properties)",
    )
    parser.add_argument(
        "--raw-xgrammar",
        action="store_true",
        help="compile xgrammar's grammar as is, without the strict-string and separator fixes",
    )


def _group(files: list[Path], key: Any, limit: int | None) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for f in sorted(files):
        groups.setdefault(key(f), []).append(f)
    if limit is not None:
        groups = {k: v[:limit] for k, v in groups.items()}
    return groups


class _GatewayCheck:
    """The gateway's pre-check of a schema, as ``response_format`` or as a tool's parameters."""

    def __init__(self) -> None:
        from specserve.structured.precheck import SchemaPrecheck

        self.precheck = SchemaPrecheck()

    def _passes(self, body: dict[str, Any]) -> bool:
        from specserve.errors import APIError

        try:
            self.precheck.precheck(body, "chat")
        except APIError:
            return False
        return True

    def schema_ok(self, schema: Any) -> bool:
        return self._passes({"response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "s", "schema": schema}}})

    def tool_ok(self, schema: Any) -> bool:
        return self._passes({"tools": [{"type": "function", "function": {"name": "tool", "parameters": schema}}],
                             "tool_choice": "required"})


def _model_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    from specserve.demo import demo_model_dir

    return demo_model_dir(build=False)


def run(args: argparse.Namespace) -> int:
    from specserve.bench.jsonschema_grammar import (
        SchemaCompiler,
        compile_coverage,
        dataset_of,
        maskbench,
    )

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    model = _model_dir(args.model)
    started = time.perf_counter()
    compiler = SchemaCompiler(
        model, strict=not args.raw_xgrammar, timeout_s=args.compile_timeout, semantic=args.semantic
    )
    result: dict[str, Any] = {
        "model": str(model),
        "data": str(args.data),
        "limit": args.limit,
        "json_fixes": not args.raw_xgrammar,
        "grammar_mode": "semantic" if args.semantic else "shipped",
        "json_mode": "strict" if strict_by_default() else "schema",
        "json_objects": "open" if objects_open_by_default() else "closed",
        "backend": "xgrammar",
    }
    gateway_check = _GatewayCheck()
    if "maskbench" in parts:
        groups = _group(list((args.data / "maskbench").glob("*.json")), dataset_of, args.limit)
        files = [f for fs in groups.values() for f in fs]
        logger.info("maskbench", extra={"fields": {"files": len(files)}})
        result["maskbench"] = maskbench(files, compiler, gateway_check.schema_ok)
    if "compile" in parts:
        schema_files = list((args.data / "schemas").glob("*/*.json"))
        groups = _group(schema_files, lambda f: f.parent.name, args.limit)
        logger.info("compile coverage", extra={"fields": {"files": sum(map(len, groups.values()))}})
        result["compile"] = compile_coverage(groups, compiler, gateway_check.schema_ok)
    if "generate" in parts:
        from specserve.bench.jsonschema_generate import generation_coverage

        schema_files = list((args.data / "schemas").glob("*/*.json"))
        groups = _group(schema_files, lambda f: f.parent.name, args.gen_limit)
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        result["generate"] = generation_coverage(
            model, groups, backends, args.max_tokens, gateway_check.schema_ok
        )
    if "speculation" in parts:
        from specserve.bench.jsonschema_speculation import speculation_coverage

        schema_files = list((args.data / "schemas").glob("*/*.json"))
        groups = _group(schema_files, lambda f: f.parent.name, args.gen_limit)
        result["speculation"] = speculation_coverage(
            model, groups, args.spec_drafter, args.spec_k, args.max_tokens, gateway_check.schema_ok,
            tree=args.spec_tree,
        )
    if "tool-speculation" in parts:
        from specserve.bench.jsonschema_speculation import speculation_coverage

        schema_files = list((args.data / "schemas").glob("*/*.json"))
        groups = _group(schema_files, lambda f: f.parent.name, args.gen_limit)
        result["tool_speculation"] = speculation_coverage(
            model, groups, args.spec_drafter, args.spec_k, args.max_tokens, gateway_check.tool_ok,
            constraint="required", tree=args.spec_tree,
        )
    if "tools" in parts:
        from specserve.bench.jsonschema_tools import tool_call_coverage

        schema_files = list((args.data / "schemas").glob("*/*.json"))
        groups = _group(schema_files, lambda f: f.parent.name, args.gen_limit)
        result["tools"] = tool_call_coverage(model, groups, args.max_tokens, gateway_check.schema_ok,
                                             gateway_check.tool_ok)
    gateway_check.precheck.close()
    result["seconds"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    sys.stderr.write(summary(result) + "\n")
    return 0


def summary(result: dict[str, Any]) -> str:
    """One line: MaskBench agreement and compile coverage / time.

    >>> summary({"seconds": 1.0})
    'jsonschema: 1.0 s'
    """
    bits: list[str] = []
    mb = result.get("maskbench", {}).get("total")
    if mb:
        bits.append(
            f"maskbench agreement {mb.get('agree_rate')} of {mb.get('instances')} instances "
            f"(served schemas {mb.get('served_agree_rate')} of {mb.get('served_instances')}), "
            f"mask fill p50 {mb.get('mask_fill_us_p50')} us"
        )
    cc = result.get("compile")
    if cc:
        t = cc["total"]
        p50s = [r["compile_ms_p50"] for r in cc["per_dataset"].values() if r["compile_ms_p50"]]
        bits.append(
            f"compiled {t.get('compiled')}/{t.get('schemas')}, served {t.get('served')}, "
            f"median per-dataset p50 {sorted(p50s)[len(p50s) // 2] if p50s else None} ms"
        )
    for backend, g in result.get("generate", {}).items():
        t = g["total"]
        bits.append(
            f"{backend} valid {t.get('valid')}/{t.get('finished')} finished "
            f"({t.get('refused')} refused), tok/s ratio {g.get('throughput_ratio')}"
        )
    if "speculation" in result:
        from specserve.bench.jsonschema_speculation import speculation_summary

        bits.append(speculation_summary(result["speculation"]))
    if "tool_speculation" in result:
        from specserve.bench.jsonschema_speculation import speculation_summary

        bits.append("forced tool calls: " + speculation_summary(result["tool_speculation"]))
    if "tools" in result:
        from specserve.bench.jsonschema_tools import tools_summary

        bits.append(tools_summary(result["tools"]))
    return "jsonschema: " + "; ".join(bits + [f"{result.get('seconds')} s"])
