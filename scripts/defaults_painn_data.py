"""Index and split files of the PaiNN defaults study on QM9 (results/defaults/README.md, section PaiNN).

A seeded permutation (seed 2026) of every QM9 index with a GFN2-xTB label: the first 1 000 are the
validation molecules (B3LYP/6-31G(2df,p) only), the next 1 000 the B3LYP training molecules, and these
plus the next 9 000 the GFN2-xTB training molecules of the joint set. No test split is written.

python scripts/defaults_painn_data.py ../shared/data/qm9mf/GFN2-xTB.csv.gz results/defaults/painn
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

N_VAL, N_HIGH, N_LOW = 1000, 1000, 10000


def write(path: Path, values) -> None:
    path.write_text("".join(f"{v}\n" for v in values))


def main(labels: str, out: str) -> None:
    index = np.sort(np.loadtxt(labels, delimiter=",", skiprows=1, usecols=0, dtype=np.int64))
    perm = np.random.default_rng(2026).permutation(index)
    val, high, low = perm[:N_VAL], perm[N_VAL : N_VAL + N_HIGH], perm[N_VAL : N_VAL + N_LOW]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write(out_dir / "b3lyp_indices.txt", np.sort(np.concatenate([val, high])))  # B3LYP labels: val + train
    write(out_dir / "gfn2_indices.txt", np.sort(low))  # GFN2-xTB labels: joint training set only
    write(out_dir / "val.txt", [f"qm9:{i}" for i in np.sort(val)])
    write(out_dir / "train_b3lyp.txt", [f"qm9:{i}" for i in np.sort(high)])
    write(out_dir / "train_joint.txt", [f"qm9:{i}" for i in np.sort(low)])


if __name__ == "__main__":
    main(*sys.argv[1:3])
