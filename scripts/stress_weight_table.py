"""The table of results/defaults/README.md, section "Stress weight": per run of results/defaults/m3gnet_stress.yaml
(results/defaults/work/stress_<weight>) the validation errors at the checkpoint with the lowest validation loss, and
the stress error of predicting zero on the same validation structures.

    python scripts/stress_weight_table.py
"""

import csv
import json
from pathlib import Path

import numpy as np

from multifi.data.dataset import FidelityDataset

WORK = Path(__file__).resolve().parents[1] / "results" / "defaults" / "work"


def main() -> None:
    runs = sorted(WORK.glob("stress_*"), key=lambda d: float(d.name.split("_")[1]))
    for d in runs:
        if not (d / "metrics.csv").exists():
            continue
        with open(d / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/PBE/energy_mae_meV_per_atom")]
        best = min(rows, key=lambda r: float(r["val_loss"]))
        print(
            f"loss.stress {d.name.split('_')[1]:>6}: step {best['step']:>5}, energy "
            f"{float(best['val/PBE/energy_mae_meV_per_atom']):.1f} meV/atom, forces "
            f"{float(best['val/PBE/forces_mae_meV_per_A']):.1f} meV/Å, stress {float(best['val/PBE/stress_mae_GPa']):.2f} GPa"
        )
    d = runs[0]
    ds = FidelityDataset.load(d / "dataset.npz")
    val = set(json.loads((d / "splits.json").read_text())["val"])
    idx = [i for i, k in enumerate(ds.keys) if k in val]
    mask = ds.stress_mask[idx, 0]
    print(f"predicting zero stress: {np.abs(ds.stress[idx, 0][mask]).mean():.2f} GPa over {int(mask.sum())} structures")


if __name__ == "__main__":
    main()
