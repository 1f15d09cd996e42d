"""Deployed (TorchScript) models: equal to the ASE calculator with ghost atoms built the LAMMPS way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from conftest import si64, tiny_m3gnet, tiny_painn_lo_hi

import multifi
from multifi.deploy import deploy, evaluate_like_lammps, lammps_style_inputs, load_deployed
from multifi.errors import MultifiError

CKPT = Path(__file__).parent / "data" / "solids_painn.pt"


SHEAR = [[0.01, 0.02, 0], [0, -0.01, 0.01], [0.015, 0, 0.005]]


def si64_sheared(seed: int = 1):
    return si64(SHEAR, rattle=0.08, seed=seed)


def molecule_in_box():
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=2)
    return atoms


def reference(pot, fidelity, atoms):
    calc = multifi.Calculator(pot, fidelity=fidelity, dtype="float64")
    atoms = atoms.copy()
    atoms.calc = calc
    out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        out["stress"] = atoms.get_stress()
    return out


def assert_same(got, want, rtol=1e-6):
    assert got["energy"] == pytest.approx(want["energy"], rel=rtol, abs=1e-9)
    scale = np.abs(want["forces"]).max()
    assert scale > 1e-3  # non-trivial forces
    np.testing.assert_allclose(got["forces"], want["forces"], rtol=0, atol=rtol * scale)
    if "stress" in want:
        np.testing.assert_allclose(got["stress"], want["stress"], rtol=0, atol=rtol * np.abs(want["stress"]).max())


_DEPLOYED: dict = {}


@pytest.fixture(scope="session")
def m3gnet_files(tmp_path_factory):
    """The tiny M3GNet deployed at each of its fidelities (m3gnet_PBE.pt, m3gnet_R2SCAN.pt); shared with test_lammps."""
    if "m3gnet" not in _DEPLOYED:  # one deployment per session, also when test_lammps imports this fixture
        d = tmp_path_factory.mktemp("deployed")
        for fid in ("PBE", "R2SCAN"):
            deploy(tiny_m3gnet(), fid, d / f"m3gnet_{fid}.pt")
        _DEPLOYED["m3gnet"] = d
    return _DEPLOYED["m3gnet"]


@pytest.fixture
def deployed_m3gnet(m3gnet_files):
    return m3gnet_files / "m3gnet_R2SCAN.pt"


def test_m3gnet_with_ghost_atoms_equals_calculator(deployed_m3gnet):
    """64-atom Si (sheared cell): ghosts out to interactions × cutoff, full pair list, ghost forces folded back."""
    module, meta = load_deployed(deployed_m3gnet, cutoff=4.5, elements=["Si"])
    assert meta["fidelity"] == "R2SCAN" and meta["interactions"] == 2 and meta["elements"] == ["Si"]
    assert meta["ghost_cutoff"] == 9.0
    assert meta["multifi_version"] == multifi.__version__ and meta["threebody_cutoff"] == 3.5
    atoms = si64_sheared()
    args = lammps_style_inputs(atoms, meta["ghost_cutoff"], meta["cutoff"])
    assert len(args["owner"]) > 5 * len(atoms)  # the ghosts are really there
    assert_same(evaluate_like_lammps(module, meta, atoms), reference(tiny_m3gnet(), "R2SCAN", atoms))


def test_periodic_shifts_without_ghosts_equal_calculator(deployed_m3gnet):
    """The same file fed a periodic pair list (cell shifts instead of ghosts, nlocal = N)."""
    from multifi.data.neighbors import neighbor_list

    module, meta = load_deployed(deployed_m3gnet)
    atoms = si64_sheared(seed=3)
    i, j, s = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, meta["cutoff"] + 0.5)  # + skin
    t = torch.as_tensor
    out = module(
        t(atoms.numbers),
        t(atoms.positions),
        t(atoms.cell.array),
        t(np.stack([i, j])),
        t(s, dtype=torch.float64),
        len(atoms),
    )
    want = reference(tiny_m3gnet(), "R2SCAN", atoms)
    got = {
        "energy": float(out["energy"]),
        "forces": out["forces"].numpy(),
        "stress": (-out["virial"].numpy() / atoms.get_volume())[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]],
    }
    assert_same(got, want)
    assert float(out["atom_energies"].sum()) == pytest.approx(want["energy"], rel=1e-9)


def test_painn_molecule_and_other_fidelity(tmp_path):
    """A tiny random-weight PaiNN on a molecule (no cell, no ghosts): the file deployed at "lo" gives the
    "lo" numbers, the one at "hi" the "hi" numbers."""
    pot = tiny_painn_lo_hi()
    atoms = molecule_in_box()
    results = {}
    for fid in ("lo", "hi"):
        deploy(pot, fid, tmp_path / f"{fid}.pt")
        module, meta = load_deployed(tmp_path / f"{fid}.pt", elements=["C", "H", "O"])
        results[fid] = evaluate_like_lammps(module, meta, atoms)
        assert_same(results[fid], reference(pot, fid, atoms))
    assert abs(results["lo"]["energy"] - results["hi"]["energy"]) > 1.0


def test_solids_painn_checkpoint_periodic(tmp_path):
    deploy(CKPT, "PBE", tmp_path / "pbe.pt")
    module, meta = load_deployed(tmp_path / "pbe.pt")
    atoms = si64(seed=4)[:32]  # half the atoms of the sheared cell (a vacancy-rich structure): a shorter test
    assert_same(evaluate_like_lammps(module, meta, atoms), reference(CKPT, "PBE", atoms))


def test_loader_and_deploy_errors(deployed_m3gnet, tmp_path):
    with pytest.raises(MultifiError, match="cutoff 5 Å requested, the model was trained with 4.5 Å"):
        load_deployed(deployed_m3gnet, cutoff=5.0)
    with pytest.raises(MultifiError, match="element O unknown to the model"):
        load_deployed(deployed_m3gnet, elements=["Si", "O"])
    with pytest.raises(MultifiError, match="not a deployed multifi model"):
        load_deployed(CKPT)
    out = tmp_path / "x.pt"
    with pytest.raises(MultifiError, match=f"{CKPT.name}: unknown fidelity 'B3LYP'"):  # names the model file
        deploy(CKPT, "B3LYP", out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_deployed_file_given_where_a_model_belongs(deployed_m3gnet, capsys):
    """Commands and the Calculator that take a model refuse a deployed file in one line; `multifi info`
    describes it from its metadata."""
    from multifi.cli.main import main
    from multifi.models.registry import load_potential

    with pytest.raises(MultifiError, match="a TorchScript model .* the model.pt or run directory it was deployed from"):
        load_potential(deployed_m3gnet)
    with pytest.raises(MultifiError, match="a TorchScript model"):
        multifi.Calculator(deployed_m3gnet, fidelity="R2SCAN")
    assert main(["info", str(deployed_m3gnet)]) == 0
    out = capsys.readouterr().out
    assert "deployed model" in out and "fidelity: R2SCAN (of PBE, R2SCAN)" in out and "cutoff: 4.5 Å" in out
    assert main(["info", str(deployed_m3gnet), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fidelity"] == "R2SCAN"
    assert main(["info", str(deployed_m3gnet), "--plot", "x.png"]) == 2
    assert main(["info", str(CKPT)]) == 0 and "deployed" not in capsys.readouterr().out


def test_cli_deploy_requires_fidelity_and_records_it(tmp_path):
    cmd = [sys.executable, "-m", "multifi.cli.main", "deploy", str(CKPT), "--out", str(tmp_path / "m.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "--fidelity" in r.stderr and not (tmp_path / "m.pt").exists()
    r = subprocess.run(cmd + ["--fidelity", "R2SCAN"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    extra = {"multifi.json": ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    meta = json.loads(extra["multifi.json"])
    assert meta["fidelity"] == "R2SCAN" and meta["cutoff"] == 5.0 and meta["ghost_cutoff"] == 10.0
    # an existing file (another fidelity's deployed model, say) is replaced only with --force
    before = (tmp_path / "m.pt").read_bytes()
    r = subprocess.run(cmd + ["--fidelity", "PBE"], capture_output=True, text=True)
    assert r.returncode == 2 and "m.pt: exists; not replaced (--force replaces it)" in r.stderr
    assert (tmp_path / "m.pt").read_bytes() == before
    r = subprocess.run(cmd + ["--fidelity", "PBE", "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra["multifi.json"])["fidelity"] == "PBE"


def test_deployed_file_refuses_elements_it_was_not_trained_on(deployed_m3gnet):
    """Any engine feeding the file directly (not through load_deployed's element check) gets an error, not a number."""
    from multifi.data.neighbors import neighbor_list

    module, meta = load_deployed(deployed_m3gnet)
    atoms = si64_sheared(seed=3)
    i, j, s = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, meta["cutoff"])
    t = torch.as_tensor
    args = [t(atoms.positions), t(atoms.cell.array), t(np.stack([i, j])), t(s, dtype=torch.float64), len(atoms)]
    assert torch.isfinite(module(t(atoms.numbers), *args)["energy"])
    for z in (1, 26, 300):
        species = t(atoms.numbers).clone()
        species[5] = z
        with pytest.raises(torch.jit.Error, match="element was not in the model.s training data"):
            module(species, *args)


