"""Probe: the share of an M3GNet radial basis's autograd in the force+stress training step. The basis is computed
under no_grad (wrong gradients: a probe, not a variant), alternating with the real step batch by batch on the
batches of bench/profile_m3gnet.py; prints the median of per-step thread-CPU ratios detached / real.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/probe_detached_basis.py --basis spherical|smooth

spherical: the three-body SphericalBesselRadial; smooth: the two-body SmoothBesselBasis (detaching it also drops
the products it feeds, so its figure is an upper bound on what a cheaper basis could save). To probe another
revision, put its src first on PYTHONPATH (a git worktree).
"""

import argparse
import runpy
import sys
from pathlib import Path

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--basis", choices=["spherical", "smooth"], required=True)
ap.add_argument("--repeats", type=int, default=2)
opts = ap.parse_args()
sys.argv = [sys.argv[0]]  # profile_m3gnet.py reads --ops from argv
setup = runpy.run_path(str(Path(__file__).with_name("profile_m3gnet.py")))
gs = setup["gs"]
import multifi.models.m3gnet as M  # noqa: E402

cls = M.SphericalBesselRadial if opts.basis == "spherical" else M.SmoothBesselBasis
real = cls.forward


def detached(self, r):
    with torch.no_grad():
        return real(self, r)


step = setup["training_step_seconds"]  # one training step's thread CPU seconds


ratios = []
for _ in range(opts.repeats):
    for g in gs[3:]:
        cls.forward = real
        a = step(g)
        cls.forward = detached
        ratios.append(step(g) / a)
q1, q3 = np.percentile(ratios, [25, 75])
print(
    f"{opts.basis}: detached / real, median of {len(ratios)} per-step ratios {np.median(ratios):.3f} ({q1:.2f}-{q3:.2f})"
)
