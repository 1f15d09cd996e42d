"""What the calculator's check of changed weights costs per call (models.potential.WeightVersions): the lookups a
scripted graph needs (replaced tensors, new storages) and, with copies=True, the bit-for-bit comparison of every
value that the ahead-of-time package needs (it holds copies of the weights).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/weight_checks.py [--calls 1000]

PaiNN 128×3 and M3GNet 64×3 (untrained weights: the cost depends only on their sizes); median µs per check.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from multifi.models.potential import WeightVersions
from multifi.models.registry import build_potential

args = argparse.ArgumentParser()
args.add_argument("--calls", type=int, default=1000)
opts = args.parse_args()
torch.set_num_threads(1)
models = {
    "PaiNN 128×3": {"backbone": "painn", "features": 128, "interactions": 3, "cutoff": 5.0},
    "M3GNet 64×3": {"backbone": "m3gnet", "features": 64, "interactions": 3, "cutoff": 5.0},
}
for name, config in models.items():
    potential = build_potential(config, ["a", "b"])
    n = sum(t.numel() for t in [*potential.parameters(), *potential.buffers()])
    for copies in (False, True):
        versions = WeightVersions(potential, copies=copies)
        times = []
        for _ in range(opts.calls):
            t = time.perf_counter()
            versions.changed()
            times.append(time.perf_counter() - t)
        print(f"{name} ({n} values), copies={copies}: {1e6 * np.median(times):.1f} µs per check")
