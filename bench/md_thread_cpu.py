"""MD steps per thread-CPU second of the ASE calculator: PaiNN 128×3 (reference energies fitted on 200 QM9
molecules, untrained weights), diethyl ether (12 atoms), VelocityVerlet 0.5 fs, three blocks of 200 steps after 30
warm-up steps; prints each block's rate. Thread CPU time, so that the load of other processes counts less than
in wall time. Compare two revisions by running it with each one's src on PYTHONPATH, alternating:

    git worktree add /tmp/wt_old REV
    PYTHONPATH=/tmp/wt_old/src OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/md_thread_cpu.py
    PYTHONPATH=src OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/md_thread_cpu.py
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import _multifi  # noqa: E402

from multifi.calculator import Calculator  # noqa: E402
from multifi.data.readers.qm9 import read_qm9  # noqa: E402

LABELS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "qm9mf" / "GFN2-xTB.csv.gz"


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same untrained weights in every process (some collapse the molecule)
    ds = read_qm9(labels=LABELS, limit=200, seed=0)
    module = _multifi.build(ds, {"features": 128, "interactions": 3, "cutoff": 5.0, "n_rbf": 20})
    atoms = molecule("CH3CH2OCH3")
    atoms.center(vacuum=5)
    atoms.calc = Calculator(module.potential, fidelity=ds.fidelities.names[0])
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)) * 0.1)
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    md.run(30)
    for _ in range(3):
        t = time.thread_time()
        md.run(200)
        print(f"steps/s (thread CPU) {200 / (time.thread_time() - t):.1f}")


if __name__ == "__main__":
    main()
