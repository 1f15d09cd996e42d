"""In-process A/B of the ASE calculator's force call with PaiNN's fused message kernels on and off.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ab_fused_calculator.py [--rounds 400] [--features 128]

PaiNN (untrained, 3 interactions), one 12-atom molecule, rounds of (dense, fused) or (fused, dense) force calls
on slightly moved positions; median thread CPU time per call of each after 20 warm-up rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from ase.build import molecule

from multifi.calculator import Calculator
from multifi.config import ModelConfig
from multifi.models.registry import build_potential


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--features", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pot = build_potential(ModelConfig(features=args.features, interactions=3), ["a"])
    ref = np.zeros((119, 1))
    ref[[1, 6, 7, 8], 0] = [-13.6, -1029.0, -1485.0, -2042.0]
    pot.head.set_baseline(ref, np.ones(1))
    atoms = molecule("CH3CH2OCH3")
    atoms.calc = Calculator(pot, fidelity="a")
    rep = pot.representation
    times: dict[bool, list[float]] = {True: [], False: []}
    for k in range(args.rounds):
        for fused in (True, False) if k % 2 else (False, True):
            rep.fused_messages = fused
            atoms.positions += np.random.default_rng(k).normal(0, 1e-3, atoms.positions.shape)
            t = time.thread_time()
            atoms.get_forces()
            times[fused].append(time.thread_time() - t)
    dense, fast = (statistics.median(times[f][20:]) for f in (False, True))
    print(
        f"{len(atoms)} atoms: dense {1000 * dense:.2f} ms, fused {1000 * fast:.2f} ms per force call: {dense / fast:.3f}x"
    )


if __name__ == "__main__":
    main()
