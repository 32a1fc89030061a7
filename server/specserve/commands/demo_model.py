"""Build (or find) the demo model: a small Llama trained on the stdlib's Python and generated JSON.

Prints the directory vLLM loads. `--retrain DIR` trains the recipe again into DIR (e.g. to
reproduce the shipped artifact) and prints its record; with `--from-base DIR2` only the second
stage (tool-call tuning) runs, on the first-stage model in DIR2 (the shipped model before tuning
has the recipe's base fingerprint).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-path", action="store_true", help="only print the model directory")
    parser.add_argument("--retrain", type=Path, default=None, help="train the recipe again into DIR")
    parser.add_argument("--from-base", type=Path, default=None,
                        help="with --retrain: tune the first-stage model in DIR instead of training one")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--tool-steps", type=int, default=None, help="override the number of tool-tuning steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from specserve.demo import demo_model_dir
    from specserve.demo.spec import DemoSpec

    spec = DemoSpec() if args.steps is None else replace(DemoSpec(), steps=args.steps)
    if args.tool_steps is not None:
        spec = replace(spec, tool_steps=args.tool_steps)
    if args.from_base is not None and args.retrain is None:
        sys.stderr.write("--from-base needs --retrain DIR\n")
        return 2
    if args.retrain is not None:
        from specserve.demo.build import build, build_from_base

        if args.from_base is not None:
            record = build_from_base(args.from_base.resolve(), args.retrain.resolve(), spec,
                                     progress=not args.no_progress)
        else:
            record = build(args.retrain.resolve(), spec, progress=not args.no_progress)
        keys = ("fingerprint", "params", "train_seconds", "heldout", "untrained")
        summary = {k: record[k] for k in keys if k in record}
        if "tool_tuning" in record:
            summary["tool_tuning"] = {k: record["tool_tuning"][k] for k in ("before", "after", "train_seconds")}
        sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    path = demo_model_dir(spec, progress=not args.no_progress)
    sys.stdout.write(f"{path}\n")
    if not args.print_path:
        record = json.loads((path / "record.json").read_text())
        sys.stderr.write(json.dumps({"heldout": record.get("heldout"), "params": record.get("params")}) + "\n")
    return 0
