"""multifi calibrate RUN_DIR | MODEL --train FILE… --val FILE… [--fidelity NAME]"""

from __future__ import annotations

import logging

log = logging.getLogger("multifi")

#: validation structures per fidelity below which its calibrated alpha is called a rough estimate
FEW_VALIDATION = 10


def register(sub):
    p = sub.add_parser("calibrate", help="fit the LLPR uncertainty of a model (written next to it as <model>.llpr.npz)")
    p.add_argument("model", help="a run directory (its model.pt, training and validation splits) or a model file")
    p.add_argument("--train", nargs="+", help="labelled training structures (with a model file)")
    p.add_argument("--val", nargs="+", help="labelled validation structures: α and λ are calibrated on them")
    p.add_argument("--fidelity", help="fidelity of files that do not name one per structure")
    p.add_argument("--batch-size", type=int, default=64, help="structures per forward pass (memory, not results)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from multifi.errors import MultifiError
    from multifi.uncertainty import calibrate_files, calibrate_run

    if not Path(args.model).exists():
        raise MultifiError(f"{args.model}: no such model file or run directory")
    if Path(args.model).is_dir():
        if args.train or args.val:
            raise MultifiError(
                f"{args.model}: a run directory brings its own splits; give --train/--val with a model file"
            )
        if args.fidelity:  # it names the fidelity of files without one; a run's data name theirs
            raise MultifiError(
                f"{args.model}: --fidelity applies to --train/--val files that name no fidelity; a run directory is "
                "calibrated at every fidelity of its data"
            )
        llpr, path = calibrate_run(args.model, batch_size=args.batch_size)
    else:
        if not (args.train and args.val):
            raise MultifiError(f"{args.model}: a model file needs --train and --val data (or give its run directory)")
        llpr, path = calibrate_files(args.model, args.train, args.val, args.fidelity, args.batch_size)
    for name, p in llpr.fidelities.items():
        print(
            f"{name}: alpha {p.alpha:.4g}, ridge {p.ridge:.3g}, {p.n_train} training / {p.n_val} validation structures"
        )
        if p.ridge_at_limit:
            log.warning(
                "%s: the validation errors are likeliest with the largest ridge tried (λ → ∞): σ is then about "
                "proportional to the norm of a structure's readout features, and the training features tell no "
                "direction of them apart; its ranking of structures means little",
                name,
            )
        if p.n_val < FEW_VALIDATION:
            log.warning(
                "%s: alpha is calibrated on %d validation structure(s): a rough estimate (its spread over %d "
                "structures is about ±%.0f %%); give more validation structures",
                name,
                p.n_val,
                p.n_val,
                100 * (1 / (2 * max(p.n_val, 1))) ** 0.5,  # relative standard error of a scale from n residuals
            )
    print(f"wrote {path}")
    return 0
