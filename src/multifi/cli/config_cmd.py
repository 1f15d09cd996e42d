"""multifi config --example [--out FILE]: every configuration key with its default and meaning."""

from __future__ import annotations

from multifi.cli.args import add_force


def register(sub):
    p = sub.add_parser("config", help="print a commented example configuration (every key, default, meaning)")
    p.add_argument("--example", action="store_true", help="print the example configuration (the default action)")
    p.add_argument("--out", help="write it to this file instead of printing it (an existing file: --force)")
    add_force(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from multifi.config_reference import example_yaml

    text = example_yaml()
    if args.out:
        from multifi.cli.args import refuse_existing
        from multifi.files import write_text

        refuse_existing(args.out, force=args.force)
        write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0
