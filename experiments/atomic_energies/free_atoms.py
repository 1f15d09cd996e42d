"""Free-atom energies at HF/3-21G for experiments/atomic_energies (writes atoms_HF_3-21G.yaml beside this file).

Needs PySCF 2.14 (not a multifi dependency: `python -m venv env && env/bin/pip install pyscf==2.14.0`):

    OMP_NUM_THREADS=1 env/bin/python experiments/atomic_energies/free_atoms.py

The same settings as the HF/3-21G labels of ../shared/data/qm9mf (PySCF 2.14, density fitting with the default
auxiliary basis), unrestricted for the open-shell ground states (H, F doublets; C, O triplets; N quartet).
"""

from __future__ import annotations

from pathlib import Path

from pyscf import gto, scf

HARTREE_EV = 27.211386245988
SPIN = {"H": 1, "C": 2, "N": 3, "O": 2, "F": 1}  # 2S of the free atom's ground state


def main() -> None:
    lines = [
        "# free-atom energies, eV: UHF/3-21G, PySCF 2.14, density fitting (experiments/atomic_energies/free_atoms.py)"
    ]
    for element, spin in SPIN.items():
        atom = gto.M(atom=f"{element} 0 0 0", basis="3-21g", spin=spin, verbose=0)
        lines.append(f"{element}: {scf.UHF(atom).density_fit().run().e_tot * HARTREE_EV:.6f}")
    out = Path(__file__).with_name("atoms_HF_3-21G.yaml")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
