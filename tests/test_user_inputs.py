"""Inputs a new user gets wrong, or gets right in an unusual way: the answer is correct or a one-line error."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, emt_labelled, rattled_molecule
from test_cli import fails, run

from multifi.models.registry import build_potential, save_potential


def test_evaluate_one_fidelity_of_a_file_that_also_names_a_fidelity_the_model_lacks(model, tmp_path, capsys):
    """`evaluate --fidelity lo` evaluates the lo labels of a file whose other frames are labelled CCSD (a
    fidelity the model does not have); without --fidelity the CCSD frames are an error naming the file."""
    mols = [rattled_molecule(m, i) for i, m in enumerate(("CH4", "NH3", "H2O"))]
    frames = [emt_labelled(a, "lo") for a in mols] + [emt_labelled(mols[0], "CCSD")]
    path = tmp_path / "three_levels.extxyz"
    ase.io.write(path, frames)
    out = tmp_path / "lo.json"
    code, _, err = run(["evaluate", model, path, "--fidelity", "lo", "--out", out], capsys)
    assert code == 0, err
    metrics = json.loads(out.read_text())["fidelities"]
    assert set(metrics) == {"lo"} and metrics["lo"]["n"] == 3
    fails(
        ["evaluate", model, path],
        capsys,
        str(path),
        "holds labels at 'CCSD'",
        "its fidelities: lo, hi",
        "--fidelity 'lo'",
    )


def test_ensemble_member_without_the_fidelity_is_an_error_naming_it(model, tmp_path, capsys):
    """A further --ensemble model (predict, evaluate) that lacks the requested fidelity: a one-line error naming
    that model file (was 'model: unknown fidelity', after the first model's predictions), and no output."""
    torch.manual_seed(1)
    member = save_potential(build_potential(TINY_MODEL, ["lo"]), tmp_path / "lo_only.pt")
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    out = tmp_path / "pred.extxyz"
    argv = ["predict", model, src, "--fidelity", "hi", "--ensemble", member, "--out", out]
    fails(argv, capsys, str(member), "unknown fidelity 'hi'", "known: lo")
    assert not out.exists()
    labelled = tmp_path / "hi.extxyz"
    ase.io.write(labelled, [emt_labelled(rattled_molecule(m, i), "hi") for i, m in enumerate(("CH4", "NH3"))])
    fails(
        ["evaluate", model, labelled, "--ensemble", member],
        capsys,
        f"{member} (ensemble member)",
        "unknown fidelity 'hi'",
    )


def _strained_copper(
    n: int = 12,
    stress_unit: float = 1.0,
    elements=("Cu",),
    strain: float = 0.05,
    rattle: float = 0.05,
    equilibrium: bool = False,
) -> list:
    """n strained (components up to ±strain), rattled (stdev `rattle` Å) fcc cells (cycling through `elements`) with EMT energy,
    forces and stress; the stress written in units of `stress_unit` eV/Å³ (1: ASE units, as documented;
    ase.units.GPa: GPa numbers given as eV/Å³; -1: VASP's sign); equilibrium: around EMT's own lattice constants
    (else the experimental ones, at which EMT Al is 1.4 % stretched)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        element = elements[i % len(elements)]
        lattice = (
            {"Cu": 3.589, "Al": 3.993, "Ni": 3.488, "Ag": 4.065, "Pd": 3.88}
            if equilibrium
            else {"Cu": 3.6, "Al": 4.05, "Ni": 3.52, "Ag": 4.09, "Pd": 3.89}
        )
        a = bulk(element, "fcc", lattice[element], cubic=True)
        eps = rng.uniform(-strain, strain, (3, 3))
        a.set_cell(a.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
        a.rattle(rattle, seed=i)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s / stress_unit)
        a.info["fidelity"] = "EMT"
        frames.append(a)
    return frames


@pytest.mark.parametrize("unit", ["eV/A3", "GPa", "kBar"])
def test_stress_in_gpa_or_kbar_instead_of_ev_per_a3_is_flagged(unit, write_config, tmp_path, capsys, caplog):
    """Stress labels are read in eV/Å³ (ASE units). GPa or kBar numbers in their place make every stress
    160× or 1600× too large (hundreds of GPa and more): training says so before it starts."""
    import logging

    from ase.units import GPa

    path = tmp_path / "cu.extxyz"
    ase.io.write(path, _strained_copper(stress_unit={"eV/A3": 1.0, "GPa": GPa, "kBar": GPa / 10}[unit]))
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.25, "test": 0.25, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    flagged = [r.getMessage() for r in caplog.records if "look like" in r.getMessage() and "stress" in r.getMessage()]
    if unit == "eV/A3":
        assert not flagged, flagged
    else:
        assert len(flagged) == 1 and str(path) in flagged[0] and "'EMT'" in flagged[0] and "eV/Å³" in flagged[0]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sign_flipped_stress_is_flagged(sign, write_config, tmp_path, capsys, caplog):
    """Stress with VASP's sign (compression positive) given where ASE's is read: in every composition the pressure
    then rises with the volume, which training says before it starts."""
    import logging

    path = tmp_path / "fcc.extxyz"
    ase.io.write(path, _strained_copper(n=30, stress_unit=sign, elements=("Cu", "Al", "Ni")))
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.1, "test": 0.1, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    flagged = [r.getMessage() for r in caplog.records if "sign-flipped" in r.getMessage()]
    if sign > 0:
        assert not flagged, flagged
    else:
        assert len(flagged) == 1 and str(path) in flagged[0] and "in 3 of 3 compositions" in flagged[0]
        # the modulus the flipped stresses imply, so that a unit error behind the flip shows (EMT: 40-200 GPa)
        modulus = float(re.search(r"median bulk modulus of ([\d.e+]+) GPa", flagged[0]).group(1))
        assert 20 < modulus < 300, flagged[0]
        assert "unit is off" not in flagged[0]  # a plausible modulus blames the sign alone
    too_small = [r.getMessage() for r in caplog.records if "look too small" in r.getMessage()]
    assert not too_small, too_small


def test_stress_too_small_by_a_unit_is_flagged(write_config, tmp_path, capsys, caplog):
    """Stresses converted to ASE's eV/Å³ twice (×1/160): the bulk modulus they imply (EMT Cu, Al, Ni: 40-200 GPa)
    comes out below any solid's; training says so before it starts."""
    import logging

    from ase.units import GPa

    path = tmp_path / "fcc.extxyz"
    ase.io.write(path, _strained_copper(n=30, stress_unit=1 / GPa, elements=("Cu", "Al", "Ni")))
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.1, "test": 0.1, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    flagged = [r.getMessage() for r in caplog.records if "look too small" in r.getMessage()]
    assert len(flagged) == 1 and "over 3 compositions" in flagged[0] and "'EMT'" in flagged[0]


@pytest.mark.parametrize(
    ("unit", "strain", "said"),
    [
        ("GPa read as eV/Å³, near equilibrium", 0.01, "look too large"),  # too small a stress for the size check
        ("GPa read as kBar (MatPES)", 0.05, "look small"),  # 10× small: 4-20 GPa, what molecular crystals have
        ("right", 0.01, None),
    ],
)
def test_stress_off_by_a_unit_is_flagged_by_the_modulus_it_implies(
    unit, strain, said, write_config, tmp_path, capsys, caplog
):
    """Near-equilibrium stresses in GPa read as eV/Å³ stay below the magnitude check (hundreds of GPa) but imply
    a bulk modulus above any solid's; GPa where kBar is read implies one 10× small, which only molecular crystals
    and alkali metals have: both said before training starts, right units not."""
    import logging

    from ase.units import GPa

    factor = {"right": 1.0, "GPa read as kBar (MatPES)": 10.0}.get(unit, GPa)
    path = tmp_path / "fcc.extxyz"
    ase.io.write(
        path,
        _strained_copper(
            n=30, stress_unit=factor, elements=("Cu", "Al", "Ni"), strain=strain, equilibrium=True, rattle=0.01
        ),
    )
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.1, "test": 0.1, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    messages = [r.getMessage() for r in caplog.records if "stresses at fidelity" in r.getMessage()]
    if said is None:
        assert not messages, messages
        return
    flagged = [m for m in messages if said in m]
    assert len(flagged) == 1 and "'EMT'" in flagged[0] and str(path) in flagged[0], messages
    assert not [m for m in messages if "look like numbers in another unit" in m], messages  # not the magnitude check's


def test_fidelity_without_training_labels_is_warned_about(write_config, capsys, caplog):
    """A fidelity labelled only in validation/test structures (here: train_limits 0) cannot be learned: the
    run says so by name, instead of listing every element as lacking a reference energy."""
    import logging

    config = write_config(data={"train_limits": {"hi": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    about_hi = [m for m in messages if m.startswith("hi:")]
    assert len(about_hi) == 1, messages
    assert "no training labels" in about_hi[0] and "val" in about_hi[0] and "test" in about_hi[0]
    assert not any(m.startswith("lo:") for m in messages), messages


def test_a_fidelity_name_misspelt_in_the_data_is_named_as_a_likely_typo(write_config, tmp_path, capsys, caplog):
    """One frame naming 'hii' instead of 'hi' becomes a fidelity of its own; the warning that it has no training
    labels says its name is close to 'hi' (as a misspelt name in a config or on the command line is)."""
    import logging

    from conftest import tiny_frames

    frames = tiny_frames()
    typo = next(a for a in frames if a.info["fidelity"] == "hi")
    typo.info["fidelity"] = "hii"
    path = tmp_path / "typo.extxyz"
    ase.io.write(path, frames, format="extxyz")
    config = write_config(data={"sources": [{"path": str(path)}], "train_limits": {"hii": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    about = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hii: no training labels")]
    assert len(about) == 1 and "its name is close to 'hi', trained on" in about[0], about


def test_a_run_directory_stands_for_its_model(model, tmp_path, capsys):
    """`info`, `predict` and the Calculator take a run directory for the model.pt inside it (was 'not a
    readable checkpoint (IsADirectoryError)'); a folder without model.pt is a one-line error saying so."""
    import shutil

    import multifi

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(model, run_dir / "model.pt")
    code, by_dir, err = run(["info", run_dir, "--json"], capsys)
    assert code == 0, err
    _, by_file, _ = run(["info", run_dir / "model.pt", "--json"], capsys)
    assert json.loads(by_dir)["fidelities"] == json.loads(by_file)["fidelities"]
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    out = tmp_path / "pred.extxyz"
    assert run(["predict", run_dir, src, "--fidelity", "lo", "--out", out], capsys)[0] == 0
    assert ase.io.read(out).info["predicted_by"].endswith(f": {run_dir.name}/model.pt")  # a folder: named ('.' too)
    atoms = rattled_molecule("H2O", 0)
    atoms.calc = multifi.Calculator(run_dir, fidelity="lo")
    assert ase.io.read(out).get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    fails(["info", empty], capsys, str(empty), "no model.pt")
    (empty / "checkpoints").mkdir()  # an unfinished run: its checkpoint is named as what loads instead
    (empty / "checkpoints" / "best.ckpt").write_bytes(b"")
    fails(["info", empty], capsys, "no model.pt", f"its checkpoint {empty / 'checkpoints' / 'best.ckpt'} loads")


def test_resume_with_changed_split_settings_is_an_error(write_config, tmp_path, capsys):
    """`train --resume RUN --set data.split.seed=…` re-split the structures silently: the resumed run trained
    on former test structures and tested on former training ones, while config.yaml and splits.json still
    described the old split. Now an error naming splits.json, before anything is written."""
    config = write_config(train={"epochs": 1})
    run_dir = tmp_path / "run"
    assert run(["train", config], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    fails(
        ["train", "--resume", run_dir, "--set", "data.split.seed=1", "--set", "train.epochs=2"],
        capsys,
        str(run_dir / "config.yaml"),
        "changed: data.split.seed: 0 → 1",
    )
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_periodic_structure_with_a_zero_volume_cell_names_file_and_frame(model, tmp_path, capsys):
    """pbc=True without a lattice (or a slab whose non-periodic vector is zero): reading the file for training
    or `data info`, and `predict`, name the file and the structure (was 'periodic structure with a lattice of
    zero volume' alone, and `data info` counted it as a fine periodic structure)."""
    from ase import Atoms

    import multifi

    good = [rattled_molecule("H2O", 0), rattled_molecule("CH4", 1)]
    bad = Atoms("C2", positions=[[0, 0, 0], [0, 0, 1.3]], pbc=True)
    path = tmp_path / "no_lattice.extxyz"
    ase.io.write(path, [*good, bad])
    fails(["predict", model, path, "--fidelity", "lo", "--out", tmp_path / "p.xyz"], capsys, str(path), "structure 2")
    assert not (tmp_path / "p.xyz").exists()
    labelled = tmp_path / "labelled.extxyz"
    ase.io.write(labelled, [emt_labelled(a, "lo") for a in (*good, bad)])
    fails(["data", "info", labelled], capsys, str(labelled), "frame 2", "zero volume")
    bad.calc = multifi.Calculator(model, fidelity="lo")
    with pytest.raises(multifi.MultifiError, match="zero volume"):
        bad.get_potential_energy()


def test_fidelity_without_validation_labels_is_warned_about(write_config, tmp_path, capsys, caplog):
    """A fidelity trained on but absent from validation takes no part in checkpoint selection: said by name."""
    import logging

    from multifi.config import load_config
    from multifi.train.prepare import prepare_data

    cfg = load_config(write_config(), [])
    prep = prepare_data(cfg)
    ds, hi = prep.dataset, prep.dataset.fidelities.index("hi")
    only_lo = [str(k) for s, k in enumerate(ds.keys) if not ds.energy_mask[s, hi]]
    rest = [str(k) for k in ds.keys if str(k) not in only_lo[:3]]
    files = {}
    for name, keys in (("train", rest[:-3]), ("val", only_lo[:3]), ("test", rest[-3:])):
        files[name] = str(tmp_path / f"{name}.txt")
        (tmp_path / f"{name}.txt").write_text("\n".join(keys) + "\n")
    config = write_config(
        name="c2.yaml", data={"sources": [{"path": cfg.data.sources[0].path}], "split": {"files": files}}
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    about = [r.getMessage() for r in caplog.records if "no validation labels" in r.getMessage()]
    assert len(about) == 1 and about[0].startswith("hi:"), about


def test_a_diverged_training_is_an_error_and_writes_no_model(write_config, capsys):
    config = write_config(
        train={
            "epochs": 3,
            "batch_size": 8,
            "progress": False,
            "threads": 1,
            "warmup_steps": 0,
            "lr": 1.0e6,
            "grad_clip": None,
        }
    )
    from multifi.config import load_config

    run_dir = Path(load_config(config, []).output_dir)
    code, _, err = run(["train", config], capsys)
    assert code == 2 and "training diverged" in err and len(err.strip().splitlines()) == 1
    assert not (run_dir / "model.pt").exists()


@pytest.mark.parametrize("weight", ["-0.05", ".nan"])
def test_negative_or_nan_fidelity_weights_are_errors(write_config, capsys, weight):
    code, _, err = run(
        ["train", write_config(), "--dry-run", "--set", f"loss.fidelity_weights={{hi: {weight}}}"], capsys
    )
    assert code == 2 and ("finite and ≥ 0" in err or "finite number" in err) and "fidelity_weights" in err


def test_fidelity_weights_of_zero(write_config, capsys, caplog):
    """Weight 0 for one fidelity is allowed and warned about; 0 for every fidelity is an error."""
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, _ = run(["train", write_config(), "--dry-run", "--set", "loss.fidelity_weights={lo: 0}"], capsys)
    assert code == 0 and "lo has weight 0" in caplog.text and "do not train the model" in caplog.text
    code, _, err = run(["train", write_config(), "--dry-run", "--set", "loss.fidelity_weights={lo: 0, hi: 0}"], capsys)
    assert code == 2 and "every fidelity has weight 0" in err and len(err.strip().splitlines()) == 1


def test_a_label_table_given_another_fidelity_than_its_manifest_is_an_error(tmp_path):
    import json

    from multifi.data.readers.qm9 import read_label_table
    from multifi.errors import MultifiError

    (tmp_path / "x.csv").write_text("index,energy_eV\n1,-10.0\n2,-11.0\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": [{"file": "x.csv", "fidelity": "GFN2-xTB"}]}))
    assert read_label_table(tmp_path / "x.csv").fidelity == "GFN2-xTB"
    assert read_label_table(tmp_path / "x.csv", "GFN2-xTB").fidelity == "GFN2-xTB"
    with pytest.raises(MultifiError, match="labels of 'GFN2-xTB'.*given as 'PBE'"):
        read_label_table(tmp_path / "x.csv", "PBE")


def test_a_fidelity_with_too_few_labels_for_its_energy_scale_borrows_the_others(write_config, capsys, caplog):
    """3 'hi' training labels of molecules with 4 elements fit their references exactly: no energy scale can be
    read off the residual (it fell back to the force RMS, ~10× the others, and made forces ~10× too large)."""
    config = write_config(data={"train_limits": {"hi": 3}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    assert "hi: its training labels do not determine an energy scale" in caplog.text and "lo: its" not in caplog.text


def test_sampling_and_loss_weights_that_leave_nothing_to_train(write_config, capsys, caplog):
    """lo sampled 100 % but weighted 0, hi weighted but never sampled: an error, not a run of zero losses; a
    monitored fidelity that does not train is warned about."""
    config = write_config(loss={"fidelity_weights": {"lo": 0}})
    code, _, err = run(["train", config, "--dry-run", "--set", "train.fidelity_sampling={hi: 0}"], capsys)
    assert code == 2 and "nothing would be trained" in err and len(err.strip().splitlines()) == 1
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run", "--set", "train.monitor=lo"], capsys)
    assert code == 0, err
    assert "train.monitor: lo does not train" in caplog.text and "(trained: hi)" in caplog.text


def test_labels_whose_loss_weights_are_all_zero(write_config, tmp_path, capsys, caplog):
    """loss.energy and loss.forces 0 for data of energies and forces: a one-line error before anything is written
    (it trained into a traceback: a loss without gradient); loss.energy 0 for data where some structures hold
    energies only: their count warned, and a batch of them alone is a step of zero gradient, not a traceback."""
    from conftest import emt_labelled, tiny_frames

    config = write_config()
    code, _, err = run(["train", config, "--set", "loss.energy=0", "--set", "loss.forces=0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "loss.energy: 0 and loss.forces: 0: the training labels (energy of" in err and "nothing would be trained" in err
    )
    assert not (tmp_path / "run").exists()
    frames = tiny_frames(16)
    for i in range(16):  # energies only: molecules of another fidelity
        a = emt_labelled(rattled_molecule("CH4", seed=100 + i), "e")
        a.calc.results.pop("forces")
        frames.append(a)
    ase.io.write(tmp_path / "mixed.extxyz", frames)
    config = write_config(
        "mixed.yaml",
        data={"sources": [{"path": str(tmp_path / "mixed.extxyz")}], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        loss={"energy": 0.0},
        train={
            "epochs": 2,
            "batch_size": 2,
            "progress": False,
            "threads": 1,
            "warmup_steps": 0,
            "fidelity_sampling": {"e": 0.5},
        },
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config], capsys)
    assert code == 0, err
    assert re.search(r"\d+ of \d+ training samples hold only labels weighted 0 \(loss.energy: 0\)", caplog.text)


def test_a_batch_of_labels_weighted_zero_gives_a_zero_gradient():
    """The loss of a batch with labels only of weight 0 is 0 and differentiable: every parameter's gradient 0."""
    from conftest import emt_labelled

    from multifi.data.batch import GraphCollator
    from multifi.data.dataset import FidelityDataset
    from multifi.data.neighbors import make_neighbors
    from multifi.train.loss import MultiFidelityLoss

    frames = [emt_labelled(rattled_molecule("H2O", seed=i), "lo") for i in range(3)]
    records = [
        {
            "numbers": a.numbers,
            "positions": a.positions,
            "labels": {"lo": {"energy": a.get_potential_energy()}},
            "key": f"m{i}",
        }
        for i, a in enumerate(frames)
    ]
    ds = FidelityDataset.from_records(records)
    potential = build_potential(TINY_MODEL, ["lo"])
    graph = GraphCollator(ds, make_neighbors(ds, potential.cutoff, progress=False))(np.array([[0, 0], [1, 0], [2, 0]]))
    loss, terms = MultiFidelityLoss(energy=0.0)(potential(graph), graph)
    assert terms == {} and float(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in potential.parameters())


@pytest.mark.parametrize("factor", [1.0, 1000.0])
def test_forces_in_mev_per_angstrom_are_flagged(factor, write_config, tmp_path, capsys, caplog):
    """Forces written in meV/Å where eV/Å is read: 1000× too large, which training says before it starts."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for a in _strained_copper(n=12):
        r = a.calc.results
        a.calc = SinglePointCalculator(a, energy=r["energy"], forces=r["forces"] * factor, stress=r["stress"])
        frames.append(a)
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, frames)
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.25, "test": 0.25, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    flagged = [r.getMessage() for r in caplog.records if "look like numbers in another unit" in r.getMessage()]
    assert len(flagged) == (factor > 1) and all(str(path) in m and "'EMT'" in m for m in flagged)
    assert all("kJ/mol/Å by 96.49" in m for m in flagged)  # kJ/mol/Å is as likely as meV/Å


def test_forces_off_by_a_unit_at_one_fidelity_do_not_blame_the_other(write_config, tmp_path, capsys, caplog):
    """PBE forces in meV/Å beside right r2SCAN forces on the same structures, one file each: one warning, about
    PBE, naming PBE's file only (it named every source); the comparison of the two fidelities' forces (which blamed
    r2SCAN as '0.001× the size' of PBE's) is not made."""
    from ase.calculators.singlepoint import SinglePointCalculator

    paths = {}
    for fidelity, factor in (("PBE", 1000.0), ("R2SCAN", 1.0)):
        frames = []
        for n, a in enumerate(_strained_copper(n=12)):
            r = a.calc.results
            a.calc = SinglePointCalculator(a, energy=r["energy"], forces=r["forces"] * factor, stress=r["stress"])
            a.info.update(fidelity=fidelity, key=f"cu{n}")
            frames.append(a)
        paths[fidelity] = tmp_path / f"{fidelity}.extxyz"
        ase.io.write(paths[fidelity], frames)
    sources = [{"path": str(p)} for p in paths.values()]
    config = write_config(data={"sources": sources, "split": {"val": 0.25, "test": 0.25, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    about_forces = [r.getMessage() for r in caplog.records if "forces at fidelity" in r.getMessage()]
    assert len(about_forces) == 1 and "'PBE'" in about_forces[0], about_forces
    assert about_forces[0].startswith(f"{paths['PBE']}: ") and str(paths["R2SCAN"]) not in about_forces[0]


def test_settings_of_a_fidelity_left_out_by_data_fidelities_are_ignored(write_config, capsys, caplog):
    """loss.fidelity_weights names hi, data.fidelities keeps lo only: a warning that hi's setting is ignored
    (it was 'unknown fidelity hi (known: lo)', although hi is in the data)."""
    config = write_config(loss={"fidelity_weights": {"hi": 2.0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run", "--set", "data.fidelities=[lo]"], capsys)
    assert code == 0, err
    assert "loss.fidelity_weights: hi left out by data.fidelities; its setting is ignored" in caplog.text


def test_compressed_solids_are_not_taken_for_a_unit_error(tmp_path, caplog):
    """Solids at 140-290 GPa (an iron-core-like equation of state, B0 = 165 GPa, B' = 5.3, stresses in eV/Å³) have
    bulk moduli above 1 000 GPa: compression, not a unit error, so no stress warning."""
    import logging

    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import GPa

    from multifi.data.checks import check_stress_units
    from multifi.data.readers.ase_files import read_ase

    b0, b1 = 165.0, 5.3

    def birch_murnaghan(x):  # pressure (GPa) at V/V0 = x
        return 1.5 * b0 * (x ** (-7 / 3) - x ** (-5 / 3)) * (1 + 0.75 * (b1 - 4) * (x ** (-2 / 3) - 1))

    def bm_energy(x, v0):  # energy (eV) at V/V0 = x of a cell of volume v0 (Å³) at zero pressure
        eta = x ** (-2 / 3) - 1
        return 9 * v0 * b0 * GPa / 16 * (eta**3 * b1 + eta**2 * (6 - 4 * x ** (-2 / 3)))

    frames = []
    for element, a0 in (("Fe", 3.45), ("Ni", 3.52), ("Co", 3.55)):
        for x in np.linspace(0.62, 0.70, 8):
            atoms = bulk(element, "fcc", a0 * x ** (1 / 3), cubic=True)
            pressure = birch_murnaghan(x)
            energy = -4.0 * len(atoms) + bm_energy(x, a0**3)  # consistent with the stresses: P = −dE/dV
            atoms.calc = SinglePointCalculator(
                atoms, energy=energy, forces=np.zeros((len(atoms), 3)), stress=-pressure * GPa * np.eye(3)
            )
            atoms.info["fidelity"] = "PBE"
            frames.append(atoms)
    path = tmp_path / "core.extxyz"
    ase.io.write(path, frames)
    ds = read_ase(path)
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), int)], 1)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_stress_units(ds, pairs) == []
    assert "stresses at fidelity" not in caplog.text
    shifted = read_ase(path)  # a Pulay-like offset: the labels' pressure 100 GPa below what the energies say
    shifted.stress = shifted.stress + 100.0 * np.eye(3)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_stress_units(shifted, pairs)
    assert caplog.text.count("carry pressures their energies do not have in 3 composition(s)") == 1
    caplog.clear()
    ds.stress = ds.stress * 160.2  # the same numbers in GPa read as eV/Å³: flagged (by size or by the modulus)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert check_stress_units(ds, pairs) == ["PBE"]


@pytest.mark.parametrize("setting", ["model.cutoff=inf", "train.lr=.inf", "model.cutoff=1e400", "train.lr=nan"])
def test_infinite_settings_are_config_errors(write_config, capsys, setting):
    """cutoff=inf ended in a traceback from the neighbour list, lr=inf passed the dry run: both config errors."""
    fails(["train", write_config(), "--dry-run", "--set", setting], capsys, setting.split("=")[0], "finite")


def test_a_cutoff_with_thousands_of_neighbours_per_atom_is_an_error_before_the_neighbour_list(
    write_config, tmp_path, capsys
):
    """model.cutoff 1e6 for 5.0 ran for minutes without a word while memory grew: an error naming the structure,
    the cutoff and the neighbours per atom, in periodic directions of any count; 12 Å in a dense metal passes."""
    import time

    from ase.build import bulk, fcc111

    import multifi
    from multifi.data.neighbors import neighbor_list

    cu = bulk("Cu", "fcc", 3.6)
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    wire = bulk("Cu", "fcc", 3.6, cubic=True)
    wire.pbc = [False, False, True]
    for atoms, name in ((cu, "bulk"), (slab, "slab"), (wire, "wire")):
        start = time.process_time()  # CPU time: a busy machine's other processes do not count
        with pytest.raises(
            multifi.MultifiError, match=f"{name}: a cutoff of 1e\\+06 Å gives (about|up to) .* neighbours per atom"
        ):
            neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 1e6, where=name)
        assert time.process_time() - start < 1.0
    i, _, _ = neighbor_list(cu.positions, cu.cell.array, cu.pbc, 12.0)
    assert 500 < len(i) < 3000  # ~600 neighbours of the one atom within 12 Å
    path = tmp_path / "cu.extxyz"
    cells = [cu.repeat(2) for _ in range(6)]
    for k, a in enumerate(cells):
        a.rattle(0.05, seed=k)
    ase.io.write(path, [emt_labelled(a, "lo") for a in cells])
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}})
    start = time.perf_counter()
    fails(["train", config, "--dry-run", "--set", "model.cutoff=1e6"], capsys, str(path), "model.cutoff a slip")
    assert time.perf_counter() - start < 30


def test_a_cell_vector_near_zero_is_blamed_not_the_usual_cutoff():
    """A periodic cell flattened to 1e-4 Å along one vector gives the same flood of neighbours as a huge cutoff:
    with a usual cutoff the error names the cell's volume per atom, not 'is model.cutoff a slip?'."""
    from ase.build import bulk

    import multifi
    from multifi.data.neighbors import neighbor_list

    cu = bulk("Cu", "fcc", 3.6, cubic=True)
    cu.cell[2] = [0, 0, 1e-4]
    with pytest.raises(
        multifi.MultifiError, match=r"flat: .* its periodic volume is 0.0013 Å³, 0.000324 Å³ per atom"
    ) as e:
        neighbor_list(cu.positions, cu.cell.array, cu.pbc, 5.0, where="flat")
    assert "slip" not in str(e.value) and "cell vector near zero" in str(e.value)


def test_warnings_of_an_ensemble_member_name_its_model_file(model, tmp_path, caplog):
    """predict --ensemble: a member's own warnings (here an element pair it never saw within the cutoff) name
    the member's file, not an anonymous 'predict_atoms' (the main model's warnings name the input file)."""
    from multifi.models.registry import load_potential
    from multifi.predict import predict_file

    pot = load_potential(model)
    contact = pot.head.contact
    contact[1, 6] = contact[6, 1] = 1.1  # H and O had neighbours (C) in training, never each other
    contact[8, 6] = contact[6, 8] = 1.2
    main = save_potential(pot, tmp_path / "main.pt")
    with torch.no_grad():
        next(pot.parameters()).add_(0.01)  # members must differ
    member = save_potential(pot, tmp_path / "member.pt")
    src = tmp_path / "water.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    with caplog.at_level(logging.WARNING):
        predict_file(main, src, "hi", tmp_path / "pred.extxyz", ensemble=[member])
    pair = [r.getMessage() for r in caplog.records if "no H–O pair came within" in r.getMessage()]
    assert len(pair) == 2, [r.getMessage() for r in caplog.records]
    assert pair[0].startswith(f"{src}:") and f"ensemble member {member}" in pair[1]
    assert not any(r.getMessage().startswith("predict_atoms") for r in caplog.records)


@pytest.mark.parametrize("soft_elements", [("Cu", "Al"), ("Cu", "Al", "Ag", "Pd")])
def test_a_share_of_stiff_compositions_answers_the_unit_question(soft_elements, write_config, tmp_path, capsys, caplog):
    """Soft compositions (alkali-metal-like moduli) beside a stiff one (Ni), stresses in the right unit: the median
    modulus is soft. With two soft ones, a third of the compositions are stiff, which a 10× unit error would have
    softened too: no 'GPa where kBar is read' question (it was asked of correct Li, Na and diamond stresses). With
    four, one stiff composition among many soft ones is what 10× small stresses of data holding very stiff solids
    (compressed SiC and carbon in MatPES-like data) also give: the question stays (it was silenced)."""
    import logging

    soft = _strained_copper(n=10 * len(soft_elements), stress_unit=10.0, elements=soft_elements, equilibrium=True)
    stiff = _strained_copper(n=10, elements=("Ni",), equilibrium=True)
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, soft + stiff)
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.1, "test": 0.1, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    messages = [r.getMessage() for r in caplog.records if "stresses at fidelity" in r.getMessage()]
    if len(soft_elements) == 2:
        assert not messages, messages
    else:
        assert len(messages) == 1 and "10× too small" in messages[0] and "over 5 compositions" in messages[0], messages


def test_unit_checks_of_train_see_every_split_as_data_info_does(write_config, tmp_path, capsys, caplog):
    """Sign-flipped stresses of compositions with 6 structures each, 40 % of them held out for validation and
    test: fewer than the check's 5 per composition stay in training, which skipped it silently while `data info`
    warned on the same file; train checks every labelled split's units now."""
    import logging

    path = tmp_path / "fcc.extxyz"
    ase.io.write(path, _strained_copper(n=18, stress_unit=-1.0, elements=("Cu", "Al", "Ni")))
    config = write_config(data={"sources": [{"path": str(path)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    flagged = [r.getMessage() for r in caplog.records if "sign-flipped" in r.getMessage()]
    assert len(flagged) == 1 and "in 3 of 3 compositions" in flagged[0], flagged


@pytest.mark.parametrize(
    ("energy_scale", "force_factor"), [("per_fidelity", 1.0), ("shared", 1.0), ("per_fidelity", 0.2)]
)
def test_a_few_labels_with_a_far_smaller_scale_are_warned_about(
    energy_scale, force_factor, write_config, tmp_path, capsys, caplog
):
    """12 of 36 structures labelled at hi too, hi's energies spreading 5× less than lo's on its structures while its
    forces are as large: with per-fidelity scales the shared layers must learn 5× larger gradients at hi from few
    labels, a warning naming both scales and model.energy_scale: shared; none with a shared scale, and none when
    hi's forces are 5× smaller too (then the per-fidelity scale is right)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    structures = _strained_copper(n=36, elements=("Cu", "Al", "Ni"))
    for fidelity, chosen, e_factor, f_factor in (
        ("lo", structures, 1.0, 1.0),
        ("hi", structures[:12], 0.2, force_factor),
    ):
        for n, a in enumerate(chosen):
            r = a.calc.results
            b = a.copy()
            b.calc = SinglePointCalculator(
                b, energy=e_factor * r["energy"] - 3.0 * len(a), forces=f_factor * r["forces"]
            )
            b.info.update(fidelity=fidelity, key=f"s{n}")
            frames.append(b)
    path = tmp_path / "two.extxyz"
    ase.io.write(path, frames)
    split = {"val": 0.1, "test": 0.1, "seed": 0}
    config = write_config(data={"sources": [{"path": str(path)}], "split": split}, model={"energy_scale": energy_scale})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    gap = [r.getMessage() for r in caplog.records if "its energy scale from" in r.getMessage()]
    if energy_scale == "shared" or force_factor != 1.0:
        assert not gap, gap
    else:
        assert len(gap) == 1 and gap[0].startswith("hi: its energy scale from"), gap
        assert re.search(r"is 0\.2\d?× that of lo .* its forces 1× as large \(RMS, on the \d+ structures", gap[0]), gap
        assert re.search(r"must learn [45](\.\d)?× larger gradients at hi", gap[0]), gap
        assert "model.energy_scale: shared" in gap[0]


def test_an_element_only_in_the_test_split_is_not_read_as_a_second_unit(tmp_path, capsys, caplog):
    """Unit checks run over every split: the references they compare with are fitted on those same labels, so a
    test-only element (N₂ here) is not 'far from the reference energies' (a fit of the training split has none)."""
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(0)
    per_element = {1: -3.4, 6: -9.2, 7: -8.3, 8: -7.5}
    names = [*(("H2O", "CH4", "CH3OH", "C2H4", "CO2", "H2CO", "C2H2", "C2H6")[i % 8] for i in range(40)), "N2"]
    frames = []
    for i, name in enumerate(names):
        a = rattled_molecule(name, seed=i) if name != "N2" else molecule("N2")
        energy = sum(per_element[z] for z in a.numbers) + rng.normal(0, 0.05) * len(a)
        a.calc = SinglePointCalculator(a, energy=energy)
        a.info.update(fidelity="PBE", key=f"m{i}")
        frames.append(a)
    ase.io.write(tmp_path / "mols.extxyz", frames)
    split = {}
    for part, keys in (("train", range(0, 34)), ("val", range(34, 37)), ("test", range(37, 41))):
        (tmp_path / f"{part}.txt").write_text("".join(f"m{i}\n" for i in keys))
        split[part] = str(tmp_path / f"{part}.txt")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"sources": [{"path": str(tmp_path / "mols.extxyz")}], "split": {"files": split}},
                "model": TINY_MODEL,
                "loss": {"forces": 0.0},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["train", config, "--dry-run"], capsys)
    assert code == 0, err
    assert "test structures (e.g. m40) contain N" in caplog.text  # said as what it is
    assert "lie far from the reference energies" not in caplog.text and "two units" not in caplog.text


def test_a_negative_index_slice_is_read_as_the_frames_to_take(model, tmp_path, capsys):
    """`--index -2:` (ASE's last two frames) was taken for an option: '--index: expected one argument'."""
    src = tmp_path / "three.xyz"
    ase.io.write(src, [rattled_molecule(m, i) for i, m in enumerate(("H2O", "NH3", "CH4"))])
    out = tmp_path / "last_two.extxyz"
    code, _, err = run(["predict", model, src, "--fidelity", "lo", "--index", "-2:", "--out", out], capsys)
    assert code == 0, err
    assert [a.get_chemical_formula() for a in ase.io.read(out, ":")] == ["H3N", "CH4"]


def test_a_split_file_given_as_null_means_no_such_split(tmp_path):
    """`data.split.files: {train: a, val: b, test: null}` (what `config --example` describes: text or null) is the
    same as leaving `test` out; paths stay relative to the config file."""
    from multifi.config import load_config

    cfg = {
        "data": {
            "sources": [{"path": "x.extxyz"}],
            "split": {"files": {"train": "tr.txt", "val": "va.txt", "test": None}},
        }
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    files = load_config(tmp_path / "run.yaml").data.split.files
    assert files == {"train": str(tmp_path / "tr.txt"), "val": str(tmp_path / "va.txt")}


def test_a_split_leaving_no_training_structures_names_the_config(write_config, capsys):
    """Fractions that leave nothing to train on: one line naming the config file and data.split."""
    config = write_config()
    fails(["train", config, "--dry-run", "--set", "data.split.val=0.95"], capsys, str(config), "data.split", "val=0.95")


@pytest.mark.parametrize(
    "given, made_at, warned", [("lo", "hi", True), ("hi", "hi", False), ("lo", "lo", False), ("lo", "mix", False)]
)
def test_evaluate_names_labels_that_match_another_fidelity_far_better(
    model, tmp_path, capsys, caplog, given, made_at, warned
):
    """Labels made at 'hi' evaluated as 'lo' (a file without info['fidelity'] and the wrong --fidelity): the table
    reads as a poor model, so the run says the labels match the model's hi predictions far better, with both errors;
    labels evaluated at their own fidelity get no such warning."""
    from multifi.models.registry import load_potential
    from multifi.predict import predict_atoms

    pot = load_potential(model)
    mols = [rattled_molecule(m, 50 + i) for i, m in enumerate(("CH4", "NH3", "H2O", "CH3OH", "C2H6") * 2)]
    at = {name: predict_atoms(pot, mols, name, forces=False)[0] for name in ("lo", "hi")}
    # "mix": labels nearer hi's predictions (4× nearer) than lo's, as a fidelity trained on a handful of structures
    # can be next to a well-trained neighbour: no mislabelling to report
    energies = 0.8 * at["hi"] + 0.2 * at["lo"] if made_at == "mix" else at[made_at]
    noise = np.random.default_rng(0).normal(scale=0.003, size=len(mols))  # eV/atom
    frames = []
    for a, e, d in zip(mols, energies, noise):
        b = a.copy()
        b.info = {"energy": float(e + d * len(b))}
        frames.append(b)
    path = tmp_path / "labels.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, err = run(["evaluate", model, path, "--fidelity", given], capsys)
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "far better than" in r.getMessage()]
    if not warned:
        assert not said, said
        return
    assert len(said) == 1, said
    assert f"its {given} energy labels match the model's {made_at} predictions far better" in said[0]
    assert f"are they {made_at} labels?" in said[0] and "on 10 structures" in said[0]


def test_training_on_data_without_a_single_energy_is_an_error(tmp_path, capsys):
    """Energies under `Energy=` (not read) left forces only: training exited 0 with a model that knows no element
    (every prediction an error). Now a one-line error before anything is written, naming energy_key."""
    frames = [emt_labelled(rattled_molecule(m, i), "lo") for i, m in enumerate(("CH4", "NH3", "H2O") * 4)]
    for a in frames:
        a.calc.results.pop("energy")
    path = tmp_path / "forces_only.extxyz"
    ase.io.write(path, frames)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"data": {"sources": [{"path": str(path)}]}, "model": TINY_MODEL, "output_dir": str(tmp_path / "run")}
        )
    )
    code, _, err = run(["train", cfg], capsys)
    assert code == 2 and not (tmp_path / "run").exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith("multifi: error: ") and "none of the" in last and "energy_key" in last


def test_fidelity_name_suggestions_follow_the_method_not_another_basis():
    """'B3LYP' (QM9's level without its basis) gets 'B3LYP/6-31G(2df,p)' suggested; HF/3-21G labels never get
    'HF/STO-3G' (another level of theory: a suggestion would steer toward relabelling them), a typo in a basis does."""
    from multifi.errors import closest_name

    known = ["GFN2-xTB", "B3LYP/6-31G(2df,p)", "HF/STO-3G"]
    assert closest_name("B3LYP", known) == "B3LYP/6-31G(2df,p)" and closest_name("gfn2", known) == "GFN2-xTB"
    assert closest_name("HF/3-21G", known) is None and closest_name("PBE", known) is None
    assert closest_name("HF/3-21G", ["HF/STO-3G", "B3LYP/3-21G"]) is None  # another method of the same basis
    assert closest_name("B3LYP/6-31G", known) is None  # another basis, though a prefix
    assert closest_name("PBE/def2-TZVP", ["PBE/def2-SVP"]) is None
    assert (
        closest_name("B3LYP/6-31G(2df,p", known) == "B3LYP/6-31G(2df,p)"
        and closest_name("HF/STO3G", known) == "HF/STO-3G"
    )
