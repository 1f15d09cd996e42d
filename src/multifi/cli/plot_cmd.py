"""multifi plot RUN_DIR [--out FILE.png] [--metric KEY]: a run's learning curve per fidelity."""

from __future__ import annotations

from multifi.cli.args import add_force
from multifi.keys import ENERGY_MAE, METRIC_KEYS


def register(sub):
    p = sub.add_parser("plot", help="learning curve of a run directory: validation error per fidelity against step")
    p.add_argument("run_dir")
    p.add_argument(
        "--out", help="image file (default: RUN_DIR/learning_curve.png, replaced; another existing file: --force)"
    )
    add_force(p)
    p.add_argument(
        "--metric",
        default=ENERGY_MAE,
        choices=list(METRIC_KEYS),
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from multifi.cli.args import refuse_existing
    from multifi.plots import learning_curve_plot

    refuse_existing(args.out, force=args.force)  # the run's own learning_curve.png is redrawn
    out = Path(args.out) if args.out else Path(args.run_dir) / "learning_curve.png"
    learning_curve_plot(Path(args.run_dir), out, args.metric)
    print(f"wrote {out}")
    return 0
