"""Neighbour-list backends side by side: vesin vs matscipy (vs ASE), median time per call.

    python bench/neighbors.py [--repeats 200]

Systems: 200 QM9-sized molecules (rattled ase.build molecules, no cell) at 5 Å, and a 64-atom
periodic silicon cell at 5 Å. Runs are interleaved (A, B, C, A, B, C, …) so machine load hits all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from ase.build import bulk, molecule


def vesin_nl(a, cutoff):
    from vesin import NeighborList

    box = a.cell.array if a.pbc.any() else np.zeros((3, 3))
    return NeighborList(cutoff=cutoff, full_list=True).compute(a.positions, box, bool(a.pbc.any()), "ijS")


def matscipy_nl(a, cutoff):
    from matscipy.neighbours import neighbour_list

    if not a.pbc.any():  # matscipy needs a cell: a box larger than the molecule, not periodic
        a = a.copy()
        a.cell = np.eye(3) * (np.ptp(a.positions, 0).max() + 2 * cutoff + 1)
    return neighbour_list("ijS", a, cutoff)


def ase_nl(a, cutoff):
    from ase.neighborlist import neighbor_list

    return neighbor_list("ijS", a, cutoff)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mols = []
    for name in ["C6H6", "CH3CH2OH", "C4H4O", "CH3COOH", "C3H9N", "C5H5N"] * 34:
        m = molecule(name)
        m.positions += rng.normal(0, 0.05, m.positions.shape)
        mols.append(m)
    si = bulk("Si", "diamond", 5.43, cubic=True) * (2, 2, 2)
    si.rattle(0.05, seed=1)
    backends = {"vesin": vesin_nl, "matscipy": matscipy_nl, "ase": ase_nl}
    # sanity: same number of pairs
    for a in (mols[0], si):
        counts = {k: len(f(a, 5.0)[0]) for k, f in backends.items()}
        assert len(set(counts.values())) == 1, counts
    times = {("molecule", k): [] for k in backends} | {("si64", k): [] for k in backends}
    for _ in range(args.repeats):
        for k, f in backends.items():
            m = mols[rng.integers(len(mols))]
            t = time.perf_counter()
            f(m, 5.0)
            times[("molecule", k)].append(time.perf_counter() - t)
            t = time.perf_counter()
            f(si, 5.0)
            times[("si64", k)].append(time.perf_counter() - t)
    out = {f"{sys}/{k}_ms": round(1000 * statistics.median(v), 4) for (sys, k), v in times.items()}
    out["molecule_matscipy_over_vesin"] = round(out["molecule/matscipy_ms"] / out["molecule/vesin_ms"], 2)
    out["si64_matscipy_over_vesin"] = round(out["si64/matscipy_ms"] / out["si64/vesin_ms"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
