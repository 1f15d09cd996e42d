"""The physics check suite (tests/physics.py) on PaiNN, for every fidelity conditioning mode."""

from __future__ import annotations

import copy
from functools import partial

import physics
import pytest
from conftest import TINY_MODEL

from multifi.models.registry import build_potential
from multifi.nn.fidelity import MODES


def make_painn(fidelities, inject: str = "both", **model):
    cfg = copy.deepcopy(TINY_MODEL)
    cfg.update({"features": 16, "interactions": 2, "cutoff": 3.5}, **model)
    cfg["fidelity_embedding"] = {"dim": 4, "inject": inject}
    return build_potential(cfg, fidelities)


@pytest.fixture(params=MODES)
def make_potential(request):
    return partial(make_painn, inject=request.param)


def test_energy_invariant_under_rotation_translation_permutation(make_potential, molecules, periodic):
    physics.check_energy_invariance(make_potential, molecules + [periodic])


def test_forces_and_stress_rotation_equivariant(make_potential, molecules, periodic):
    physics.check_forces_equivariance(make_potential, molecules[:2] + [periodic])


def test_reflection(molecules):
    physics.check_reflection_invariance(make_painn, molecules)


def test_forces_are_minus_energy_gradient(make_potential, molecules, periodic):
    physics.check_forces_finite_difference(make_potential, [molecules[0], periodic])


def test_forces_finite_difference_larger_molecule(molecules):
    physics.check_forces_finite_difference(make_painn, [molecules[1]])


def test_stress_is_strain_derivative(make_potential, periodic):
    physics.check_stress_finite_difference(make_potential, periodic)


def test_stress_finite_difference_larger_strain_step(periodic):
    physics.check_stress_finite_difference(make_painn, periodic, h=1e-3, fidelity=1)


def test_periodic_cell_choice_and_lattice_translations(make_potential, periodic):
    physics.check_periodic_invariances(make_potential, periodic)


def test_energy_continuous_at_cutoff():
    physics.check_cutoff_smoothness(make_painn)


def test_prediction_independent_of_batch(make_potential, molecules, periodic):
    physics.check_batch_independence(make_potential, [molecules[0], periodic, molecules[1], molecules[2]])


def test_structures_without_edges():
    physics.check_isolated_atoms(make_painn)
