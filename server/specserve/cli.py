"""The ``specserve`` command line: one sub-command per module in :mod:`specserve.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> module under specserve.commands exposing add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "start the engine and the gateway in front of it"),
    "gateway": ("gateway", "run only the gateway in front of existing engine replicas"),
    "demo-model": ("demo_model", "build (or find) the demo model and print where it is"),
    "heads": ("heads", "train Medusa / Hydra draft heads"),
    "bench": ("bench", "benchmarks (print JSON and a summary line)"),
    "calibrate": ("calibrate", "fit the engine's step-time model for the goodput policy"),
}


class UsageError(ValueError):
    """Arguments a command refuses after parsing (a value that only the command can check): the
    command line prints it as argparse does, with the usage, and exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"specserve.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"specserve.commands.{module}":
                raise
            continue  # sub-command not shipped in this build
        p = sub.add_parser(name, help=help_text, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # examples as written
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from specserve.logs import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        parser.error(f"{args.command}: {exc}")  # exits 2


if __name__ == "__main__":
    sys.exit(main())
