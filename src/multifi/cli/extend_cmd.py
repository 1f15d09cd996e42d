"""multifi extend MODEL.pt --data NEW.extxyz --fidelity NAME --out RUN_DIR [--train embedding|head|all] …"""

from __future__ import annotations

import json

from multifi.cli.args import add_label_keys, label_keys

#: flag → config key (every flag is an override of the `extend`, `data` or `train` section)
FLAGS = {
    "model": "extend.model",
    "fidelity": "extend.fidelity",
    "train": "extend.train",
    "replay": "extend.replay",
    "replay_fidelity": "extend.replay_fidelities",
    "old_run": "extend.old_run",
    "init_like": "extend.init_like",
    "out": "output_dir",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
}


def register(sub):
    p = sub.add_parser("extend", help="add a level of theory to a trained model without forgetting the others")
    p.add_argument("model", nargs="?", help="saved model (model.pt) to extend, or its run directory")
    p.add_argument("--config", help="YAML config with an 'extend' section (flags override it)")
    p.add_argument(
        "--data",
        nargs="+",
        help="labelled data of the new fidelity (structures naming none are taken as --fidelity; naming another is an error)",
    )
    p.add_argument("--fidelity", help="name of the new fidelity")
    add_label_keys(p)  # of the --data files
    p.add_argument("--out", help="new run directory (model.pt, metrics.json with the forgetting report)")
    p.add_argument(
        "--train",
        choices=("embedding", "head", "all"),
        help="what trains: the new vector only (default; old fidelities unchanged), also the readout, or everything",
    )
    p.add_argument("--replay", type=float, help="fraction of the old training data mixed in (head/all)")
    p.add_argument("--replay-fidelity", action="append", help="replay only this old fidelity (repeatable)")
    p.add_argument("--old-run", help="run directory of MODEL (default: its folder) for replay and forgetting")
    p.add_argument("--init-like", help="start the new fidelity from this one's vector/head (default: the first)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an unfinished extension (killed, interrupted) from its last checkpoint, with its own settings",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check model, config and data, print the plan (samples per split, trainable parameters), write nothing",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=0.01 (repeatable)",
    )
    p.set_defaults(func=run)


def overrides_from_args(args) -> list[str]:
    from multifi.config import Override
    from multifi.data.sources import source_from_text

    here = _from_working_directory
    out = [
        Override(f"{key}={json.dumps(here(value) if flag in PATH_FLAGS else value)}", _as_written(flag, value))
        for flag, key in FLAGS.items()
        if (value := getattr(args, flag)) is not None and flag != "model"
    ]
    if args.model is not None:  # MODEL.pt is positional
        out.insert(0, Override(f"extend.model={json.dumps(here(args.model))}", str(args.model)))
    keys = label_keys(args)
    if keys and not args.data:
        from multifi.errors import MultifiError

        flags = ", ".join(f"--{k.replace('_', '-')}" for k in keys)
        raise MultifiError(f"multifi extend: {flags} name labels of the --data files; give --data (a config's sources "
                           "take them as energy_key, forces_key, stress_key, fidelity_key, stress_order)")  # fmt: skip
    if args.data:
        sources = [source_from_text(p, args.fidelity, **keys).model_dump(exclude_none=True) for p in args.data]
        for src in sources:
            if "path" in src:
                src["path"] = here(src["path"])
            if (src.get("qm9") or {}).get("labels"):
                src["qm9"]["labels"] = here(src["qm9"]["labels"])
        out.append(Override(f"data.sources={json.dumps(sources)}", "--data " + " ".join(args.data)))
    return out + list(args.overrides)


#: flags naming files: relative to the working directory, as a shell user means them (a config file's own paths
#: and --set values are relative to the config file's folder)
PATH_FLAGS = {"model", "old_run"}


def _from_working_directory(path: str) -> str:
    from pathlib import Path

    return path if Path(path).is_absolute() else str(Path.cwd() / path)


def _as_written(flag: str, value) -> str:
    """A flag and its value(s) as the command line gave them (errors name them so)."""
    values = value if isinstance(value, list) else [value]
    return " ".join(f"--{flag.replace('_', '-')} {v}" for v in values)


def run(args) -> int:
    from multifi.cli.format import doubtful_units_note, forgetting_table, metrics_table
    from multifi.errors import MultifiError
    from multifi.train.extend import extend_from_args

    if args.resume is not None:
        given = [f"--{f.replace('_', '-')}" for f in FLAGS if f != "model" and getattr(args, f) is not None]
        given += ["MODEL.pt"] * (args.model is not None) + ["--config"] * (args.config is not None)
        given += ["--data"] * bool(args.data) + ["--set"] * bool(args.overrides)
        given += [f"--{k.replace('_', '-')}" for k in label_keys(args)]
        if given:
            raise MultifiError(
                f"multifi extend --resume {args.resume} continues with the run's own settings (its config.yaml); "
                f"drop {', '.join(given)}"
            )
        from pathlib import Path

        finished = (Path(args.resume) / "model.pt").exists()  # then nothing is written: none said to be
        run_dir = extend_from_args(None, [], dry_run=args.dry_run, resume_dir=args.resume)
    elif args.config is None:
        missing = [
            what
            for what, given in (
                ("MODEL.pt", args.model),
                ("--data", args.data),
                ("--fidelity", args.fidelity),
                ("--out", args.out),
            )
            if not given
        ]
        if missing:
            raise MultifiError(f"multifi extend needs {', '.join(missing)} (or --config FILE with an 'extend' section)")
    if args.resume is None:
        run_dir = extend_from_args(args.config, overrides_from_args(args), dry_run=args.dry_run)
    if args.dry_run:
        return 0
    payload = json.loads((run_dir / "metrics.json").read_text())
    name = payload["new_fidelity"]
    if name in payload["fidelities"]:
        print(metrics_table({name: payload["fidelities"][name]}, title=f"{name} test metrics ({run_dir})"))
    else:
        print(f"{name}: no test structures, no test metrics ({run_dir})")
    print(forgetting_table(payload["forgetting"], payload["old_fidelities_unchanged"]))
    note = doubtful_units_note(payload)
    if note:
        print(note)
    written = args.resume is None or not finished
    print(f"{'wrote' if written else 'model (unchanged):'} {run_dir / 'model.pt'}")
    return 0