def test_ghost_atoms_of_a_slab_without_vacuum_are_those_with_vacuum():
    """A zero cell vector across a slab (ase.build without vacuum) gave NaN image ranges: the ghosts are those of
    the same slab with vacuum, locals first."""
    from ase.build import diamond100

    from multifi.deploy import ghost_atoms

    slab = diamond100("Si", size=(2, 2, 2))
    padded = slab.copy()
    padded.cell[2] = [0.0, 0.0, 20.0]
    (p0, o0), (p1, o1) = ghost_atoms(slab, 6.0), ghost_atoms(padded, 6.0)
    assert len(p0) == len(p1) > 3 * len(slab) and (o0 == o1).all()
    np.testing.assert_allclose(p0, p1, atol=1e-9)
    np.testing.assert_allclose(p0[: len(slab)], slab.positions, atol=1e-9)


def test_deploy_refuses_an_output_named_as_a_data_file(tmp_path, capsys):
    """`--out model.extxyz` wrote a TorchScript file under a structure file's name (later readers take it for data):
    a one-line error, nothing written."""
    from test_cli import fails

    for name in ("d.extxyz", "d.json", "d.csv"):
        fails(["deploy", CKPT, "--fidelity", "R2SCAN", "--out", tmp_path / name], capsys, name, "name it *.pt")
    assert not list(tmp_path.iterdir())
