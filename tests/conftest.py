"""Shared fixtures: small molecules, a periodic cell, a tiny two-fidelity extxyz and a tiny run config."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402

torch.set_num_threads(1)

MOLECULES = ("H2O", "NH3", "CH4", "CH3OH", "C2H4", "HCN", "CO2", "H2CO", "C2H2", "C2H6")
#: a model small enough for tests (features 16, one interaction)
TINY_MODEL = {
    "backbone": "painn",
    "features": 16,
    "interactions": 1,
    "cutoff": 4.0,
    "n_rbf": 8,
    "fidelity_embedding": {"dim": 4, "inject": "both"},
}
#: fidelities of the tiny extxyz: "lo" on all 40 molecules, "hi" on every second one
TINY_FIDELITIES = ("lo", "hi")


def rattled_molecule(name: str, seed: int, stdev: float = 0.05) -> Atoms:
    atoms = molecule(name)
    atoms.rattle(stdev, seed=seed)
    return atoms


def periodic_cell(seed: int = 0) -> Atoms:
    """A rattled, sheared 4-atom rock-salt cell (non-orthogonal lattice, two elements)."""
    atoms = bulk("NaCl", "rocksalt", a=4.6) * (1, 1, 2)
    cell = atoms.cell.array @ (np.eye(3) + np.array([[0.02, 0.03, 0.0], [0.0, -0.01, 0.04], [0.01, 0.0, 0.03]]))
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.08, seed=seed)
    return atoms


def emt_labelled(atoms: Atoms, fidelity: str, scale: float = 1.0, per_atom: float = 0.0) -> Atoms:
    """A copy with EMT energy×scale + per_atom·N and forces×scale as a SinglePointCalculator."""
    a = atoms.copy()
    a.calc = EMT()
    e, f = a.get_potential_energy(), a.get_forces()
    a.calc = SinglePointCalculator(a, energy=scale * e + per_atom * len(a), forces=scale * f)
    a.info["fidelity"] = fidelity
    return a


def tiny_frames(n: int = 40) -> list[Atoms]:
    """n rattled molecules at fidelity 'lo' (EMT) and every second one also at 'hi' (1.1·EMT + 0.3 eV/atom)."""
    frames = []
    for i in range(n):
        a = rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=i)
        frames.append(emt_labelled(a, "lo"))
        if i % 2 == 0:
            frames.append(emt_labelled(a, "hi", scale=1.1, per_atom=0.3))
    return frames


@pytest.fixture
def molecules() -> list[Atoms]:
    return [rattled_molecule(n, seed=i) for i, n in enumerate(("H2O", "CH3OH", "NH3"))]


@pytest.fixture
def periodic() -> Atoms:
    return periodic_cell()


@pytest.fixture(scope="session")
def tiny_extxyz(tmp_path_factory):
    """Path of an extxyz written by ASE: 40 molecules, 60 frames, two fidelities in one file."""
    path = tmp_path_factory.mktemp("data") / "tiny.extxyz"
    ase.io.write(path, tiny_frames(), format="extxyz")
    return path


@pytest.fixture
def write_config(tmp_path, tiny_extxyz):
    """write_config(**sections) → path of a YAML run config on the tiny extxyz with a tiny model."""

    def write(name: str = "config.yaml", **sections):
        raw = {
            "data": {"sources": [{"path": str(tiny_extxyz)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
            "model": TINY_MODEL,
            "train": {"epochs": 2, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write
