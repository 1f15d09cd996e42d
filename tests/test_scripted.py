"""The calculator's scripted model (multifi.scripted): bit for bit the eager model's energy, forces and stress, on
the fused kernels, at any sizes; when it is used (script=True, automatically after enough eager calls, never with
script=False); structures outside its sizes, per-atom energies, a failed build or call run eagerly."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from conftest import tiny_m3gnet, tiny_painn_lo_hi

import multifi
from multifi import calculator as calculator_module
from multifi import scripted
from multifi.nn import fused


def _trajectory(calc, atoms, steps: int = 6):
    """Energies and forces along a short NVE run (positions depend on every earlier force, bit for bit)."""
    atoms = atoms.copy()
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    out = []
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    for _ in range(steps):
        md.run(1)
        out.append((atoms.get_potential_energy(), atoms.get_forces().copy()))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_painn_md_is_bit_for_bit_the_eager_run(dtype):
    pot = tiny_painn_lo_hi()
    atoms = molecule("CH3CH2OH")
    fast = multifi.Calculator(pot, fidelity="hi", dtype=dtype, script=True)
    slow = multifi.Calculator(pot, fidelity="hi", dtype=dtype, script=False)
    got, want = _trajectory(fast, atoms), _trajectory(slow, atoms)
    assert fast._scripted.get(False) and not slow._scripted  # the scripted model ran, only where asked for
    for (e1, f1), (e2, f2) in zip(got, want):
        assert e1 == e2 and np.array_equal(f1, f2)
    assert np.abs(want[-1][1]).max() > 1e-3
    fast.fidelity = slow.fidelity = "lo"  # the fidelity is an input of the graph, not baked in
    atoms.calc = None
    assert fast.get_potential_energy(atoms) == slow.get_potential_energy(atoms)


def test_graph_holds_the_fused_kernels():
    if not fused.available():
        pytest.skip("fused kernels not built here")
    pot = tiny_painn_lo_hi()
    calc = multifi.Calculator(pot, fidelity="hi", script=True)
    calc.get_forces(molecule("CH3CH2OH"))
    assert "multifi_fused::segment_sum" in str(calc._scripted[False]._run.graph)


def test_m3gnet_stress_and_sizes():
    """A strained periodic cell with stress, a larger cell (other sizes, same graph), a pair without three-body
    bonds (eager), all equal to the eager model's results exactly."""
    pot = tiny_m3gnet()
    cell = bulk("Si", "diamond", 5.43, cubic=True)
    cell.rattle(0.05, seed=2)
    cell.set_cell(cell.cell @ (np.eye(3) + [[0.01, 0.003, 0], [0.003, -0.01, 0], [0, 0, 0.004]]), scale_atoms=True)
    bigger = cell.repeat((1, 1, 2))
    bigger.rattle(0.02, seed=3)
    far = Atoms("Si2", positions=[[0, 0, 0], [0, 0, 4.0]])  # within the cutoff, beyond the three-body cutoff
    fast = multifi.Calculator(pot, fidelity="R2SCAN", dtype="float64", script=True)
    slow = multifi.Calculator(pot, fidelity="R2SCAN", dtype="float64", script=False)
    for atoms, props in (
        (cell, ("energy", "forces", "stress")),
        (bigger, ("energy", "forces", "stress")),
        (far, ("energy", "forces")),
    ):
        for p in props:
            assert np.array_equal(fast.get_property(p, atoms), slow.get_property(p, atoms)), p
    assert np.abs(slow.get_property("stress", cell)).max() > 1e-5
    assert fast._scripted.get(True)  # built with stress for the cell
    assert not scripted.ScriptedPotential.fits(fast.potential, _graph(fast, far))


def _graph(calc, atoms):
    from multifi.data.batch import graph_from_atoms

    return graph_from_atoms([atoms], calc.potential.cutoff, 0, dtype=calc.dtype)


