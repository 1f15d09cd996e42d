"""Predict with a trained potential on ASE structures, at a fidelity chosen by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from multifi.errors import MultifiError


def predict_atoms(potential, atoms_list, fidelity: str, batch_size: int = 32, forces: bool = True,
                  where: str = "", strict_references: bool = False):
    """Energies [n] eV, forces list of [n_i,3] eV/Å, stresses [n,3,3] GPa (None for molecules).

    An element unknown to the model is an error; an element whose reference energy at `fidelity` was
    estimated from other fidelities is a warning (an error with strict_references, see models.elements)."""
    from multifi.data.batch import graph_from_atoms

    k = potential.fidelity_index(fidelity)
    check_atoms_elements(potential, atoms_list, where, fidelity=k, strict=strict_references)
    dtype = next(potential.parameters()).dtype
    energies, forces_out, stresses = [], [], []
    for start in range(0, len(atoms_list), batch_size):
        chunk = atoms_list[start:start + batch_size]
        g = graph_from_atoms(chunk, potential.cutoff, k, dtype=dtype)
        periodic = bool(g.cell.abs().sum() > 0)
        out = potential(g, forces=forces, stress=periodic)
        energies.append(out["energy"].detach().numpy())
        if forces:
            f = out["forces"].detach().numpy()
            splits = np.cumsum(g.n_atoms.numpy())[:-1]
            forces_out.extend(np.split(f, splits))
        st = out.get("stress")  # molecules batched with crystals get no stress (not a zero one)
        stresses.extend(st[i].detach().numpy() if st is not None and a.pbc.any() else None for i, a in enumerate(chunk))
    return np.concatenate(energies) if energies else np.zeros(0), forces_out, stresses


def check_atoms_elements(potential, atoms_list, where: str = "", fidelity: int | None = None,
                         strict: bool = False) -> None:
    """models.elements.check_elements for a list of ASE Atoms (fidelity: model index, or None)."""
    from multifi.models.elements import check_elements

    numbers = np.concatenate([a.numbers for a in atoms_list]) if atoms_list else np.zeros(0, np.int64)
    n_atoms = np.array([len(a) for a in atoms_list], dtype=np.int64)
    check_elements(potential, numbers, n_atoms, fidelity, where, strict=strict)


def predict_file(checkpoint, structures, fidelity: str, out: Path, batch_size: int = 32) -> int:
    """Read structures, predict at `fidelity`, write extxyz (energy, forces, stress in ASE units)."""
    import io

    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import GPa

    from multifi.data.dataset import atomic_write
    from multifi.models.registry import load_potential

    potential = load_potential(checkpoint)
    potential.fidelities.index(fidelity, where=str(checkpoint))
    path = Path(structures)
    if not path.exists():
        raise MultifiError(f"{path}: no such file")
    try:
        atoms_list = ase.io.read(path, index=":")
    except Exception as exc:  # noqa: BLE001
        raise MultifiError(f"{path}: unreadable structure file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    energies, forces, stresses = predict_atoms(potential, atoms_list, fidelity, batch_size, where=str(path))
    for a, e, f, s in zip(atoms_list, energies, forces, stresses):
        results = {"energy": float(e), "forces": f}
        if s is not None:
            results["stress"] = s * GPa  # GPa → eV/Å³ (ASE units)
        a.calc = SinglePointCalculator(a, **results)
        a.info["fidelity"] = fidelity
    buf = io.StringIO()
    ase.io.write(buf, atoms_list, format="extxyz")
    atomic_write(Path(out), lambda fh: fh.write(buf.getvalue().encode()))
    return len(atoms_list)
