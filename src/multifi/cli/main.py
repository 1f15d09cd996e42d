"""`multifi` entry point: parse the command, run it, turn MultifiError into a one-line message."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from multifi.errors import MultifiError

COMMANDS = ("train", "evaluate", "predict", "data", "calibrate", "select")
#: entry-point group through which installed packages add subcommands (e.g. `multifi experiment` from
#: multifi_experiments): each entry point is a `register(subparsers)` function
PLUGIN_GROUP = "multifi.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multifi", description="One atomistic model for many levels of theory.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    import importlib
    from importlib.metadata import entry_points

    for name in COMMANDS:
        importlib.import_module(f"multifi.cli.{name}_cmd").register(sub)
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except MultifiError as exc:
        if args.verbose:
            raise
        print(f"multifi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multifi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
