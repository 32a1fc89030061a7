"""Benchmarks: ``specserve bench <name> ...``; each prints JSON and a one-line summary.

Every benchmark is a module under :mod:`specserve.bench` with ``add_arguments(parser)`` and
``run(args) -> int``; add one by naming it in ``BENCHES``.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module under specserve.bench, help)
BENCHES: dict[str, tuple[str, str]] = {
    "jsonschema": ("jsonschema", "structured outputs on JSONSchemaBench (MaskBench, compile)"),
    "drafters": ("drafters", "drafters: tau, tokens/s and speedup vs no speculation"),
    "gateway": ("gateway_overhead", "gateway overhead vs direct engine under concurrent streams"),
    "spec-policy": ("spec_policy", "goodput speculation length vs a fixed one, same engine"),
    "soak": ("soak", "mixed traffic through specserve serve for a bounded time, every answer checked"),
    "spec-off": ("spec_off", "every request at k=0 vs an engine without a drafter (interleaved)"),
    "trees": ("trees", "a drafter's chains vs static and dynamic trees at equal node budgets: tau, tokens/s"),
    "chain-verify": ("chain_verify", "chains verified by the walk vs by vLLM's rejection sampler, and no speculation"),
    "tree-parts": ("tree_parts", "tree verification's parts by node count: attention rows, KV read-back, verifier"),
    "tree-projection": ("tree_projection", "a `bench trees` run's tau priced at per-row costs from free to this CPU's"),
    "goodput": ("goodput", "engine goodput controller vs no drafter and every fixed k: open, closed loop, load step"),
    "controller": ("controller", "the goodput controller's warm cost per decision and per learnt step, by batch size"),
    "routing": ("routing", "goodput-aware routing vs least-loaded over two replicas (closed loop, paired)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, (module, help_text) in BENCHES.items():
        mod = importlib.import_module(f"specserve.bench.{module}")
        p = sub.add_parser(name, help=help_text, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
