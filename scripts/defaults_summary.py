"""Validation (best validation by val_loss, as the run's checkpoint) and test errors of run directories.

python scripts/defaults_summary.py results/defaults/work/before results/defaults/work/after
python scripts/defaults_summary.py --energy results/defaults/work/b3lyp_A ...

--energy: energy-only runs without a test split (the PaiNN study): one row per run with the steps trained,
the step and validation MAE (meV per molecule, meV/atom) of the checkpoint val_loss picks, the lowest
validation MAE of the run, and the CPU seconds of `<run>.time` beside the run directory (GNU time
"%U %S %e": user, system, wall seconds) when it exists. --forces: the same with the validation force MAE of
that checkpoint.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def validations(run: Path) -> list[dict]:
    return [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val_loss")]


def summary(run: Path) -> dict:
    best = min(validations(run), key=lambda r: float(r["val_loss"]))
    val = {k.split("/")[-1]: float(v) for k, v in best.items() if k.startswith("val/") and v}
    test = json.loads((run / "metrics.json").read_text())["fidelities"]
    return {"best_epoch": int(best["epoch"]), "val": val, "test": test}


def energy_row(run: Path, forces: bool = False) -> str:
    rows = validations(run)
    mae = lambda r: next(float(v) for k, v in r.items() if k.endswith("/energy_mae_meV") and v)  # noqa: E731
    per_atom = lambda r: next(float(v) for k, v in r.items() if k.endswith("/energy_mae_meV_per_atom") and v)  # noqa: E731
    best = min(rows, key=lambda r: float(r["val_loss"]))
    steps = max(int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())) + 1
    timing = run.parent / f"{run.name}.time"
    cpu = "—"
    fields = timing.read_text().split()[-3:] if timing.exists() else []
    if len(fields) == 3:  # written when the run ended
        cpu = f"{float(fields[0]) + float(fields[1]):.0f}"
    force = next((f" {float(v):.0f} |" for k, v in best.items() if k.endswith("/forces_mae_meV_per_A") and v), "")
    return (
        f"| {run.name} | {steps} | {int(best['step']) + 1} | {mae(best):.1f} | {per_atom(best):.2f} |"
        f"{force if forces else ''} {min(mae(r) for r in rows):.1f} | {cpu} |"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] in ("--energy", "--forces"):
        forces = args[0] == "--forces"
        force_col = " val force MAE meV/Å |" if forces else ""
        print(
            f"| run | steps | step of checkpoint | val MAE meV | val MAE meV/atom |{force_col} lowest val MAE meV | CPU s |"
        )
        print("|---|---|---|---|---|---|---|" + ("---|" if forces else ""))
        for arg in args[1:]:
            print(energy_row(Path(arg), forces))
        sys.exit(0)
    for arg in args:
        s = summary(Path(arg))
        ((name, t),) = s["test"].items()
        print(
            f"| {arg} | {s['best_epoch']} | {s['val']['energy_mae_meV_per_atom']:.1f} | "
            f"{s['val']['forces_mae_meV_per_A']:.0f} | {t['energy_mae_meV_per_atom']:.1f} | {t['forces_mae_meV_per_A']:.0f} |"
        )
