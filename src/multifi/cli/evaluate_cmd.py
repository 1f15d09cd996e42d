"""multifi evaluate CHECKPOINT DATA… [--fidelity NAME] [--out FILE]"""

from __future__ import annotations

from multifi.cli.args import add_force, add_label_keys, device_arg, positive_int


def register(sub):
    p = sub.add_parser("evaluate", help="per-fidelity errors of a trained model on labelled data")
    p.add_argument("checkpoint", help="model.pt, a training checkpoint (.ckpt) or a run directory (its model.pt)")
    p.add_argument(
        "data",
        nargs="+",
        help="labelled data: files (extxyz, ASE db, MatPES JSON, multifi .npz) or "
        "qm9[:LABELS.csv], as in a config's data.sources",
    )
    p.add_argument(
        "--fidelity",
        help="label fidelity for files that do not name one per structure; "
        "with it, only labels of this fidelity are evaluated",
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--index", default=":", help="frames of each file ASE reads, as ASE's index: -1, 10:20, ::5")
    p.add_argument("--out", help="write the metrics as JSON to this file (an existing one: --force)")
    p.add_argument(
        "--plot", metavar="FILE.png", help="parity plot (predicted vs reference energy per atom) per fidelity"
    )
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, … (default: cpu)")
    add_label_keys(p)
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also measure the calibration of σ per fidelity (Spearman |error| vs σ, miscalibration "
        "area): LLPR σ (needs `multifi calibrate`), or the ensemble's spread with --ensemble",
    )
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="further models of a deep ensemble: the errors of their mean, and the calibration of their spread",
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="leave NaN/inf labels out of the errors instead of failing"
    )
    p.add_argument(
        "--group-by",
        metavar="KEY",
        help="also report the errors per value of this per-frame info key of the files (ASE-readable ones), e.g. "
        "config_type (MACE's), in the table and --out",
    )
    add_force(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from multifi.cli.args import label_keys, refuse_existing
    from multifi.cli.format import metrics_table
    from multifi.evaluation import evaluate_files
    from multifi.files import atomic_write, encoded_for, json_text

    refuse_existing(args.out, args.plot, force=args.force)
    if args.plot:  # a format matplotlib lacks fails before anything is computed or written
        from multifi.plots import image_format

        image_format(Path(args.plot))
    result = evaluate_files(
        args.checkpoint,
        args.data,
        args.fidelity,
        batch_size=args.batch_size,
        index=args.index,
        device=args.device,
        keys=label_keys(args),
        stress_order=args.stress_order,
        uncertainty=args.uncertainty,
        ensemble=args.ensemble,
        skip_invalid=args.skip_invalid,
        group_by=args.group_by,
        diagnose=False,  # after the table, which the warnings explain
    )
    payload = result.payload
    print(metrics_table(result.metrics, title=f"{result.evaluated_by} on {', '.join(map(str, args.data))}"))
    for group in payload.get("groups", {}).get("values", []):
        print()
        print(metrics_table(group["fidelities"], title=group_title(args.group_by, group)))
    result.warn_about_labels()
    if "uncertainty" in payload:
        from multifi.uncertainty import uncertainty_table

        print(uncertainty_table(payload["uncertainty"]))
        result.warn_about_uncertainty()
    if args.out:
        text = json_text(payload).encode()
        atomic_write(Path(args.out), lambda f: f.write(encoded_for(Path(args.out), text)))
        print(f"wrote {args.out}")
    if args.plot:
        from multifi.plots import parity_plot

        names, reference, predicted, estimated = result.parity()
        parity_plot(Path(args.plot), names, reference, predicted, result.evaluated_by, estimated, relative=True)
        print(f"wrote {args.plot}")
    return 0


def group_title(name: str, group: dict) -> str:
    """The heading of a group's table: `config_type = bulk (12 structures)`."""
    n = group["structures"]
    shown = f"{name} = {group['value']}" if group["value"] is not None else f"no {name}"
    return f"{shown} ({n} structure{'s' if n != 1 else ''})"
