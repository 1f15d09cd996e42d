"""multifi side of the PaiNN A/B benchmark (runs in the repository's .venv). Started by bench/harness.py.

    python bench/peers/multifi_painn.py --task train|md --threads T --n N --labels GFN2-xTB.csv.gz
                                        [--md-xyz molecule.xyz]   (compiled: MULTIFI_COMPILE=1)

train: our normal training path (bench/peers/_multifi.py) on read_qm9(labels, limit=N, seed=0), energy
       only; inference: a fresh NeighborCache for all N molecules + one pass over them (batch 32,
       no_grad, energy only).
md:    multifi.Calculator on one QM9 molecule, VelocityVerlet 0.5 fs, forces by autograd.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402
import _multifi  # noqa: E402


def load(args):
    if args.forces_xyz:  # energies and forces (harness --painn-forces)
        from multifi.data.readers.ase_files import read_ase

        return read_ase(args.forces_xyz, fidelity="EMT", keys={"energy": "energy_eV", "forces": "forces_eVA"})
    from multifi.data.readers.qm9 import read_qm9

    return read_qm9(labels=args.labels, limit=args.n, seed=0)


def model() -> dict:
    return {"features": C.FEATURES, "interactions": C.INTERACTIONS, "cutoff": C.CUTOFF, "n_rbf": C.N_RBF}


def main() -> None:
    ap = C.parser(steps=50, md_steps=300)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--forces-xyz", help="extxyz with energy_eV and forces_eVA: train on energies and forces")
    args = ap.parse_args()
    forces = bool(args.forces_xyz)
    _multifi.run(args, load, model, forces=forces, stress=False, model_batches=20, neighbor_time=True)


if __name__ == "__main__":
    main()
