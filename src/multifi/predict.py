"""Predict with a trained potential on ASE structures, at a fidelity chosen by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from multifi.errors import MultifiError


def predict_atoms(potential, atoms_list, fidelity: str, batch_size: int = 32, forces: bool = True):
    """Energies [n] eV, forces list of [n_i,3] eV/Å, stresses [n,3,3] GPa (None for molecules)."""
    from multifi.data.batch import graph_from_atoms

    k = potential.fidelity_index(fidelity)
    check_atoms_elements(potential, atoms_list)
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


def check_atoms_elements(potential, atoms_list, where: str = "") -> None:
    from ase.data import chemical_symbols

    known = set(potential.elements)
    for i, a in enumerate(atoms_list):
        bad = sorted(set(int(z) for z in a.numbers) - known)
        if bad:
            prefix = f"{where}: " if where else ""
            raise MultifiError(f"{prefix}structure {i}: element {chemical_symbols[bad[0]]} was not seen in training "
                               f"(model knows {', '.join(chemical_symbols[z] for z in sorted(known))})")


def predict_file(checkpoint, structures, fidelity: str, out: Path, batch_size: int = 32, uncertainty: bool = False,
                 ensemble: list = ()) -> int:
    """Read structures, predict at `fidelity`, write extxyz (energy, forces, stress in ASE units).

    uncertainty: also write info['energy_sigma'] (eV) and info['uncertainty'] (method): the LLPR σ of the
    model (its <model>.llpr.npz, see multifi.uncertainty), or with `ensemble` (further model files) the
    standard deviation over all models, whose mean energy, forces and stress are then written."""
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
    try:
        check_atoms_elements(potential, atoms_list, str(path))
    except MultifiError:
        raise
    energies, forces, stresses = predict_atoms(potential, atoms_list, fidelity, batch_size)
    sigma, method = None, None
    if uncertainty or ensemble:
        energies, forces, stresses, sigma, method = predict_sigma(checkpoint, potential, ensemble, atoms_list,
                                                                  fidelity, (energies, forces, stresses), batch_size)
    for a, e, f, s in zip(atoms_list, energies, forces, stresses):
        results = {"energy": float(e), "forces": f}
        if s is not None:
            results["stress"] = s * GPa  # GPa → eV/Å³ (ASE units)
        a.calc = SinglePointCalculator(a, **results)
        a.info["fidelity"] = fidelity
    if sigma is not None:
        for a, sd in zip(atoms_list, sigma):
            a.info["energy_sigma"], a.info["uncertainty"] = float(sd), method
    buf = io.StringIO()
    ase.io.write(buf, atoms_list, format="extxyz")
    atomic_write(Path(out), lambda fh: fh.write(buf.getvalue().encode()))
    return len(atoms_list)


def predict_sigma(checkpoint, potential, ensemble: list, atoms_list, fidelity: str, predicted: tuple,
                  batch_size: int = 32):
    """σ (eV) for predict_file: LLPR of `potential` (no ensemble), else the spread of potential + ensemble,
    whose means replace the predictions. Returns (energies, forces, stresses, sigma [n], method name)."""
    from multifi.data.dataset import FidelityDataset
    from multifi.models.registry import load_potential
    from multifi.uncertainty import LLPR, dataset_features, llpr_path

    if ensemble:
        members = [predicted] + [predict_atoms(load_potential(m), atoms_list, fidelity, batch_size) for m in ensemble]
        e = np.stack([m[0] for m in members])
        forces = [np.mean(fs, axis=0) for fs in zip(*(m[1] for m in members))]
        stresses = [None if s[0] is None else np.mean(s, axis=0) for s in zip(*(m[2] for m in members))]
        return e.mean(0), forces, stresses, e.std(0, ddof=1), f"ensemble of {len(members)}"
    llpr = LLPR.load(llpr_path(checkpoint), potential)
    records = [{"numbers": a.numbers, "positions": a.positions, "cell": a.cell.array if a.pbc.any() else None,
                "pbc": a.pbc, "key": str(i), "labels": {}} for i, a in enumerate(atoms_list)]
    ds = FidelityDataset.from_records(records)
    f, _ = dataset_features(potential, ds, np.arange(len(ds)), fidelity, batch_size)
    return (*predicted, llpr.of(fidelity, str(checkpoint)).sigma(f), "llpr")