def test_automatic_after_enough_eager_calls(monkeypatch):
    """script=None: eager until SCRIPT_AFTER_CALLS calls after the first took SCRIPT_AFTER_SECONDS together, then
    built on the call that passes both (its eager result the reference); script=False: never."""
    monkeypatch.setattr(calculator_module, "SCRIPT_AFTER_CALLS", 2)
    monkeypatch.setattr(calculator_module, "SCRIPT_AFTER_SECONDS", 0.0)
    pot = tiny_painn_lo_hi()
    atoms = molecule("CH3CH2OH")
    calc = multifi.Calculator(pot, fidelity="hi")
    never = multifi.Calculator(pot, fidelity="hi", script=False)
    assert calc.script is None
    for k in range(4):
        atoms.rattle(0.01, seed=k)
        assert np.array_equal(calc.get_forces(atoms), never.get_forces(atoms))
        assert bool(calc._scripted) == (k >= 2), k  # the first call not counted, built on the third
    assert calc._eager_calls == 2 and not never._scripted
    monkeypatch.setattr(calculator_module, "SCRIPT_AFTER_SECONDS", 1e9)  # calls alone are not enough
    slow = multifi.Calculator(pot, fidelity="hi")
    for k in range(4):
        atoms.rattle(0.01, seed=k)
        slow.get_forces(atoms)
    assert not slow._scripted


def test_sizes_vary_between_calls():
    """One graph for molecules of other atom and edge counts (traced at symbolic sizes), equal to eager."""
    pot = tiny_painn_lo_hi()
    fast = multifi.Calculator(pot, fidelity="lo", script=True)
    slow = multifi.Calculator(pot, fidelity="lo", script=False)
    for name in ("CH3CH2OH", "CH4", "C6H6", "CH3COOH", "H2O"):
        atoms = molecule(name)
        atoms.rattle(0.02, seed=1)
        assert fast.get_potential_energy(atoms) == slow.get_potential_energy(atoms), name
        assert np.array_equal(fast.get_forces(atoms), slow.get_forces(atoms)), name
    assert fast._scripted.get(False)


def test_m3gnet_float32():
    pot = tiny_m3gnet()
    cell = bulk("Si", "diamond", 5.43, cubic=True)
    cell.rattle(0.05, seed=4)
    fast = multifi.Calculator(pot, fidelity="PBE", dtype="float32", script=True)
    slow = multifi.Calculator(pot, fidelity="PBE", dtype="float32", script=False)
    for k in range(2):
        cell.rattle(0.01, seed=k)
        for p in ("energy", "forces", "stress"):
            assert np.array_equal(fast.get_property(p, cell), slow.get_property(p, cell)), p
    assert fast._scripted.get(True)


def test_without_the_kernels(monkeypatch):
    """Kernels unavailable (MULTIFI_FUSED=0, no compiler): eager and traced graph both on torch's operators."""
    monkeypatch.setattr(fused, "_state", {"ok": False, "error": "MULTIFI_FUSED=0"})
    pot = tiny_painn_lo_hi()
    fast = multifi.Calculator(pot, fidelity="hi", script=True)
    slow = multifi.Calculator(pot, fidelity="hi", script=False)
    atoms = molecule("CH3CH2OH")
    for k in range(2):
        atoms.rattle(0.01, seed=k)
        assert np.array_equal(fast.get_forces(atoms), slow.get_forces(atoms))
    assert "multifi_fused" not in str(fast._scripted[False]._run.graph)


def test_pickled_calculator_builds_again():
    import pickle

    pot = tiny_painn_lo_hi()
    calc = multifi.Calculator(pot, fidelity="hi", script=True)
    atoms = molecule("CH3CH2OH")
    forces = calc.get_forces(atoms)
    assert calc._scripted.get(False)
    copy = pickle.loads(pickle.dumps(calc))
    assert copy._scripted == {}
    atoms.rattle(0.01, seed=0)
    assert np.array_equal(copy.get_forces(atoms), calc.get_forces(atoms))
    assert np.abs(forces).max() > 0


def test_per_atom_energies_and_lone_atoms_run_eagerly():
    pot = tiny_painn_lo_hi()
    fast = multifi.Calculator(pot, fidelity="hi", script=True)
    slow = multifi.Calculator(pot, fidelity="hi", script=False)
    atoms = molecule("CH3CH2OH")
    assert np.array_equal(fast.get_property("energies", atoms), slow.get_property("energies", atoms))
    assert not fast._scripted  # per-atom energies: the eager model
    lone = Atoms("C", positions=[[0, 0, 0]])
    assert fast.get_property("energy", lone) == slow.get_property("energy", lone)
    assert not fast._scripted  # nothing to trace on


