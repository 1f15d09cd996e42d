"""NVE energy drift of multifi.Calculator on a 64-atom Si cell (VelocityVerlet, 1 fs, 300 K start).

    python bench/md_drift.py [--checkpoint tests/data/solids_painn.pt] [--steps 500] [--dtype float32]

Prints the drift of the total energy per atom per ps (slope of a linear fit) and its fluctuation.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

import multifi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="tests/data/solids_painn.pt")
    ap.add_argument("--fidelity", default="PBE")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    atoms = bulk("Si", "diamond", 5.43, cubic=True) * (2, 2, 2)
    atoms.calc = multifi.Calculator(args.checkpoint, fidelity=args.fidelity, dtype=args.dtype)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    energies = []
    md = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    md.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    start = time.perf_counter()
    md.run(args.steps)
    seconds = time.perf_counter() - start
    e = np.array(energies) / len(atoms)
    drift = np.polyfit(np.arange(len(e)) * 1e-3, e, 1)[0]
    print(
        json.dumps(
            {
                "atoms": len(atoms),
                "steps": args.steps,
                "dtype": args.dtype,
                "drift_meV_per_atom_per_ps": round(1000 * drift, 5),
                "fluctuation_meV_per_atom": round(1000 * e.std(), 4),
                "final_temperature_K": round(atoms.get_temperature(), 1),
                "steps_per_s": round(args.steps / seconds, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
