"""multifi train CONFIG.yaml [--set key=value …] | multifi train --resume RUN_DIR"""

from __future__ import annotations

from multifi.cli.args import positive_int


def register(sub):
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", nargs="?", help="run configuration (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--devices", help="devices per node (e.g. 2, or 'auto')")
    p.add_argument("--num-nodes", type=positive_int, help="number of nodes for distributed training")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check config and data, print the plan (samples per fidelity and split, parameters), write nothing",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from multifi.config import Override

    if args.resume:  # before torch and Lightning load (seconds): a mistyped folder is said at once
        from multifi.train.resume_args import check_resume_args

        check_resume_args(args.config, args.overrides, args.resume)
    from multifi.train.run import train_from_args

    overrides = list(args.overrides)
    if args.devices is not None:
        overrides.append(Override(f"train.devices={args.devices}", f"--devices {args.devices}"))
    if args.num_nodes is not None:
        overrides.append(Override(f"train.num_nodes={args.num_nodes}", f"--num-nodes {args.num_nodes}"))
    run_dir = train_from_args(args.config, overrides, args.resume, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    from multifi.logs import is_leader_process

    metrics = run_dir / "metrics.json"
    if metrics.exists() and is_leader_process():  # once, not once per rank
        import json

        from multifi.cli.format import doubtful_units_note, metrics_table

        payload = json.loads(metrics.read_text())
        test = payload["fidelities"]
        if test:
            print(metrics_table(test, title=f"test metrics ({run_dir})"))
            note = doubtful_units_note(payload)
            if note:
                print(note)
        else:
            print(f"no test structures (data.split.test: 0 or no test file): no test metrics ({run_dir})")
    return 0
