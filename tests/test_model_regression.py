"""Model outputs pinned on a fixed input: performance work must not change results.

tests/data/painn_reference.json was written by tests/data/make_painn_reference.py from the original,
unoptimised PaiNN (commit 7c91c1d); tests/data/m3gnet_reference.json by the same script
(`--backbone m3gnet`) from M3GNet at commit c272e06 (before the edge-gradient forces, compile and the triplet split). Energies and forces must agree to 1e-5 (eV, eV/Å) in float32 and
1e-9 in float64; stress and the parameter gradients of an energy+forces loss (double backward) are
checked too, so fused or reordered kernels cannot silently change training.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("make_painn_reference", DATA / "make_painn_reference.py")
ref_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref_script)

TOL = {
    "float32": {"energy": 1e-5, "forces": 1e-5, "stress": 1e-4, "grad_rel": 1e-4},
    "float64": {"energy": 1e-9, "forces": 1e-9, "stress": 1e-8, "grad_rel": 1e-9},
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "painn_reference.json").read_text())


def load_reference(backbone: str) -> dict:
    return json.loads((DATA / f"{backbone}_reference.json").read_text())


@pytest.mark.parametrize("backbone", ["painn", "m3gnet"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_outputs_match_reference(backbone, dtype):
    reference = load_reference(backbone)
    assert reference["model"] == ref_script.MODELS[backbone]
    torch.manual_seed(0)
    frames = ref_script.frames_from_json(reference["input"])
    tdtype = getattr(torch, dtype)
    got = ref_script.evaluate(ref_script.build(tdtype, reference["model"]), frames, tdtype)
    want, tol = reference[dtype], TOL[dtype]
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(np.array(got[key]), np.array(want[key]), rtol=0, atol=tol[key], err_msg=key)
    assert got["loss"] == pytest.approx(want["loss"], rel=tol["grad_rel"])
    assert set(got["grads"]) == set(want["grads"])
    for name, (s, norm) in want["grads"].items():
        gs, gnorm = got["grads"][name]
        assert gnorm == pytest.approx(norm, rel=tol["grad_rel"], abs=1e-12), name
        assert gs == pytest.approx(s, rel=tol["grad_rel"], abs=tol["grad_rel"] * norm + 1e-12), name


def test_reference_input_is_the_documented_one(reference):
    """The stored input is what the script makes (so the reference can be regenerated and compared)."""
    frames = ref_script.make_input()
    for a, row in zip(frames, reference["input"]):
        np.testing.assert_allclose(a.positions, np.array(row["positions"]), atol=1e-12)
    assert reference["model"] == ref_script.MODEL


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MULTIFI_TEST_COMPILE", "0") in ("", "0"),
    reason="torch.compile takes minutes on a 2-core CPU; MULTIFI_TEST_COMPILE=1 runs it",
)
def test_compiled_painn_matches_reference(reference):
    """The opt-in compiled potential (model.compile) gives the reference energies, forces, stress and
    the parameter gradients of the energy+forces loss (its second derivative is part of the compiled
    graph), and forces/stress with frozen parameters (the ASE calculator)."""
    from multifi.data.batch import graph_from_atoms

    frames = ref_script.frames_from_json(reference["input"])
    pot = ref_script.build(torch.float32)
    pot.use_compile = True
    g = graph_from_atoms(frames, pot.cutoff, fidelity=reference["fidelity_of_structure"], dtype=torch.float32)
    energy = pot(g)["energy"]
    np.testing.assert_allclose(energy.detach().double().numpy(), reference["float32"]["energy"], rtol=0, atol=1e-5)
    got = ref_script.evaluate(pot, frames, torch.float32)  # forces + their parameter gradients, compiled
    for key in ("energy", "forces"):
        np.testing.assert_allclose(np.array(got[key]), np.array(reference["float32"][key]), rtol=0, atol=1e-5)
    for name, (_, norm) in reference["float32"]["grads"].items():
        assert got["grads"][name][1] == pytest.approx(norm, rel=1e-4, abs=1e-12), name
    pot.requires_grad_(False)
    out = pot(g, forces=True, stress=True)
    np.testing.assert_allclose(out["forces"].double().numpy(), reference["float32"]["forces"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["stress"][3].double().numpy(), reference["float32"]["stress"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_painn_energy_only_paths_match_reference(reference, dtype):
    """Energy-only evaluation and training (no forces: the edge directions need no gradient) take the
    sparse direction sum (nn/sparse.py) and, in float32, oneDNN products (nn/onednn.py). Energies match
    the pinned reference, and the parameter gradients of an energy loss match those of the plain dense
    path (torch's own products, dense [E,3,F] direction term)."""
    from multifi.data.batch import graph_from_atoms
    from multifi.models.painn import PaiNN
    from multifi.nn import onednn
    from multifi.nn.sparse import DirectionSum

    tdtype, tol = getattr(torch, dtype), TOL[dtype]
    frames = ref_script.frames_from_json(reference["input"])
    pot = ref_script.build(tdtype)
    g = graph_from_atoms(frames, pot.cutoff, fidelity=reference["fidelity_of_structure"], dtype=tdtype)
    assert DirectionSum.applicable(g.edge_index[0], g.positions[:1].expand(g.edge_index.shape[1], 3))
    grads, energies = {}, {}
    for fast in (True, False):
        PaiNN.sparse_direction, onednn.ONEDNN = fast, fast and onednn._onednn_available()
        try:
            pot.zero_grad(set_to_none=True)
            energy = pot(g)["energy"]
            ((energy / g.n_atoms) ** 2).mean().backward()
        finally:
            PaiNN.sparse_direction, onednn.ONEDNN = True, onednn._onednn_available()
        energies[fast] = energy.detach().double().numpy()
        grads[fast] = {n: p.grad.double() for n, p in pot.named_parameters() if p.grad is not None}
    np.testing.assert_allclose(energies[True], reference[dtype]["energy"], rtol=0, atol=tol["energy"])
    assert set(grads[True]) == set(grads[False])
    for name, want in grads[False].items():
        err = float((grads[True][name] - want).norm())
        assert err <= tol["grad_rel"] * float(want.norm()) + 1e-12, name
