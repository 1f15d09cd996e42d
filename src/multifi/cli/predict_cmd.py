"""multifi predict CHECKPOINT STRUCTURES --fidelity NAME --out FILE.extxyz"""

from __future__ import annotations

from multifi.cli.args import add_force, add_stress_order, device_arg, positive_int


def register(sub):
    p = sub.add_parser("predict", help="predict energies, forces (and stress) at one fidelity")
    p.add_argument("checkpoint", help="model.pt, a training checkpoint (.ckpt) or a run directory (its model.pt)")
    p.add_argument(
        "structures", help="any file ASE reads, a MatPES JSON/JSONL, a saved dataset (.npz), qm9 or qm9:LABELS.csv"
    )
    p.add_argument(
        "--fidelity",
        required=True,
        action="append",
        help="fidelity (level of theory) to predict at, by name; repeat for several",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output extxyz (.extxyz or .xyz; .gz compresses) with energy/forces/stress per structure (an existing "
        "one: --force)",
    )
    add_force(p)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--index", default=":", help="frames of a file ASE reads, as ASE's index: -1, 10:20, ::5 (default :)"
    )
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, … (default: cpu)")
    add_stress_order(p)  # the reference stresses a MatPES input carries (kept as ref_stress)
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write energy_sigma (eV) per structure: LLPR σ (needs `multifi calibrate`), or the "
        "ensemble's standard deviation with --ensemble",
    )
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="further models (e.g. other seeds): write their mean with the standard deviation as σ",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    from pathlib import Path

    from multifi.cli.args import refuse_existing
    from multifi.predict import predict_file

    refuse_existing(args.out, force=args.force)
    fidelities = list(dict.fromkeys(args.fidelity))  # a fidelity given twice is predicted once, and said so
    repeated = [f for f in fidelities if args.fidelity.count(f) > 1]
    if repeated:
        logging.getLogger("multifi").warning(
            "--fidelity %s given more than once: predicted once (each fidelity once per frame)",
            ", ".join(repeated),
        )
    n = predict_file(
        args.checkpoint,
        args.structures,
        fidelities,
        Path(args.out),
        args.batch_size,
        args.device,
        uncertainty=args.uncertainty,
        ensemble=args.ensemble,
        index=args.index,
        stress_order=args.stress_order,
    )
    frames = "1 frame" if n == 1 else f"{n} frames"
    print(f"wrote {frames} (one per input frame) predicted at {', '.join(fidelities)} to {args.out}")
    return 0
