"""`multifi` entry point: parse the command, run it, turn MultifiError into a one-line message."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from multifi.errors import MultifiError, Terminated
from multifi.logs import is_leader_process, not_file_only, quiet_lightning
from multifi.ranks import end_with_parent

COMMANDS = ("train", "extend", "evaluate", "predict", "info", "data", "config", "plot", "deploy", "calibrate", "select")
#: entry-point group through which installed packages add subcommands (e.g. `multifi experiment` from
#: multifi_experiments): each entry point is a `register(subparsers)` function
PLUGIN_GROUP = "multifi.commands"


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line, like every other multifi error (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{_prefix(self.prog)}{message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """Arguments left over are named with the command they followed (`multifi predict: …`, not `multifi`)."""
        if args is None:
            args = sys.argv[1:]
        ns, extras = self.parse_known_args(_joined_negative_index(list(args)), namespace)
        if extras:
            prog = _deepest_command(self, ns).prog
            self.exit(2, f"{_prefix(prog)}unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        return ns


def _joined_negative_index(args: list) -> list:
    """`--index -3:` as `--index=-3:`: argparse takes a value starting with '-' (other than a plain negative
    number) for an option and said '--index: expected one argument'."""
    out = []
    for arg in args:
        if out and out[-1] == "--index" and re.match(r"-\d", str(arg)):
            out[-1] = f"--index={arg}"
        else:
            out.append(arg)
    return out


def _prefix(prog: str) -> str:
    """'multifi: error: ' and the subcommand, if any ('multifi: error: multifi train: '), before a usage error."""
    return "multifi: error: " + ("" if prog == "multifi" else f"{prog}: ")


def _deepest_command(parser: argparse.ArgumentParser, ns) -> argparse.ArgumentParser:
    """The (sub)command parser the parsed arguments reached, e.g. that of `multifi experiment status`."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(ns, subs[0].dest, None) if subs and subs[0].dest else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="multifi", description="One atomistic model for many levels of theory.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    import importlib
    from importlib.metadata import entry_points

    for name in COMMANDS:
        importlib.import_module(f"multifi.cli.{name}_cmd").register(sub)
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        plugin.load()(sub)
    _verbose_anywhere(sub)
    return parser


def _verbose_anywhere(sub) -> None:
    """`-v` after the command (`multifi train c.yaml -v`) as well as before it, in every subcommand."""
    for command in sub.choices.values():
        if "--verbose" not in command._option_string_actions and "-v" not in command._option_string_actions:
            command.add_argument(
                "--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_anywhere(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    before = list(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # third-party debug logs stay off with -v
    for handler in logging.getLogger().handlers:  # the console it made: train.log's own lines stay out of it
        if handler not in before:
            handler.addFilter(not_file_only)
    logging.getLogger("multifi").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not is_leader_process():  # further ranks of a multi-process training: their log would repeat rank 0's
        logging.getLogger("multifi").setLevel(logging.ERROR)
        end_with_parent()  # killed outright, the launcher would leave this rank waiting in a collective
    quiet_lightning(verbose=args.verbose)
    try:
        check_outputs_are_not_inputs(args)
        return int(args.func(args) or 0)
    except MultifiError as exc:
        if args.verbose:
            raise
        print(f"multifi: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head, less, …: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as exc:
        hint = f"; {exc}" if str(exc) else ""
        terminated = isinstance(exc, Terminated)
        if is_leader_process():  # the further ranks of a multi-process training would repeat it
            print(f"multifi: {'terminated' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if terminated else 130


#: options that name files a command writes
OUTPUT_OPTIONS = ("out", "plot")


def check_outputs_are_not_inputs(args) -> None:
    """An output file (--out, --plot) that is one of the command's inputs would be overwritten by it (a data
    file replaced by metrics JSON, a model by a deployed file): an error before anything runs. A run directory
    given as input stands for its model.pt."""
    for option in OUTPUT_OPTIONS:
        out = getattr(args, option, None)
        if not out or not Path(out).is_file():
            continue
        for name, value in vars(args).items():
            if name in OUTPUT_OPTIONS:
                continue
            for given in value if isinstance(value, list) else [value]:
                if not isinstance(given, (str, Path)) or not str(given):
                    continue
                path = Path(given) / "model.pt" if Path(given).is_dir() else Path(given)
                if path.is_file() and os.path.samefile(path, out):
                    raise MultifiError(
                        f"{out}: --{option} is also an input of this command ({given}); it would be overwritten: "
                        "write to another file"
                    )


if __name__ == "__main__":
    sys.exit(main())
