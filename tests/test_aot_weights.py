"""A calculator with aot=True notices changed weights (load_state_dict on calc.potential) and loads or builds the
package of the new weights, as the scripted model does, instead of answering with the old ones. The compiler is
replaced by a stand-in that runs the exported function eagerly on the copy of the potential it was given."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import molecule
from conftest import tiny_painn_lo_hi

import multifi
from multifi import aot as aot_module


def test_changed_weights_reach_the_compiled_package(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MULTIFI_CACHE", str(tmp_path))
    packages = {}

    def build(core, threebody, dtype, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        packages[str(path)] = core  # holds its own copy of the potential, as a compiled package does

    def load(path):
        core = packages[path]
        return lambda n, p, e, s, w, f, *bonds: core(n, p, e, s, w, bonds[0] if bonds else None, f)

    monkeypatch.setattr(aot_module, "_build", build)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    atoms = molecule("CH3CH2OH")
    calc = multifi.Calculator(tiny_painn_lo_hi(), fidelity="hi", dtype="float64", aot=True)
    before = calc.get_potential_energy(atoms)
    state = calc.potential.state_dict()
    calc.potential.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()})
    calc.reset()
    after = calc.get_potential_energy(atoms)
    eager = multifi.Calculator(calc.potential, fidelity="hi", dtype="float64", script=False)
    assert len(packages) == 2 and "weights changed" in caplog.text
    assert abs(after - before) > 1e-3
    np.testing.assert_allclose(after, eager.get_potential_energy(atoms), rtol=0, atol=1e-9)
