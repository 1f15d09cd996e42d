"""Per composition of a MatPES-schema file: the median pressure of the stress labels against the pressure the
energy labels imply, −d(E/atom)/d(V/atom) from a least-squares line through the composition's structures
(thermal displacements add noise to that line; a difference of a hundred GPa is not noise).

    python scripts/pressure_vs_energy.py ../shared/data/solids/PBE.jsonl.gz
"""

import sys

import numpy as np
from ase.data import chemical_symbols
from ase.units import GPa

from multifi.data.readers.matpes import read_matpes


def main(path: str) -> None:
    ds = read_matpes(path, stress_order="vasp")
    offsets, n = np.asarray(ds.offsets), ds.n_atoms
    pressure = -np.trace(ds.stress[:, 0], axis1=1, axis2=2) / 3  # GPa
    v_atom = np.abs(np.linalg.det(ds.cells)) / n
    e_atom = ds.energy[:, 0] / n
    formula = np.array(
        [
            "".join(sorted({chemical_symbols[z] for z in ds.numbers[offsets[i] : offsets[i + 1]]}))
            for i in range(len(ds))
        ]
    )
    print("composition  structures  V/atom spread  P labels (GPa)  P from energies (GPa)")
    for f in sorted(set(formula)):
        m = (formula == f) & ds.stress_mask[:, 0]
        if m.sum() < 5:
            continue
        slope = np.polyfit(v_atom[m], e_atom[m], 1)[0]  # eV/Å³
        print(
            f"{f:>11}  {m.sum():10d}  {v_atom[m].std() / v_atom[m].mean():12.1%}  {np.median(pressure[m]):14.1f}"
            f"  {-slope / GPa:21.1f}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
