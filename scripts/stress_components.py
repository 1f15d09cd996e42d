"""Correlation of a trained model's stresses with the labels, split into pressure, deviatoric diagonal and
off-diagonal parts, on one split of a run made from results/defaults/m3gnet_stress.yaml.

    python scripts/stress_components.py WEIGHT [train|val]     # reads results/defaults/work/stress_WEIGHT
"""

import json
import sys

import numpy as np
from ase import Atoms
from ase.units import GPa

import multifi
from multifi.data.dataset import FidelityDataset

w = sys.argv[1]
d = f"results/defaults/work/stress_{w}"
ds = FidelityDataset.load(f"{d}/dataset.npz")
val = set(json.load(open(f"{d}/splits.json"))[sys.argv[2] if len(sys.argv) > 2 else "val"])
calc = multifi.Calculator(f"{d}/model.pt", fidelity="PBE")
off = np.asarray(ds.offsets)
P, Pl, D, Dl, O, Ol = [], [], [], [], [], []
for i, k in enumerate(ds.keys):
    if k not in val:
        continue
    a = Atoms(ds.numbers[off[i] : off[i + 1]], ds.positions[off[i] : off[i + 1]], cell=ds.cells[i], pbc=True)
    a.calc = calc
    s = a.get_stress(voigt=False) / GPa
    l = ds.stress[i, 0]
    P.append(-np.trace(s) / 3)
    Pl.append(-np.trace(l) / 3)
    D += list(np.diag(s) - np.trace(s) / 3)
    Dl += list(np.diag(l) - np.trace(l) / 3)
    O += [s[0, 1], s[0, 2], s[1, 2]]
    Ol += [l[0, 1], l[0, 2], l[1, 2]]
c = lambda a, b: np.corrcoef(a, b)[0, 1]
print(
    w,
    "pressure corr",
    round(c(P, Pl), 3),
    "deviatoric-diag corr",
    round(c(D, Dl), 3),
    "off-diag corr",
    round(c(O, Ol), 3),
    "| label P std",
    round(np.std(Pl), 2),
    "pred P std",
    round(np.std(P), 2),
)
