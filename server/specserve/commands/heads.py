"""Medusa / Hydra draft heads: train them on a frozen target, find the demo model's, convert.

Examples:
    specserve heads train --kind hydra --model /models/demo --out /models/demo-hydra
    specserve heads train --kind medusa,hydra --out-root /models/heads   # same data and budget
    specserve heads train --kind hydra --prefix-attention --out /models/demo-hydra-pa   # Hydra++
    specserve heads path --kind medusa          # the demo model's heads (trained once, cached)
    specserve heads convert --heads DIR --model DIR --out DIR   # for vLLM's own Medusa proposer
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="heads_command", required=True)
    t = sub.add_parser("train", help="train heads by self-distillation on a frozen target")
    t.add_argument("--kind", default="medusa", help="medusa, hydra, or both comma-separated")
    t.add_argument("--model", type=Path, default=None, help="target model dir (default: the demo model)")
    t.add_argument("--out", type=Path, default=None, help="checkpoint dir (one kind)")
    t.add_argument("--out-root", type=Path, default=None, help="checkpoints go to OUT_ROOT/<kind> (any kinds)")
    t.add_argument("--corpus", type=Path, default=None,
                   help="text/code files for the prompts (default: the demo model's training split)")
    t.add_argument("--num-heads", type=int, default=None)
    t.add_argument("--num-layers", type=int, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--sequences", type=int, default=None, help="self-distillation sequences")
    t.add_argument("--loss", choices=("teacher", "hard"), default=None)
    t.add_argument("--prefix-attention", action="store_true",
                   help="Hydra only: heads read a causal attention block over all hidden states (Hydra++)")
    t.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("path", help="print the demo model's heads dir (trains them once if missing)")
    p.add_argument("--kind", choices=("medusa", "hydra"), required=True)
    c = sub.add_parser("convert", help="convert Medusa heads for vLLM's own Medusa proposer")
    c.add_argument("--heads", type=Path, required=True)
    c.add_argument("--model", type=Path, default=None, help="target model dir (default: the demo model)")
    c.add_argument("--out", type=Path, required=True)


def _train(args: argparse.Namespace) -> int:
    from specserve.demo import demo_model_dir
    from specserve.head_training import build
    from specserve.head_training.recipe import HeadsRecipe

    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("medusa", "hydra")]
    if bad or not kinds:
        sys.stderr.write(f"--kind: unknown {bad or kinds}; use medusa, hydra or medusa,hydra\n")
        return 2
    if args.prefix_attention and "hydra" not in kinds:
        sys.stderr.write("--prefix-attention is a Hydra option; add --kind hydra\n")
        return 2
    if args.out_root is not None:
        outs = {k: args.out_root / k for k in kinds}
    elif args.out is not None and len(kinds) == 1:
        outs = {kinds[0]: args.out}
    else:
        sys.stderr.write("give --out for one kind, or --out-root for several\n")
        return 2
    recipe = HeadsRecipe()
    overrides = {"num_heads": args.num_heads, "num_layers": args.num_layers, "steps": args.steps,
                 "sequences": args.sequences, "loss": args.loss,
                 "prefix_attention": args.prefix_attention or None}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    model = args.model or demo_model_dir(progress=not args.no_progress)
    records = build(Path(model), outs, recipe, corpus=args.corpus, progress=not args.no_progress)
    summary = {k: {"dir": str(outs[k]), "seconds": r["train_seconds"], **r["heldout"]} for k, r in records.items()}
    sys.stdout.write(json.dumps(summary) + "\n")
    for kind, r in records.items():
        top1 = ", ".join(f"{x:.3f}" for x in r["heldout"]["top1"])
        sys.stderr.write(f"{kind} heads: held-out top-1 per head [{top1}], est. tau {r['heldout']['est_tau']}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.heads_command == "train":
        return _train(args)
    if args.heads_command == "path":
        from specserve.head_training import demo_heads_dir

        sys.stdout.write(f"{demo_heads_dir(args.kind)}\n")
        return 0
    from specserve.demo import demo_model_dir
    from specserve.head_training.convert import convert_to_vllm_medusa
    from specserve_vllm.heads.config import CheckpointError

    try:
        out = convert_to_vllm_medusa(args.heads, args.model or demo_model_dir(), args.out)
    except CheckpointError as exc:
        sys.stderr.write(f"heads convert: {exc}\n")
        return 2
    sys.stdout.write(f"{out}\n")
    return 0
