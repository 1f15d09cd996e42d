"""CPU seconds of the selection steps of experiments/qm9_selection.yaml on its 20,000-molecule pool.

    python bench/selection_cost.py runs/pilot_selection

needs a pilot output folder of that spec (its splits/selection.json and the round-0 joint model of seed 0);
prints process time (and wall time) of: reading the pool, its neighbour lists, the readout features of the
whole pool, 800 batch picks and 800 diversity picks with 1,600 molecules labelled.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from multifi.data.neighbors import make_neighbors
from multifi.data.readers.qm9 import read_qm9
from multifi.models.registry import load_potential
from multifi.select import farthest_points, greedy_variance
from multifi.uncertainty import dataset_features, fit_llpr_fidelity


def main(out: Path, shared: Path = Path("../shared/data")) -> None:
    torch.set_num_threads(1)
    splits = json.loads((out / "splits" / "selection.json").read_text())
    times = {}
    clock = [time.process_time(), time.time()]

    def lap(name):
        times[name] = (round(time.process_time() - clock[0], 1), round(time.time() - clock[1], 1))
        clock[:] = [time.process_time(), time.time()]

    pool = read_qm9(labels=shared / "qm9mf" / "GFN2-xTB.csv.gz", fidelity="GFN2-xTB", indices=np.array(splits["pool"]))
    lap(f"read pool ({len(pool)})")
    nl = make_neighbors(pool, 5.0, progress=False)
    lap("neighbour lists of the pool")
    pot = load_potential(out / "work" / "selection" / "joint" / "s0" / "r0_n100" / "run" / "model.pt")
    f, _ = dataset_features(pot, pool, np.arange(len(pool)), "B3LYP/6-31G(2df,p)", 256, nl)
    lap("readout features of the pool")
    llpr = fit_llpr_fidelity(f[:100], f[100:300], np.random.default_rng(0).normal(0, 0.1, 200))
    greedy_variance(f[1600:], llpr.cov, 800, np.random.default_rng(0))
    lap("batch: 800 picks")
    farthest_points(f[:, :-1] / f[:, -1:], np.arange(1600, len(pool)), np.arange(1600), 800, np.random.default_rng(0))
    lap("diversity: 800 picks, 1600 labelled")
    for name, (cpu, wall) in times.items():
        print(f"{name:40s} {cpu:7.1f} s CPU {wall:7.1f} s wall")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