@pytest.mark.parametrize("where", ["__init__", "__call__"])
def test_a_failure_is_said_once_and_the_eager_model_goes_on(monkeypatch, caplog, where):
    """Building or running the scripted model fails: one warning (script=True asked for it), eager results."""

    def broken(*args, **kwargs):
        raise RuntimeError("an operator TorchScript cannot take")

    pot = tiny_painn_lo_hi()
    fast = multifi.Calculator(pot, fidelity="hi", script=True)
    slow = multifi.Calculator(pot, fidelity="hi", script=False)
    monkeypatch.setattr(scripted.ScriptedPotential, where, broken)
    atoms = molecule("CH3CH2OH")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        for k in range(3):
            atoms.rattle(0.01, seed=k)
            assert np.array_equal(fast.get_forces(atoms), slow.get_forces(atoms))
    said = [r for r in caplog.records if "scripted model" in r.getMessage()]
    assert len(said) == 1 and "TorchScript cannot take" in said[0].getMessage()
    assert fast._scripted[False] is False


@pytest.mark.parametrize("bad", ["yes", 0, 1, 0.0])
def test_bad_script_argument(bad):
    with pytest.raises(multifi.MultifiError, match=f"script={bad!r}"):
        multifi.Calculator(tiny_painn_lo_hi(), fidelity="hi", script=bad)


def test_changed_weights_rebuild_the_graph():
    """The graph reads the potential's own tensors: after calc.potential.load_state_dict (copied in place) the same
    graph gives the new numbers (those of an eager calculator with the new weights); tensors replaced or given new
    storage, or another potential, make the calculator build it again."""
    pot = tiny_painn_lo_hi()
    fast = multifi.Calculator(pot, fidelity="hi", script=True)
    slow = multifi.Calculator(pot, fidelity="hi", script=False)
    atoms = molecule("CH3CH2OH")
    fast.get_forces(atoms)
    first = fast._scripted[False]
    for k in range(3):
        atoms.rattle(0.01, seed=k)
        fast.get_forces(atoms)
    assert fast._scripted[False] is first  # MD steps do not touch the weights
    state = {k: v + 0.01 for k, v in fast.potential.state_dict().items() if v.is_floating_point()}
    for calc in (fast, slow):
        calc.potential.load_state_dict(state, strict=False)
        calc.reset()
    atoms.rattle(0.01, seed=9)
    assert fast.get_potential_energy(atoms) == slow.get_potential_energy(atoms)
    atoms.rattle(0.01, seed=10)
    assert np.array_equal(fast.get_forces(atoms), slow.get_forces(atoms))
    assert fast._scripted[False] is first and first.current(fast.potential)  # no rebuild needed: it reads them
    # weights changed where no version counts up (a frozen graph held the old ones, or a mix of old and new): a new
    # storage (vector_to_parameters, `.data =`: built again) and in place through .data (an EMA copy, a fine-tuning
    # loop: the graph reads the weights' own storage, so the same graph gives the new numbers)
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    edits = (
        lambda p: vector_to_parameters(parameters_to_vector(p.parameters()) * 1.05, p.parameters()),
        lambda p: [q.data.mul_(1.02) for q in p.parameters()],
        lambda p: setattr(next(iter(p.parameters())), "data", next(iter(p.parameters())).data * 0.9),
    )
    for k, edit in enumerate(edits):
        built = fast._scripted[False]
        for calc in {id(c.potential): c for c in (fast, slow)}.values():  # each calculator's own copy, once
            edit(calc.potential)
        atoms.rattle(0.01, seed=20 + k)
        assert fast.get_potential_energy(atoms) == slow.get_potential_energy(atoms), k
        assert (fast._scripted[False] is not built) == (k != 1), k
    # tensors replaced by others, and another potential: the graph held the old ones (eV off)
    other = tiny_painn_lo_hi()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    replacements = (
        lambda c: c.potential.load_state_dict(other.state_dict(), assign=True),
        lambda c: setattr(c.potential.head, "ref", c.potential.head.ref + 1.0),
        lambda c: setattr(c, "potential", copy.deepcopy(other)),
    )
    for k, edit in enumerate(replacements):
        built = fast._scripted[False]
        edit(fast)
        eager = multifi.Calculator(fast.potential, fidelity="hi", script=False)
        atoms.rattle(0.01, seed=30 + k)
        assert fast.get_potential_energy(atoms) == eager.get_potential_energy(atoms), k
        assert fast._scripted[False] is not built, k
        fast.get_forces(atoms.copy())  # built again on the new weights (not on the first call after a change)


