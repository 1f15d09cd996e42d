"""Validation (best epoch by val_loss, as the run's checkpoint) and test errors of run directories.

python scripts/defaults_summary.py results/defaults/work/before results/defaults/work/after
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def summary(run: Path) -> dict:
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val_loss")]
    best = min(rows, key=lambda r: float(r["val_loss"]))
    val = {k.split("/")[-1]: float(v) for k, v in best.items() if k.startswith("val/") and v}
    test = json.loads((run / "metrics.json").read_text())["fidelities"]
    return {"best_epoch": int(best["epoch"]), "val": val, "test": test}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        s = summary(Path(arg))
        ((name, t),) = s["test"].items()
        print(
            f"| {arg} | {s['best_epoch']} | {s['val']['energy_mae_meV_per_atom']:.1f} | "
            f"{s['val']['forces_mae_meV_per_A']:.0f} | {t['energy_mae_meV_per_atom']:.1f} | {t['forces_mae_meV_per_A']:.0f} |"
        )
