"""Ahead-of-time compiled calculator (multifi.aot): the same energy, forces and stress as the eager model,
built once and then loaded from the cache; fidelity switching; tiny structures run eagerly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import multifi
from multifi import aot
from multifi.models.registry import build_potential

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")


def tiny_painn():
    torch.manual_seed(0)
    pot = build_potential(
        {"backbone": "painn", "features": 8, "interactions": 1, "cutoff": 4.0, "n_rbf": 4}, ["PBE", "R2SCAN"]
    )
    with torch.no_grad():
        pot.head.fitted.fill_(True)
        for p in pot.parameters():
            p.add_(0.1 * torch.randn_like(p))  # distinct fidelities
    return pot


def test_aot_calculator_matches_eager_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIFI_CACHE", str(tmp_path))
    pot = tiny_painn()
    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.set_cell(atoms.cell @ (np.eye(3) + [[0.01, 0.003, 0], [0.003, -0.01, 0], [0, 0, 0.004]]), scale_atoms=True)
    fast = multifi.Calculator(pot, fidelity="R2SCAN", dtype="float64", aot=True)
    energies = []
    for fidelity in ("R2SCAN", "PBE"):
        eager = multifi.Calculator(pot, fidelity=fidelity, dtype="float64")
        fast.fidelity = fidelity
        ref = [eager.get_property(p, atoms) for p in ("energy", "forces", "stress")]
        got = [fast.get_property(p, atoms) for p in ("energy", "forces", "stress")]
        assert np.abs(ref[1]).max() > 1e-3 and np.abs(ref[2]).max() > 1e-5  # non-trivial
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
        energies.append(got[0])
    assert energies[0] != pytest.approx(energies[1], abs=1e-3)  # the fidelity is an input of the package
    assert len(list(tmp_path.glob("aot/*.pt2"))) == 1  # one package for every fidelity

    def no_build(*args):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(aot, "_build", no_build)
    again = multifi.Calculator(pot, fidelity="PBE", dtype="float64", aot=True)
    np.testing.assert_allclose(again.get_property("forces", atoms), ref[1], rtol=1e-10, atol=1e-12)
    dimer = Atoms("Si2", positions=[[0, 0, 0], [0, 0, 2.3]])  # 2 edges: compiled; a lone atom: eager
    lone = Atoms("Si", positions=[[0, 0, 0]])
    for small in (dimer, lone):
        np.testing.assert_allclose(
            again.get_property("energy", small),
            multifi.Calculator(pot, fidelity="PBE", dtype="float64").get_property("energy", small),
            rtol=1e-12,
        )


def small_m3gnet():
    """A one-block M3GNet (cutoff 4 Å, three-body cutoff 3 Å) with its element references marked fitted."""
    torch.manual_seed(0)
    pot = build_potential(
        {"backbone": "m3gnet", "features": 8, "interactions": 1, "cutoff": 4.0, "threebody_cutoff": 3.0, "n_rbf": 4},
        ["PBE"],
    )
    with torch.no_grad():
        pot.head.fitted.fill_(True)
    return pot


def test_aot_m3gnet_matches_eager_and_runs_structures_without_three_body_bonds_eagerly(tmp_path, monkeypatch):
    """M3GNet's package takes the bonds within the three-body cutoff as an input of symbolic size: a periodic cell,
    a molecule; a pair beyond the three-body cutoff (no such bond) runs eagerly."""
    monkeypatch.setenv("MULTIFI_CACHE", str(tmp_path))
    pot = small_m3gnet()
    cell = bulk("Si", "diamond", 5.43, cubic=True)
    cell.rattle(0.05, seed=2)
    far = Atoms("Si2", positions=[[0, 0, 0], [0, 0, 3.5]])
    fast = multifi.Calculator(pot, fidelity="PBE", dtype="float64", aot=True)
    eager = multifi.Calculator(pot, fidelity="PBE", dtype="float64")
    for atoms, props in ((cell, ("energy", "forces", "stress")), (far, ("energy", "forces"))):
        for p in props:
            np.testing.assert_allclose(
                fast.get_property(p, atoms), eager.get_property(p, atoms), rtol=1e-10, atol=1e-12
            )
    assert np.abs(eager.get_property("forces", cell)).max() > 1e-3
    assert len(list(tmp_path.glob("aot/*.pt2"))) == 1


def test_aot_builds_no_package_for_a_structure_the_package_would_not_take(monkeypatch):
    """A package takes minutes to build: a first structure it could not run (a lone atom, a pair beyond the
    three-body cutoff) runs eagerly without building one; the first structure it takes builds it."""
    import multifi.calculator as calculator

    built = []

    class Recorder:  # stands in for the compiler: records builds, runs nothing (the eager model answers)
        def __init__(self, potential, dtype):
            built.append(dtype)

        def current(self):
            return True

        def __call__(self, *args):
            return None

    monkeypatch.setattr(calculator, "AotModel", Recorder)
    pot = small_m3gnet()
    calc = multifi.Calculator(pot, fidelity="PBE", dtype="float64", aot=True)
    eager = multifi.Calculator(pot, fidelity="PBE", dtype="float64")
    for atoms in (Atoms("Si2", positions=[[0, 0, 0], [0, 0, 3.5]]), Atoms("Si", positions=[[0, 0, 0]])):
        assert calc.get_property("energy", atoms) == pytest.approx(eager.get_property("energy", atoms), rel=1e-12)
    assert built == []
    calc.get_property("energy", bulk("Si", "diamond", 5.43, cubic=True))
    assert built == [torch.float64]