def test_one_build_at_a_time_in_threads():
    """Two calculators building in two threads: both graphs built (make_fx's state is global: a lock)."""
    import threading

    pot = tiny_painn_lo_hi()
    calcs = [multifi.Calculator(pot, fidelity="hi", script=True) for _ in range(2)]
    results = [None, None]

    def run(k):
        results[k] = calcs[k].get_forces(molecule("CH3CH2OH"))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c._scripted.get(False) for c in calcs)
    assert np.array_equal(results[0], results[1])


def test_builds_leave_nothing_in_torchscripts_process_wide_caches():
    """Each build's code lives in a compilation unit of its own, which goes with the graph: TorchScript's process-wide
    unit and its cache of module types do not grow from build to build (they kept 3-9 MB per build)."""
    from torch.jit._recursive import concrete_type_store

    pot = tiny_painn_lo_hi()
    atoms = molecule("CH3CH2OH")
    multifi.Calculator(pot, fidelity="hi", script=True).get_forces(atoms)
    functions, types = len(torch.jit._state._python_cu.get_functions()), len(concrete_type_store.type_store)
    for _ in range(2):
        calc = multifi.Calculator(pot, fidelity="hi", script=True)
        calc.get_forces(atoms)
        assert calc._scripted.get(False)
    assert len(torch.jit._state._python_cu.get_functions()) == functions
    assert len(concrete_type_store.type_store) == types


def test_weight_versions_see_what_their_holders_need():
    """WeightVersions: replaced tensors and new storages always (a graph reading the tensors needs no more); with
    `copies` (a holder of copies, the ahead-of-time package) any change of a value, bit by bit: in place, through
    `.data` (no version counts up), one entry by 1e-6 (a norm in float32 missed 1e-4); a NaN weight unchanged is
    unchanged; nothing for unchanged weights."""
    import torch.nn as nn
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from multifi.models.potential import WeightVersions

    def nudge_one(p):
        weight = next(iter(p.parameters()))
        weight.data.view(-1)[3] *= 1 + 1e-6

    def replace_scale(p):
        p.head.scale = p.head.scale * 2  # a buffer replaced by another tensor

    def new_parameter(p):
        layer = next(m for m in p.modules() if isinstance(m, nn.Linear))
        layer.weight = nn.Parameter(layer.weight.detach() * 1.5)

    for copies in (False, True):
        pot = tiny_painn_lo_hi()
        edits = (
            (lambda p: next(iter(p.parameters())).data.mul_(1.5), copies),  # through .data: values only
            (nudge_one, copies),
            (lambda p: p.load_state_dict(p.state_dict()), False),  # copied in place, the same values
            (lambda p: p.load_state_dict({k: v + 1 for k, v in p.state_dict().items()}), copies),
            (lambda p: p.load_state_dict({k: v.clone() for k, v in p.state_dict().items()}, assign=True), True),
            (lambda p: vector_to_parameters(parameters_to_vector(p.parameters()), p.parameters()), True),
            (replace_scale, True),
            (new_parameter, True),
            (lambda p: None, False),
        )
        for k, (edit, seen) in enumerate(edits):
            versions = WeightVersions(pot, copies=copies)
            assert not versions.changed()
            with torch.no_grad():
                edit(pot)
            assert versions.changed() == seen, (copies, k)
        with torch.no_grad():
            next(iter(pot.parameters())).view(-1)[0] = float("nan")
        versions = WeightVersions(pot, copies=copies)
        assert not versions.changed()
