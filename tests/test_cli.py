"""The `multifi` command line end to end: train, evaluate, predict, data; bad input as one-line errors."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import METRIC_KEYS, TINY_MODEL, periodic_cell, rattled_molecule

from multifi.cli.main import main
from multifi.models.registry import build_potential, load_potential, save_potential
from multifi.predict import predict_atoms, read_structures


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fails(argv, capsys, *fragments) -> str:
    """Exit code 2 and exactly one stderr line `multifi: error: …` containing every fragment."""
    code, out, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("multifi: error: "), err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_extxyz):
    """`multifi train CONFIG --set output_dir=… --set train.epochs=1` on the tiny extxyz."""
    root = tmp_path_factory.mktemp("cli")
    cfg = {
        "data": {"sources": [{"path": str(tiny_extxyz)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "model": TINY_MODEL,
        "train": {"epochs": 50, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
        "output_dir": str(root / "not_used"),
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = root / "run"
    code = main(["train", str(path), "--set", f"output_dir={run_dir}", "--set", "train.epochs=1"])
    assert code == 0
    return path, run_dir


# ---------------------------------------------------------------------------------------------- train
def test_train_with_set_overrides(cli_run):
    path, run_dir = cli_run
    assert not (path.parent / "not_used").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["output_dir"] == str(run_dir) and saved["train"]["epochs"] == 1
    last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0
    assert set(json.loads((run_dir / "metrics.json").read_text())["fidelities"]) == {"lo", "hi"}


def test_train_refuses_existing_run_dir(cli_run, capsys):
    path, run_dir = cli_run
    fails(["train", path, "--set", f"output_dir={run_dir}"], capsys, str(run_dir), "exists and is not empty")


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_writes_per_fidelity_json(cli_run, tiny_extxyz, tmp_path, capsys):
    _, run_dir = cli_run
    out = tmp_path / "eval.json"
    code, stdout, _ = run(["evaluate", run_dir / "model.pt", tiny_extxyz, "--out", out], capsys)
    assert code == 0 and "lo" in stdout and "hi" in stdout
    payload = json.loads(out.read_text())
    assert set(payload) == {"fidelities"} and set(payload["fidelities"]) == {"lo", "hi"}
    for name, n in (("lo", 40), ("hi", 20)):
        m = payload["fidelities"][name]
        assert set(m) == METRIC_KEYS and m["n"] == n and m["energy_mae_meV"] > 0 and m["stress_mae_GPa"] is None


def test_evaluate_one_fidelity_of_a_file_naming_fidelities(cli_run, tiny_extxyz, tmp_path, capsys):
    """--fidelity selects the labels of that fidelity; it does not relabel structures that name their own."""
    _, run_dir = cli_run
    out = tmp_path / "hi.json"
    code, _, _ = run(["evaluate", run_dir / "model.pt", tiny_extxyz, "--fidelity", "hi", "--out", out], capsys)
    assert code == 0
    both = tmp_path / "both.json"
    run(["evaluate", run_dir / "model.pt", tiny_extxyz, "--out", both], capsys)
    hi = json.loads(out.read_text())["fidelities"]
    ref = json.loads(both.read_text())["fidelities"]["hi"]
    assert set(hi) == {"hi"} and hi["hi"].keys() == ref.keys()
    for key, value in ref.items():  # other batches in the two calls: equal up to float reduction order
        assert hi["hi"][key] == (value if value is None or key == "n" else pytest.approx(value, rel=1e-6)), key


def test_evaluate_file_without_fidelities_at_a_named_fidelity(cli_run, tmp_path, capsys):
    _, run_dir = cli_run
    mols = [rattled_molecule("CH4", 7), rattled_molecule("NH3", 8)]
    for i, a in enumerate(mols):
        a.calc = SinglePointCalculator(a, energy=-10.0 - i, forces=np.zeros((len(a), 3)))
    path = tmp_path / "plain.extxyz"
    ase.io.write(path, mols)
    out = tmp_path / "plain.json"
    assert run(["evaluate", run_dir / "model.pt", path, "--fidelity", "lo", "--out", out], capsys)[0] == 0
    assert json.loads(out.read_text())["fidelities"]["lo"]["n"] == 2
    fails(["evaluate", run_dir / "model.pt", path], capsys, str(path), "no fidelity")
    fails(["evaluate", run_dir / "model.pt", path, "--fidelity", "CCSD"], capsys, "unknown fidelity 'CCSD'", "lo, hi")
    for a in mols:
        a.info["fidelity"] = "hi"
    ase.io.write(path, mols)  # structures naming their own fidelity: --fidelity lo cannot relabel them
    fails(
        ["evaluate", run_dir / "model.pt", path, "--fidelity", "lo"],
        capsys,
        f"{path}: no labels at 'lo': its structures name their own fidelity (hi)",
        "drop --fidelity",
    )


# ---------------------------------------------------------------------------------------------- predict
def test_predict_writes_extxyz_with_energies(cli_run, tmp_path, capsys, caplog):
    _, run_dir = cli_run
    mols = [rattled_molecule("CH3OH", 5), rattled_molecule("H2O", 6)]
    src = tmp_path / "in.xyz"
    ase.io.write(src, mols)
    out = tmp_path / "pred.extxyz"
    code, stdout, _ = run(["predict", run_dir / "model.pt", src, "--fidelity", "hi", "--out", out], capsys)
    assert code == 0 and "wrote 2 frames (one per input frame)" in stdout
    twice = tmp_path / "twice.extxyz"  # a fidelity given twice: predicted once, as if given once
    code, stdout, _ = run(
        ["predict", run_dir / "model.pt", src, "--fidelity", "hi", "--fidelity", "hi", "--out", twice], capsys
    )
    assert code == 0 and stdout.strip().endswith(f"predicted at hi to {twice}")
    assert twice.read_bytes() == out.read_bytes()
    assert "--fidelity hi given more than once: predicted once" in caplog.text
    frames = ase.io.read(out, ":")
    pot = load_potential(run_dir / "model.pt")
    e, f, _ = predict_atoms(pot, mols, "hi")
    e_lo, _, _ = predict_atoms(pot, mols, "lo")
    assert len(frames) == 2
    for a, ei, fi, m in zip(frames, e, f, mols):
        assert a.get_potential_energy() == pytest.approx(ei, rel=1e-6)
        np.testing.assert_allclose(a.get_forces(), fi, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.positions, m.positions, atol=1e-6)
        assert a.info["fidelity"] == "hi"
    assert not np.allclose(e, e_lo)


def test_predict_periodic_stress_in_ase_units(tmp_path, capsys):
    """Crystals get a stress (eV/Å³, Voigt, ASE sign) in the output; molecules in the same file get none."""
    atoms, mol = periodic_cell(1), rattled_molecule("H2O", 3)
    torch.manual_seed(0)
    pot = build_potential(TINY_MODEL, ["PBE", "R2SCAN"])
    ref = np.zeros((119, 2))
    ref[[1, 8, 11, 17], :] = [[-0.5, -0.6], [-3.0, -3.1], [-1.0, -1.2], [-2.0, -2.5]]
    pot.head.set_baseline(ref, np.ones(2))
    model = save_potential(pot, tmp_path / "model.pt")
    src = tmp_path / "cell.extxyz"
    ase.io.write(src, [atoms, mol])
    out = tmp_path / "pred.extxyz"
    assert run(["predict", model, src, "--fidelity", "R2SCAN", "--out", out], capsys)[0] == 0
    got = ase.io.read(out, ":")
    _, _, stress = predict_atoms(load_potential(model), [atoms], "R2SCAN")
    assert np.abs(stress[0]).max() > 1e-3
    voigt = got[0].get_stress()  # eV/Å³, ASE order xx yy zz yz xz xy
    s = stress[0] * units.GPa
    np.testing.assert_allclose(voigt, [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], rtol=1e-5, atol=1e-9)
    assert "stress" not in got[1].calc.results and not got[1].pbc.any()
    assert got[1].get_potential_energy() == pytest.approx(predict_atoms(load_potential(model), [mol], "R2SCAN")[0][0])


def test_predict_reads_matpes_json_lines_like_training(tmp_path, capsys):
    """A MatPES JSONL (readable by train and evaluate) is readable by predict too: its structures predicted, its
    labels kept as ref_* (stress converted from VASP kBar to eV/Å³ in ASE's sign, as training reads it)."""
    from test_reader_matpes import record, write_jsonl

    from multifi.data.readers.matpes import vasp_stress_to_ase

    torch.manual_seed(0)
    pot = build_potential(TINY_MODEL, ["PBE"])
    ref = np.zeros((119, 1))
    ref[[11, 17], 0] = [-1.0, -2.0]
    pot.head.set_baseline(ref, np.ones(1))
    model = save_potential(pot, tmp_path / "model.pt")
    # "a" also at r2SCAN (its PBE label is the one kept when predicting at PBE); a NaN label is dropped, not fatal
    records = [record("a"), record("b", energy=-6.0), record("a", functional="r2SCAN", energy=-9.0)]
    src = write_jsonl(tmp_path / "nacl.jsonl", records + [record("c", energy=float("nan"))])
    out = tmp_path / "pred.extxyz"
    assert run(["predict", model, src, "--fidelity", "PBE", "--out", out], capsys)[0] == 0
    got = ase.io.read(out, ":")
    assert [a.info["key"] for a in got] == ["matpes:a", "matpes:b", "matpes:c"]
    assert "ref_energy" not in got[2].info  # c: its NaN energy dropped, the structure predicted
    assert [a.info["ref_energy"] for a in got[:2]] == [-6.5, -6.0] and got[0].info["ref_fidelity"] == "PBE"
    np.testing.assert_allclose(got[0].arrays["ref_forces"], [[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]])
    # a's label at the other fidelity stays too, under its own name; b has none there
    assert got[0].info["ref_energy_r2SCAN"] == -9.0 and "ref_forces_r2SCAN" in got[0].arrays
    assert not any(k.endswith("_r2SCAN") for k in (*got[1].info, *got[1].arrays))
    # read at a fidelity a has no label at: both of its labels kept by name, none as the calculator's
    (a,) = [x for x in read_structures(str(src), "HSE") if x.info["key"] == "matpes:a"]
    assert a.calc is None and "fidelity" not in a.info
    assert (a.info["ref_energy_PBE"], a.info["ref_energy_r2SCAN"]) == (-6.5, -9.0)
    gpa = vasp_stress_to_ase(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))  # 3×3 GPa, ASE sign
    voigt = np.array([gpa[0, 0], gpa[1, 1], gpa[2, 2], gpa[1, 2], gpa[0, 2], gpa[0, 1]]) * units.GPa
    np.testing.assert_allclose(got[0].info["ref_stress"], voigt, rtol=1e-6)
    _, _, stress = predict_atoms(load_potential(model), [got[0]], "PBE")
    np.testing.assert_allclose(
        got[0].get_stress(), np.array(stress[0]).ravel()[[0, 4, 8, 5, 2, 1]] * units.GPa, rtol=1e-5, atol=1e-9
    )


def test_predict_marks_structures_whose_reference_was_estimated(tmp_path, capsys, caplog):
    """N never labelled at 'hi' (its reference estimated from 'lo'): NH3 predicted at hi carries
    reference_estimated (its energy may be off by eV), H2O does not, and at lo neither."""
    torch.manual_seed(0)
    pot = build_potential(TINY_MODEL, ["lo", "hi"])
    ref = np.zeros((119, 2))
    ref[[1, 7, 8], :] = [[-0.5, -0.6], [-1.0, -1.2], [-2.0, -2.5]]
    fitted = ref != 0
    fitted[7, 1] = False
    pot.head.set_baseline(ref, np.ones(2), fitted)
    model = save_potential(pot, tmp_path / "model.pt")
    src = tmp_path / "m.xyz"
    ase.io.write(src, [rattled_molecule("NH3", 0), rattled_molecule("H2O", 1)])
    out = tmp_path / "p.extxyz"
    assert run(["predict", model, src, "--fidelity", "hi", "--fidelity", "lo", "--out", out], capsys)[0] == 0
    got = ase.io.read(out, ":")
    assert got[0].info.get("reference_estimated") is True and "reference_estimated" not in got[1].info
    assert not any(k.startswith("reference_estimated_") for a in got for k in a.info)
    # with a σ (here an ensemble's): the estimate's error is in it; unknown (no error recorded): NaN, said so
    torch.manual_seed(1)
    other = build_potential(TINY_MODEL, ["lo", "hi"])
    other.head.set_baseline(ref, np.ones(2), fitted)
    member = save_potential(other, tmp_path / "member.pt")
    out = tmp_path / "e.extxyz"
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["predict", model, src, "--fidelity", "hi", "--ensemble", member, "--out", out], capsys)[0] == 0
    assert "1 frame(s) have an estimated hi reference energy" in caplog.text
    assert "energy_sigma is NaN for 1 of them" in caplog.text
    before = [a.info["energy_sigma"] for a in ase.io.read(out, ":")]
    assert np.isnan(before[0]) and np.isfinite(before[1])
    spread = np.array([np.nan, 0.7])  # eV/atom: the estimate's error at hi
    for path, p in ((model, pot), (member, other)):
        p.head.set_baseline(ref, np.ones(2), fitted, spread=spread)
        save_potential(p, path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        argv = ["predict", model, src, "--fidelity", "hi", "--ensemble", member, "--out", out, "--force"]
        assert run(argv, capsys)[0] == 0
    assert "their energy_sigma includes that estimate's expected error (its leave-one-out error, 0.7 eV" in caplog.text
    sigma = [a.info["energy_sigma"] for a in ase.io.read(out, ":")]
    assert sigma[0] >= 0.7 and sigma[1] == pytest.approx(before[1])  # one N atom: ≥ 0.7 eV; H2O: the spread alone
    # a member that estimated O at hi too: H2O's mean carries that estimate, flagged whichever model comes first
    fitted_o = fitted.copy()
    fitted_o[8, 1] = False
    other.head.set_baseline(ref, np.ones(2), fitted_o)
    member_o = save_potential(other, tmp_path / "member_o.pt")
    for first, second in ((model, member_o), (member_o, model)):
        assert (
            run(["predict", first, src, "--fidelity", "hi", "--ensemble", second, "--out", out, "--force"], capsys)[0]
            == 0
        )
        assert all(a.info.get("reference_estimated") is True for a in ase.io.read(out, ":"))


def test_predict_unknown_fidelity_lists_known_ones(cli_run, tmp_path, capsys):
    _, run_dir = cli_run
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    fails(
        ["predict", run_dir / "model.pt", src, "--fidelity", "HI", "--out", tmp_path / "o.xyz"],
        capsys,
        str(run_dir / "model.pt"),
        "unknown fidelity 'HI'",
        "did you mean 'hi'",
        "known: lo, hi",
    )
    assert not (tmp_path / "o.xyz").exists()


def test_evaluate_on_a_file_with_a_fidelity_the_model_lacks_names_the_way_to_evaluate_the_others(
    cli_run, tmp_path, capsys
):
    """Labels at 'hi' and at a method the model never saw: an error that says --fidelity hi evaluates those at hi
    (it said only 'unknown fidelity'); with it, the labels at hi are evaluated."""
    _, run_dir = cli_run
    frames = []
    for i, fid in enumerate(["hi", "PBE0", "hi"]):
        a = rattled_molecule(["H2O", "NH3", "CH4"][i], i)
        a.info["fidelity"] = fid
        a.calc = SinglePointCalculator(a, energy=-10.0 - i)
        frames.append(a)
    src = tmp_path / "two.extxyz"
    ase.io.write(src, frames)
    fails(["evaluate", run_dir / "model.pt", src], capsys, "holds labels at 'PBE0'", "pass --fidelity 'hi'")
    code, out, _ = run(["evaluate", run_dir / "model.pt", src, "--fidelity", "hi"], capsys)
    assert code == 0 and re.search(r"^hi +2 ", out, re.M), out


def test_evaluate_warns_when_the_data_holds_the_models_training_structures(
    cli_run, tiny_extxyz, capsys, caplog, tmp_path
):
    """Evaluating a model on its own training data (the whole file it trained on) reported the errors as if held
    out: a warning counts the (structure, fidelity) pairs it trained on; structures trained on at another fidelity
    only are said apart (their labels are held out: they counted as trained on before)."""
    import logging

    from multifi.train.extension_data import load_old_run

    _, run_dir = cli_run
    old = load_old_run(run_dir)
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert run(["evaluate", run_dir / "model.pt", tiny_extxyz], capsys)[0] == 0
    assert f"{len(old.train)} of the " in caplog.text and "pairs evaluated were trained on" in caplog.text
    lo, hi = old.dataset.fidelities.index("lo"), old.dataset.fidelities.index("hi")
    only_lo = [s for s, k in old.train.tolist() if k == lo and not old.dataset.energy_mask[s, hi]][:3]
    frames = [old.dataset.to_atoms(s) for s in only_lo]
    for a in frames:
        a.info["fidelity"] = "hi"
        a.calc = SinglePointCalculator(a, energy=-10.0)
    ase.io.write(tmp_path / "hi_of_lo.extxyz", frames)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert run(["evaluate", run_dir / "model.pt", tmp_path / "hi_of_lo.extxyz"], capsys)[0] == 0
    assert "pairs evaluated were trained on" not in caplog.text
    assert f"{len(only_lo)} structure(s) evaluated were trained on at other fidelities only" in caplog.text
    # the same training structures without keys, written to 3 decimals and turned: found by their geometry
    from scipy.spatial.transform import Rotation

    trained_hi = np.unique(old.train[old.train[:, 1] == hi, 0])[:4]
    frames = [old.dataset.to_atoms(int(s)) for s in trained_hi]
    for i, a in enumerate(frames):
        a.positions = np.round(Rotation.from_euler("z", 30 * i, degrees=True).apply(a.positions), 3)
        a.info = {"fidelity": "hi"}
        a.calc = SinglePointCalculator(a, energy=-10.0)
    ase.io.write(tmp_path / "keyless.extxyz", frames)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert run(["evaluate", run_dir / "model.pt", tmp_path / "keyless.extxyz"], capsys)[0] == 0
    assert "4 of the 4 (structure, fidelity) pairs evaluated were trained on" in caplog.text
    for i, a in enumerate(frames):  # and under keys of their own
        a.info["key"] = f"renamed{i}"
    ase.io.write(tmp_path / "renamed.extxyz", frames)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert run(["evaluate", run_dir / "model.pt", tmp_path / "renamed.extxyz"], capsys)[0] == 0
    assert "4 of the 4 (structure, fidelity) pairs evaluated were trained on" in caplog.text
    # a run whose copy of the data cannot be read: the evaluation runs (the warning by the split's keys)
    import shutil

    broken = tmp_path / "broken_run"
    shutil.copytree(run_dir, broken)
    (broken / "dataset.npz").write_bytes(b"not an npz")
    assert run(["evaluate", broken / "model.pt", tiny_extxyz], capsys)[0] == 0


def test_predict_unknown_element(cli_run, tmp_path, capsys):
    _, run_dir = cli_run
    src = tmp_path / "sulfur.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0), Atoms("SH2", positions=[[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0]])])
    fails(
        ["predict", run_dir / "model.pt", src, "--fidelity", "lo", "--out", tmp_path / "o.xyz"],
        capsys,
        str(src),
        "structure 1",
        "element S was not seen in training",
        "H, C, N, O",
    )
    # every unseen element and how many structures hold them, not only the first (fixed one frame at a time)
    gaas = Atoms("GaAs", positions=[[0, 0, 0], [2.4, 0, 0]])
    ase.io.write(src, [rattled_molecule("H2O", 0), Atoms("SH2", positions=[[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0]]), gaas])
    fails(
        ["predict", run_dir / "model.pt", src, "--fidelity", "lo", "--out", tmp_path / "o.xyz"],
        capsys,
        "structure 1: element S was not seen in training (unseen: S, Ga, As in 2 structure(s))",
    )


def test_evaluate_unknown_element(cli_run, tmp_path, capsys):
    _, run_dir = cli_run
    si = periodic_cell(0)
    si.calc = SinglePointCalculator(si, energy=-3.0, forces=np.zeros((len(si), 3)))
    src = tmp_path / "nacl.extxyz"
    ase.io.write(src, [si])
    fails(["evaluate", run_dir / "model.pt", src, "--fidelity", "lo"], capsys, str(src), "Na", "not seen in training")


# ---------------------------------------------------------------------------------------------- data
def test_data_info_lists_per_fidelity_counts(tiny_extxyz, capsys):
    code, out, _ = run(["data", "info", tiny_extxyz], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert rows["lo"] == ["40", "40", "0"] and rows["hi"] == ["20", "20", "0"]
    assert "structures: 40" in out and "elements: H C N O" in out
    assert "structures labelled at more than one fidelity: 20" in out
    assert "periodic: 0" in out


def test_data_info_refuses_overlapping_atoms(tmp_path, capsys):
    """Atoms 0.05 Å apart (training, evaluate and predict refuse them): data info says so (exit 2, after its
    summary), for unlabelled structures too."""
    from conftest import emt_labelled

    frames = [emt_labelled(rattled_molecule("H2O", k), "lo") for k in range(3)]
    frames[1].positions[2] = frames[1].positions[1] + [0.05, 0, 0]
    src = tmp_path / "overlap.extxyz"
    ase.io.write(src, frames, format="extxyz")
    fails(["data", "info", src], capsys, str(src), "structure 1 (0-based) has atoms 0.050 Å apart")
    pool = tmp_path / "pool.xyz"
    ase.io.write(pool, [a.copy() for a in frames])
    fails(["data", "info", pool], capsys, "has atoms 0.050 Å apart")


def test_evaluate_and_predict_read_the_frames_of_index(cli_run, tiny_extxyz, tmp_path, capsys):
    """--index picks frames of a file ASE reads (the last frame of a trajectory: -1); other sources refuse it."""
    _, run_dir = cli_run
    for index, frames in (("0:6", 6), ("-1", 1), ("::10", 6)):
        out = tmp_path / f"m{frames}_{index.replace(':', '_')}.json"
        assert run(["evaluate", run_dir / "model.pt", tiny_extxyz, "--index", index, "--out", out], capsys)[0] == 0
        n = sum(m["n"] for m in json.loads(out.read_text())["fidelities"].values())
        assert n == frames, (index, n)
    fails(
        ["evaluate", run_dir / "model.pt", run_dir / "dataset.npz", "--index", "-1"], capsys, "--index -1 picks frames"
    )


def _with_config_types(frames: list, types=("bulk", "surface", None)) -> list:
    """The frames with info['config_type'] per molecule (its lo and hi frames alike): types[i % len(types)] for the
    i-th molecule, none where that is None."""
    i = -1
    for a in frames:
        i += a.info["fidelity"] == "lo"  # each molecule's lo frame comes first
        if types[i % len(types)] is not None:
            a.info["config_type"] = types[i % len(types)]
    return frames


def test_evaluate_group_by_gives_each_groups_errors_as_a_file_of_that_group_alone(cli_run, tmp_path, capsys):
    """--group-by config_type: per group, the metrics an evaluation of that group's frames alone gives; groups in the
    order they occur, frames without the key last; counts add up to the whole file's."""
    from conftest import tiny_frames

    _, run_dir = cli_run
    frames = _with_config_types(tiny_frames())
    ase.io.write(tmp_path / "typed.extxyz", frames, format="extxyz")
    out = tmp_path / "groups.json"
    code, stdout, _ = run(
        ["evaluate", run_dir / "model.pt", tmp_path / "typed.extxyz", "--group-by", "config_type", "--out", out],
        capsys,
    )
    assert code == 0
    assert "config_type = bulk (14 structures)" in stdout and "no config_type (13 structures)" in stdout
    payload = json.loads(out.read_text())
    groups = payload["groups"]
    assert groups["by"] == "config_type" and [g["value"] for g in groups["values"]] == ["bulk", "surface", None]
    for name in ("lo", "hi"):
        assert sum(g["fidelities"][name]["n"] for g in groups["values"]) == payload["fidelities"][name]["n"]
    for g in groups["values"]:
        alone = [a for a in frames if a.info.get("config_type") == g["value"]]
        ase.io.write(tmp_path / "alone.extxyz", alone, format="extxyz")
        separate = tmp_path / f"alone_{g['value']}.json"
        assert run(["evaluate", run_dir / "model.pt", tmp_path / "alone.extxyz", "--out", separate], capsys)[0] == 0
        expected = json.loads(separate.read_text())["fidelities"]
        assert g["structures"] == expected["lo"]["n"] and set(g["fidelities"]) == set(expected)
        for name, m in expected.items():
            for key, value in m.items():
                got = g["fidelities"][name][key]
                assert got == (value if value is None or key == "n" else pytest.approx(value, rel=1e-6)), key


def test_evaluate_group_by_refuses_sources_without_info_and_says_repeated_structures_of_two_groups(
    cli_run, tmp_path, capsys, caplog
):
    from conftest import tiny_frames

    _, run_dir = cli_run
    fails(
        ["evaluate", run_dir / "model.pt", run_dir / "dataset.npz", "--group-by", "config_type"],
        capsys,
        "dataset.npz: grouping by config_type (--group-by) reads info['config_type'] of files ASE reads",
    )
    frames = tiny_frames(4)  # lo0 hi0 lo1 lo2 hi2 lo3
    frames[1].info["config_type"] = "other"  # the hi frame of molecule 0: its lo frame, first, has none
    frames[3].info["config_type"], frames[4].info["config_type"] = "a", "b"  # molecule 2 tagged twice
    ase.io.write(tmp_path / "mixed.extxyz", frames, format="extxyz")
    out = tmp_path / "mixed.json"
    args = ["evaluate", run_dir / "model.pt", tmp_path / "mixed.extxyz", "--group-by", "config_type", "--out", out]
    assert run(args, capsys)[0] == 0
    assert "1 frame(s) repeat a structure with another config_type, counted under the first one's" in caplog.text
    groups = json.loads(out.read_text())["groups"]["values"]
    assert [(g["value"], g["structures"]) for g in groups] == [("other", 1), ("a", 1), (None, 2)]
    caplog.clear()
    args = ["evaluate", run_dir / "model.pt", tmp_path / "mixed.extxyz", "--group-by", "config_typ"]
    assert run(args, capsys)[0] == 0 and "no frame has info['config_typ']" in caplog.text


def test_frame_key_is_the_key_reading_gives(tiny_extxyz):
    from multifi.data.readers.ase_files import frame_key
    from multifi.data.sources import read_labelled

    ds = read_labelled(str(tiny_extxyz))
    keys = {frame_key(a) for a in ase.io.read(tiny_extxyz, ":")}
    assert keys == set(ds.keys.tolist()) and len(keys) == 40
    periodic = periodic_cell()
    periodic.info["key"] = 7
    assert frame_key(periodic) == "7"
    periodic.info["key"] = ""  # an empty key: the geometry's, as reading gives it
    assert frame_key(periodic).startswith("sha1:")


def test_group_by_refuses_a_value_per_frame(tmp_path):
    from conftest import tiny_frames

    from multifi.data.groups import MAX_GROUPS, structure_groups
    from multifi.data.sources import read_labelled
    from multifi.errors import MultifiError

    frames = tiny_frames(MAX_GROUPS + 10)
    for i, a in enumerate(frames):
        a.info["config_type"] = f"frame{i}"
    ase.io.write(tmp_path / "each.extxyz", frames, format="extxyz")
    ds = read_labelled(str(tmp_path / "each.extxyz"))
    with pytest.raises(MultifiError, match=rf"takes {MAX_GROUPS + 10} distinct values \(at most {MAX_GROUPS}\)"):
        structure_groups(ds, [str(tmp_path / "each.extxyz")], ":", "config_type")


def test_data_info_tells_slabs_and_wires_from_crystals():
    import numpy as np

    from multifi.cli.data_cmd import _periodicity

    pbc = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    assert _periodicity(pbc) == "4 (3-D 1, slabs 2, wires 1)" and _periodicity(pbc[[0, 4]]) == "1"


def test_data_info_and_convert_read_a_run_configs_data(write_config, tiny_extxyz, tmp_path, capsys):
    """A config's sources, each with its own fidelity and label keys, as training reads them (the quick start's
    files cannot be named on one command line with one --fidelity and one set of keys)."""
    frames = ase.io.read(tiny_extxyz, ":")
    other = []
    for a in frames[:10]:
        b = a.copy()
        b.info = {"key": f"x{len(other)}"}
        b.info["REF_energy"] = a.get_potential_energy()
        b.arrays["REF_forces"] = a.get_forces()
        other.append(b)
    ase.io.write(tmp_path / "ref.extxyz", other, format="extxyz")
    sources = [{"path": str(tiny_extxyz)}]
    sources.append({"path": str(tmp_path / "ref.extxyz"), "fidelity": "PBE", "energy_key": "REF_energy"})
    sources[-1]["forces_key"] = "REF_forces"
    config = write_config(data={"sources": sources, "fidelities": ["lo", "PBE"]})
    code, out, _ = run(["data", "info", "--config", config], capsys)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert code == 0 and rows["PBE"] == ["10", "10", "0"] and rows["lo"] == ["40", "40", "0"] and "hi" not in rows
    npz = tmp_path / "both.npz"
    code, out, _ = run(["data", "convert", "--config", config, "--out", npz], capsys)
    assert code == 0 and "wrote 50 structures, 2 fidelities (" in out and npz.exists()
    fails(["data", "info", "--config", config, tiny_extxyz], capsys, "--config reads the config's data.sources")
    pool = tmp_path / "pool.extxyz"  # unlabelled: the one-file fallback must not swallow the --config error
    ase.io.write(pool, [ase.Atoms(a.numbers, a.positions) for a in frames[:3]], format="extxyz")
    fails(["data", "info", "--config", config, pool], capsys, "--config reads the config's data.sources")
    empty = write_config("empty.yaml", data={"sources": []})
    fails(["data", "info", "--config", empty], capsys, "data.sources: empty")
    fails(["data", "info"], capsys, "give SOURCE files")


def test_data_convert_then_info(tiny_extxyz, tmp_path, capsys):
    npz = tmp_path / "tiny.npz"
    code, out, _ = run(["data", "convert", tiny_extxyz, "--out", npz], capsys)
    assert code == 0 and npz.exists() and "wrote 40 structures, 2 fidelities" in out
    code, out, _ = run(["data", "info", npz], capsys)
    assert code == 0 and "structures: 40" in out
    before = npz.read_bytes()  # an existing output is kept unless --force
    fails(["data", "convert", tiny_extxyz, "--out", npz], capsys, f"{npz}: exists; not replaced (--force replaces it)")
    assert npz.read_bytes() == before
    assert run(["data", "convert", tiny_extxyz, "--out", npz, "--force"], capsys)[0] == 0


def test_data_convert_says_which_per_frame_info_the_dataset_does_not_keep(tmp_path, capsys, caplog):
    """config_type (and any info key the readers do not take in) is named with its count; the keys they read (fidelity,
    key, MACE's head and weights, the charge) are not."""
    from conftest import tiny_frames

    frames = _with_config_types(tiny_frames())
    for a in frames:
        a.info.update(config_weight=1.0, charge=0)
    ase.io.write(tmp_path / "typed.extxyz", frames, format="extxyz")
    typed = sum("config_type" in a.info for a in frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, _ = run(["data", "convert", tmp_path / "typed.extxyz", "--out", tmp_path / "t.npz"], capsys)
    assert code == 0 and 0 < typed < len(frames)
    said = caplog.text
    assert f"typed.extxyz: info 'config_type' (in {typed} of {len(frames)} frames read) of its frames not kept" in said
    assert "evaluate --group-by config_type reads the original file" in said
    assert "'fidelity'" not in said and "config_weight" not in said and "'charge'" not in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert run(["data", "convert", tmp_path / "t.npz", "--out", tmp_path / "t.extxyz"], capsys)[0] == 0
    assert "not kept" not in caplog.text
    for a in frames:  # one file read as two sources, each with its own energy key: both keys are kept
        a.calc = None
        a.info = {"REF_energy_a": -10.0 * len(a), "REF_energy_b": -11.0 * len(a)}
    ase.io.write(tmp_path / "two.extxyz", frames, format="extxyz")
    config = tmp_path / "two.yaml"
    sources = [
        {"path": str(tmp_path / "two.extxyz"), "fidelity": n, "energy_key": f"REF_energy_{n}"} for n in ("a", "b")
    ]
    config.write_text(yaml.safe_dump({"data": {"sources": sources}}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert run(["data", "convert", "--config", config, "--out", tmp_path / "two.npz"], capsys)[0] == 0
    assert "not kept" not in caplog.text


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_files(tmp_path, capsys, cli_run):
    missing = tmp_path / "nope.extxyz"
    fails(["data", "info", missing], capsys, str(missing), "no such file")
    fails(["train", tmp_path / "nope.yaml"], capsys, "nope.yaml", "no such config file")
    fails(["evaluate", tmp_path / "nope.pt", missing], capsys, "nope.pt", "no such checkpoint")
    _, run_dir = cli_run
    fails(
        ["predict", run_dir / "model.pt", missing, "--fidelity", "lo", "--out", tmp_path / "o.xyz"],
        capsys,
        str(missing),
        "no such file",
    )


def test_missing_data_file_named_in_config(write_config, tmp_path, capsys):
    path = write_config(data={"sources": [{"path": str(tmp_path / "gone.extxyz")}]})
    fails(["train", path], capsys, "gone.extxyz", "no such file")


def test_unreadable_formats(tmp_path, capsys):
    junk = tmp_path / "junk.extxyz"
    junk.write_text("hello\nworld\n")
    fails(["data", "info", junk], capsys, str(junk), "unreadable")
    binary = tmp_path / "junk.foo"
    binary.write_bytes(bytes(range(256)) * 2)
    fails(["data", "info", binary], capsys, str(binary), "not a file format ASE can read")
    bad_ckpt = tmp_path / "model.pt"
    bad_ckpt.write_text("weights")
    fails(
        ["predict", bad_ckpt, junk, "--fidelity", "x", "--out", tmp_path / "o.xyz"],
        capsys,
        str(bad_ckpt),
        "not a readable checkpoint",
    )


def test_structure_without_any_label(tmp_path, capsys):
    a, b = rattled_molecule("H2O", 0), rattled_molecule("NH3", 1)
    a.calc = SinglePointCalculator(a, energy=-1.0)
    b.info["fidelity"] = "lo"
    a.info["fidelity"] = "lo"
    path = tmp_path / "nolabel.extxyz"
    ase.io.write(path, [a, b])
    fails(["data", "info", path], capsys, str(path), "frame 1", "no energy/forces/stress label")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_labels(tmp_path, capsys, caplog, value):
    a, b = rattled_molecule("H2O", 0), rattled_molecule("NH3", 1)
    a.calc = SinglePointCalculator(a, energy=-1.0)
    b.calc = SinglePointCalculator(b, energy=float(value))
    path = tmp_path / "nan.extxyz"
    ase.io.write(path, [a, b], format="extxyz")
    fails(["data", "info", path, "--fidelity", "lo"], capsys, str(path), "non-finite (NaN/inf)", "frame 1")
    code, out, _ = run(["data", "info", path, "--fidelity", "lo", "--skip-invalid"], capsys)
    assert code == 0 and "structures: 1" in out
    assert "nan.extxyz: skipped 1 non-finite (NaN/inf) labels" in caplog.text


@pytest.mark.parametrize(
    "section, key", [("data", "train_limits"), ("train", "fidelity_sampling"), ("loss", "fidelity_weights")]
)
def test_config_fidelity_absent_from_data(write_config, tmp_path, capsys, section, key):
    path = write_config()
    raw = yaml.safe_load(path.read_text())
    raw.setdefault(section, {})[key] = {"B3LYP": 10}
    path.write_text(yaml.safe_dump(raw))
    fails(["train", path], capsys, str(path), f"{section}.{key}", "unknown fidelity 'B3LYP'", "known: lo, hi")
    run_dir = Path(raw["output_dir"])
    assert not run_dir.exists() or not any(run_dir.iterdir()), "a failed run left files behind"


def test_unknown_config_key_suggests_nearest(write_config, capsys):
    path = write_config(model={**TINY_MODEL, "featuers": 16})
    fails(["train", path], capsys, str(path), "unknown key 'model.featuers'", "did you mean 'features'?")
    line = fails(
        ["train", write_config("ok.yaml"), "--set", "train.epcohs=1"],
        capsys,
        "--set train.epcohs=1: unknown key 'train.epcohs'",
        "did you mean 'epochs'?",
    )
    assert "ok.yaml" not in line  # the key came from --set, not from the file
    fails(
        ["train", write_config("ok.yaml"), "--set", "train.epochs=abc"], capsys, "--set train.epochs=abc: train.epochs:"
    )
    fails(["train"], capsys, "needs a CONFIG.yaml")


@pytest.mark.parametrize(
    "item",
    [
        "data.fidelities=[XX]",
        "train.monitor=XX",
        "train.fidelity_sampling={XX: 1}",
        "train.fidelity_sampling.XX=1",
        "loss.fidelity_weights={XX: 1}",
        "data.train_limits={XX: 3}",
    ],
)
def test_an_unknown_fidelity_set_on_the_command_line_names_the_override(write_config, capsys, item):
    """Fidelity names are checked against the data after the config validates: the error still names the
    `--set` that gave the name, not the config file (which does not hold it)."""
    line = fails(["train", write_config("ok.yaml"), "--set", item, "--dry-run"], capsys, f"--set {item}: ")
    assert "unknown fidelity 'XX'" in line and "ok.yaml" not in line


def test_an_override_of_another_part_of_a_key_is_not_blamed_for_the_files_error(write_config, capsys):
    """The file names fidelity YY in train.fidelity_sampling; --set train.fidelity_sampling.lo=1 sets another
    entry: the error names the file, not the override."""
    path = write_config("ok.yaml", train={"epochs": 1, "fidelity_sampling": {"YY": 1}})
    line = fails(["train", path, "--set", "train.fidelity_sampling.lo=1", "--dry-run"], capsys, f"{path}: ")
    assert "unknown fidelity 'YY'" in line and "--set" not in line


def test_console_script_exit_code_and_single_line(tmp_path):
    """The installed entry point, as a user runs it."""
    exe = Path(sys.executable).parent / "multifi"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "multifi.cli.main"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        cmd + ["data", "info", str(tmp_path / "missing.xyz")], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"multifi: error: {tmp_path / 'missing.xyz'}: no such file"


def test_metrics_table_counts_energy_labels_by_name():
    """A forces-only fidelity has no energy labels: its row says so in a column named for what it counts."""
    from multifi.cli.format import metrics_table

    table = metrics_table({"F-only": {"n": 0, "energy_mae_meV": None, "forces_mae_meV_per_A": 12.34}})
    header, row = table.splitlines()
    assert "n energies" in header and "F MAE meV/Å" in header
    assert row.split()[:2] == ["F-only", "0"] and "12.3" in row
    assert "n forces" not in header  # no count of forces: nothing to tell apart from the energies
    both = {"n": 8, "n_forces": 4, "energy_mae_meV": 1.0, "forces_mae_meV_per_A": 2.0}
    header, row = metrics_table({"lo": both, "hi": {**both, "n_forces": 8}}).splitlines()[:2]
    assert "n forces" in header and row.split()[:2] == ["lo", "8"] and row.split()[6] == "4"  # forces on 4 of 8


def test_data_info_runs_the_unit_checks(tmp_path, capsys, caplog):
    from conftest import tiny_frames

    frames = tiny_frames()
    for a in frames:
        a.calc.results["energy"] = (a.calc.results["energy"] - 10.0 * len(a)) / 27.211386  # Hartree (negative)
    ase.io.write(tmp_path / "ha.extxyz", frames, format="extxyz")
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["data", "info", tmp_path / "ha.extxyz"], capsys)[0] == 0
    assert "energies at fidelity 'lo' look like Hartree" in caplog.text


def test_data_units_known_skips_the_unit_guesses_for_those_fidelities(write_config, tmp_path, capsys, caplog):
    """Energies that look like Hartree to the checks (here: made so) but are known to be eV (EMT's energies
    relative to the bulk, formation energies): data.units_known silences the guesses for those fidelities in
    training (and so in the run's record and model card) and in `data info --config`, not for the others; a name
    the data lacks is an error."""
    from conftest import tiny_frames

    frames = tiny_frames()
    for a in frames:
        a.calc.results["energy"] = (a.calc.results["energy"] - 10.0 * len(a)) / 27.211386
    ase.io.write(tmp_path / "ha.extxyz", frames, format="extxyz")
    for known, said in (([], {"lo", "hi"}), (["lo"], {"hi"}), (["lo", "hi"], set())):
        config = write_config(data={"sources": [{"path": str(tmp_path / "ha.extxyz")}], "units_known": known})
        for argv in (["train", config, "--dry-run"], ["data", "info", "--config", config]):
            caplog.clear()
            with caplog.at_level("WARNING", logger="multifi"):
                assert run(argv, capsys)[0] == 0
            warned = {n for n in ("lo", "hi") if f"energies at fidelity '{n}' look like Hartree" in caplog.text}
            assert warned == said, (argv, known, caplog.text)
    config = write_config(data={"sources": [{"path": str(tmp_path / "ha.extxyz")}], "units_known": ["HI"]})
    fails(["train", config, "--dry-run"], capsys, "data.units_known", "'HI'")
    fails(["data", "info", "--config", config], capsys, "data.units_known", "'HI'")
    assert run(["data", "info", "--config", config], capsys)[1] == ""  # the error comes before any table


def test_training_records_shortest_contacts_and_close_atoms_warn(cli_run, caplog, tmp_path):
    """The run records the shortest distance of each element pair in its training structures; the calculator
    and predict warn (once per pair) when atoms come far closer than that, and stay silent otherwise."""
    from multifi.calculator import Calculator
    from multifi.models.registry import load_potential
    from multifi.predict import predict_atoms

    _, run_dir = cli_run
    pot = load_potential(run_dir / "model.pt")
    contact = pot.head.contact.numpy()
    assert 0.8 < contact[1, 6] < 1.2 and contact[1, 6] == contact[6, 1] and contact[6, 6] > contact[1, 6]
    assert contact[1, 29] == 0  # Cu: never in training
    assert pot.spec["stress_labels"] == {"lo": 0, "hi": 0}  # molecules: no stress labels at either fidelity
    water = rattled_molecule("H2O", 3)
    squeezed = water.copy()
    squeezed.positions[1] = squeezed.positions[0] + 0.4 * (squeezed.positions[1] - squeezed.positions[0])
    with caplog.at_level("WARNING", logger="multifi"):
        predict_atoms(pot, [water], "hi")
        assert not caplog.records
        calc = Calculator(pot, fidelity="hi")
        for _ in range(2):
            squeezed.calc = calc
            squeezed.rattle(0.001)
            squeezed.get_potential_energy()
    messages = [r.getMessage() for r in caplog.records if "far closer" in r.getMessage()]
    assert len(messages) == 1 and re.search(r"\(0-based\) 0\.[34]\d Å apart, far closer than any H–O pair", messages[0])
    assert re.match(r"atoms [01] \([OH]\) and [01] \([OH]\) \(0-based\)", messages[0]), messages[0]  # not "structure 0"
    # several close pairs, each over many edges: one message per element pair
    caplog.clear()
    crushed = water.copy()
    crushed.positions[1:] = crushed.positions[0] + 0.3 * (crushed.positions[1:] - crushed.positions[0])
    with caplog.at_level("WARNING", logger="multifi"):
        predict_atoms(pot, [water, crushed, crushed], "hi")
    messages = sorted(r.getMessage() for r in caplog.records if "far closer" in r.getMessage())
    assert len(messages) == 2, messages
    assert all(m.startswith("structure 1: atoms ") for m in messages), messages
    assert "any H–H pair" in messages[0] + messages[1] and "any H–O pair" in messages[0] + messages[1]
    assert any(re.match(r"structure 1: atoms [12] \(H\) and [12] \(H\)", m) for m in messages), messages
    # `multifi predict` at two fidelities: each geometry warning once, not once per fidelity
    caplog.clear()
    src, out = tmp_path / "crushed.xyz", tmp_path / "crushed_pred.extxyz"
    ase.io.write(src, [water, crushed])
    with caplog.at_level("WARNING", logger="multifi"):
        assert main(["predict", str(run_dir), str(src), "--fidelity", "hi", "--fidelity", "lo", "--out", str(out)]) == 0
    messages = [r.getMessage() for r in caplog.records if "far closer" in r.getMessage()]
    assert len(messages) == 2, messages
    # stretched bonds (×2) and an atom pulled out of reach: no warning before (σ even fell), now one per element
    reach = pot.head.reach.numpy()
    assert 0.9 < reach[1] < 1.6 and reach[6] > 0 and reach[29] == 0
    caplog.clear()
    stretched = water.copy()
    stretched.positions *= 2.0
    alone = water.copy()
    alone.positions[2] += [20.0, 0.0, 0.0]
    with caplog.at_level("WARNING", logger="multifi"):
        predict_atoms(pot, [water], "hi")
        assert not caplog.records
        predict_atoms(pot, [water, stretched, alone], "hi")
    far = [r.getMessage() for r in caplog.records if "farther than any" in r.getMessage()]
    assert len(far) == 2 and any(m.startswith("structure 1: atom ") and "(O)" in m for m in far), far
    assert any(m.startswith("structure 2: atom 2 (H) (0-based) has no neighbour within the cutoff") for m in far), far
    # an atom close to its own periodic image read "atoms 0 (H) and 0 (H)": the image is named
    caplog.clear()
    lone = ase.Atoms("H", positions=[[0, 0, 0]], cell=np.diag([0.6, 8.0, 8.0]), pbc=True)
    with caplog.at_level("WARNING", logger="multifi"):
        predict_atoms(pot, [lone], "hi")
    (message,) = [r.getMessage() for r in caplog.records if "far closer" in r.getMessage()]
    assert message.startswith("atoms 0 (H) and a periodic image of 0 (H) (0-based) 0.60 Å apart"), message
    # select flags by the same rule: exactly the structures predict warned about
    from multifi.select import outside_training_geometry, read_pool

    ase.io.write(tmp_path / "pool.extxyz", [water, crushed, stretched, alone, lone], format="extxyz")
    flags = outside_training_geometry(pot, read_pool(str(tmp_path / "pool.extxyz")))
    assert flags.tolist() == [False, True, True, True, True]
    # a pair of known elements that never came within the cutoff in training (Si–Cu in a model of silicon and
    # of copper): its interaction is not learned at any distance; warned about and flagged, not silent
    caplog.clear()
    pot.head.contact[1, 8] = pot.head.contact[8, 1] = 0.0
    with caplog.at_level("WARNING", logger="multifi"):
        predict_atoms(pot, [water], "hi")
    (message,) = [r.getMessage() for r in caplog.records if "came within the cutoff" in r.getMessage()]
    assert re.search(r"Å apart, and no [HO]–[HO] pair came within the cutoff \(\d", message), message
    assert outside_training_geometry(pot, read_pool(str(tmp_path / "pool.extxyz")))[0]


def test_first_of_each_and_the_shortest_contact_is_named(cli_run, caplog):
    """The per-pair reduction behind the contact warning, and its message: the pair's shortest distance."""
    from multifi.models.elements import _first_of_each
    from multifi.models.registry import load_potential
    from multifi.predict import predict_atoms

    values, first = _first_of_each(torch.tensor([264, 2056, 264, 257, 257, 264]))
    assert values.tolist() == [257, 264, 2056] and first.tolist() == [3, 0, 1]
    pot = load_potential(cli_run[1] / "model.pt")
    water = rattled_molecule("H2O", 3)
    for k, f in ((1, 0.45), (2, 0.3)):  # two close H–O pairs: the message gives the shorter one
        water.positions[k] = water.positions[0] + f * (water.positions[k] - water.positions[0])
    d = min(water.get_distance(0, 1), water.get_distance(0, 2))
    with caplog.at_level("WARNING", logger="multifi"):
        predict_atoms(pot, [water], "hi")
    message = next(r.getMessage() for r in caplog.records if "H–O pair" in r.getMessage())
    assert f"(0-based) {d:.2f} Å apart" in message and re.search(r"atoms [02] \([OH]\) and [02]", message), message


def test_data_info_names_references_the_labels_leave_open(tmp_path, capsys, caplog):
    """Ga and As only as GaAs at one fidelity (any proportions at the other): data info says so, as training does."""
    frames = []
    for i, formula in enumerate(["GaAs", "Ga2As", "GaAs2", "GaAs", "Ga2As", "GaAs2", "GaAs", "GaAs"] * 2):
        n = len(Atoms(formula))
        a = Atoms(formula, positions=[[2.5 * k, 0.1 * i, 0] for k in range(n)], cell=[9, 9, 9], pbc=True)
        fid = "R2" if i >= 8 and formula == "GaAs" else "PBE"
        if fid == "R2":
            a.positions[1, 0] += 0.05 * i  # another GaAs geometry
        a.info.update(fidelity=fid, energy=-3.0 * formula.count("Ga") - 4.0 * (n - formula.count("Ga")) + 0.01 * i)
        frames.append(a)
    ase.io.write(tmp_path / "gaas.extxyz", frames, format="extxyz")
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["data", "info", tmp_path / "gaas.extxyz"], capsys)[0] == 0
    assert "R2: the labels of these files contain Ga, As only in fixed proportions" in caplog.text
    assert "PBE: the labels of these files contain" not in caplog.text


@pytest.mark.parametrize(
    "item, said",
    [
        ("data.fidelities=[]", "data.fidelities: empty, so it selects no labels"),
        ("data.sources=[]", "data.sources: empty"),
        ("data.split.files.train={empty}", "empty.txt holds 0 structure(s) and no label"),
        ("data.train_limits={{lo: 0, hi: 0}}", "data.train_limits: the limits leave no training label"),
    ],
)
def test_an_empty_selection_is_named_not_blamed_on_the_loss_weights(write_config, tmp_path, capsys, item, said):
    """Before: "loss.fidelity_weights: every fidelity has weight 0", or a numpy traceback for an empty split file."""
    (tmp_path / "empty.txt").write_text("")
    item = item.format(empty=tmp_path / "empty.txt")
    line = fails(["train", write_config("ok.yaml"), "--set", item, "--dry-run"], capsys, f"--set {item}: ", said)
    assert "fidelity_weights" not in line


def test_the_model_card_shows_the_settings_its_backbone_reads(cli_run, tmp_path, capsys):
    from multifi.card import model_card

    _, run_dir = cli_run
    painn = model_card(run_dir / "model.pt")["model"]
    assert (
        painn["backbone"] == "painn" and "cutoff" in painn and not {"max_l", "max_n", "threebody_cutoff"} & set(painn)
    )
    code, out, _ = run(["info", run_dir / "model.pt"], capsys)
    assert code == 0 and "max_l" not in out and "features:" in out
    m3gnet = build_potential({**TINY_MODEL, "backbone": "m3gnet"}, ["PBE"])
    solids = model_card(save_potential(m3gnet, tmp_path / "m3gnet.pt"))["model"]
    assert {"max_l", "max_n", "threebody_cutoff"} <= set(solids)


def test_the_model_card_of_a_checkpoint_has_its_runs_split_counts(cli_run):
    """`multifi info RUN/checkpoints/best.ckpt` showed train counts only (a checkpoint records none): the val and
    test columns come from the run's metrics.json, as for model.pt from its own record."""
    from multifi.card import model_card

    _, run_dir = cli_run
    from_model = model_card(run_dir / "model.pt")["data"]
    from_ckpt = model_card(run_dir / "checkpoints" / "best.ckpt")["data"]
    assert set(from_ckpt) == {"train", "val", "test"}
    assert from_ckpt["train"] == from_model["train"]
    for split in ("val", "test"):  # evaluated structures (those with every element seen) ≤ the split's labels
        assert set(from_ckpt[split]) <= set(from_model[split])
        assert all(0 < n <= from_model[split][f] for f, n in from_ckpt[split].items())


def test_info_says_when_the_models_labels_looked_like_another_unit(cli_run, tmp_path, capsys):
    """A model trained on labels the unit and sign checks doubted (metrics.json doubtful_units; Hartree read as eV)
    predicts them as given: `multifi info` says so, which it did not; a malformed record is left out."""
    import shutil

    _, run_dir = cli_run
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    code, out, _ = run(["info", run_copy], capsys)
    assert code == 0 and "failed the unit and sign checks" not in out
    payload = json.loads((run_copy / "metrics.json").read_text())
    (run_copy / "metrics.json").write_text(json.dumps({**payload, "doubtful_units": {"energy": ["hi"]}}))
    code, out, _ = run(["info", run_copy], capsys)
    assert code == 0 and "warning: its energy labels at hi failed the unit and sign checks" in out
    for odd in ({"energy": [1]}, {"energy": None}, {"energy": "hi"}, ["energy"]):  # not as training writes it
        (run_copy / "metrics.json").write_text(json.dumps({**payload, "doubtful_units": odd}))
        code, out, _ = run(["info", run_copy], capsys)
        assert code == 0 and "failed the unit" not in out


def test_an_implausible_error_from_estimated_references_does_not_blame_the_labels(caplog):
    """Every structure with an element whose reference was estimated (no labels of it at that fidelity): 6616
    meV/atom, and the hint asked whether the labels were in eV. It names the estimated references now."""
    import logging

    from multifi.evaluation import warn_implausible_errors

    estimated = {"n": 1, "energy_mae_meV_per_atom": 6616.0, "n_estimated_references": 1, "fitted_references": {"n": 0}}
    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_implausible_errors({"HF/3-21G": estimated}, "hf_F.extxyz")
    assert "the estimated per-element references (warned above) are a likely cause" in caplog.text
    assert "in eV" not in caplog.text
    caplog.clear()
    labels = {"n": 9, "energy_mae_meV_per_atom": 5000.0}
    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_implausible_errors({"HF/3-21G": labels}, "hf.extxyz")
    assert "are these labels at HF/3-21G, in eV" in caplog.text


def test_test_errors_of_labels_in_a_doubtful_unit_carry_a_reminder(write_config, tmp_path, capsys):
    """Hartree labels trained after one warning at the start, and the test table then showed mHa as meV: the run
    records which labels the unit checks doubted, and the table is followed by a reminder."""
    from conftest import tiny_frames

    frames = tiny_frames()
    for a in frames:
        a.calc.results["energy"] = (a.calc.results["energy"] - 10.0 * len(a)) / 27.211386  # Hartree (negative)
    ase.io.write(tmp_path / "ha.extxyz", frames, format="extxyz")
    config = write_config(data={"sources": [{"path": str(tmp_path / "ha.extxyz")}]}, train={"max_steps": 2})
    code, out, _ = run(["train", config], capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["doubtful_units"]["energy"] == ["lo", "hi"]  # hi: a few labels, judged too
    assert "note: these labels looked like another unit when read (energy at lo, hi;" in out


def test_outputs_are_not_replaced_without_force(cli_run, tiny_extxyz, tmp_path, capsys):
    """predict/evaluate/select keep an existing output unless --force; the check comes before any work. Streams
    are always written to."""
    _, run_dir = cli_run
    model = run_dir / "model.pt"
    src = tmp_path / "in.extxyz"
    ase.io.write(src, ase.io.read(tiny_extxyz, ":4"), format="extxyz")
    earlier = tmp_path / "earlier.extxyz"  # another run's predictions
    earlier.write_text("kept\n")
    predict = ["predict", model, src, "--fidelity", "hi", "--out"]
    fails([*predict, earlier], capsys, f"{earlier}: exists; not replaced (--force replaces it)")
    report = tmp_path / "m.json"
    report.write_text("{}")
    fails(["evaluate", model, src, "--out", report], capsys, f"{report}: exists; not replaced")
    plot = tmp_path / "parity.png"
    picks = tmp_path / "picks.txt"
    picks.write_text("a\n")
    select = ["select", model, src, "--fidelity", "hi", "--n", "1", "--strategy", "random", "--out", picks]
    fails(select, capsys, f"{picks}: exists; not replaced")
    assert earlier.read_text() == "kept\n" and report.read_text() == "{}"
    assert picks.read_text() == "a\n"
    assert run([*predict, earlier, "--force"], capsys)[0] == 0 and len(ase.io.read(earlier, ":")) == 4
    assert run(["evaluate", model, src, "--out", report, "--force"], capsys)[0] == 0
    assert "fidelities" in report.read_text()
    assert run([*select, "--force"], capsys)[0] == 0 and picks.read_text() != "a\n"
    from multifi.cli.args import refuse_existing

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refuse_existing("/dev/stdout", fifo, "", None, force=False)  # streams: written to; unset: nothing to check
    folder = tmp_path / "out.extxyz"
    folder.mkdir()
    fails([*predict, folder, "--force"], capsys, f"{folder}: is a folder, expected a file name")
    slash = f"{tmp_path / 'ev_dir'}/"  # not there yet: it was written as a file named ev_dir
    fails(["evaluate", model, src, "--out", slash], capsys, f"{slash}: names a folder (trailing '/')")
    assert not (tmp_path / "ev_dir").exists()
    plot.write_bytes(b"x")  # a plot replaces an existing file only with --force, as every output (another image)
    fails(["evaluate", model, src, "--plot", plot], capsys, f"{plot}: exists; not replaced (--force replaces it)")
    assert plot.read_bytes() == b"x"
    assert run(["evaluate", model, src, "--plot", plot, "--force"], capsys)[0] == 0 and plot.read_bytes() != b"x"
    inside = src / "parity.png"  # a plot inside the data file: refused before the metrics are written
    metrics = tmp_path / "fresh.json"
    fails(["evaluate", model, src, "--out", metrics, "--plot", inside], capsys, f"{src}: exists and is not a folder")
    assert not metrics.exists()


def test_errors_that_are_one_energy_per_element_are_said_to_be_another_convention(caplog, tmp_path):
    """Labels of another method or reference convention under the model's fidelity name (an extension's new
    method read as an old one, atomization energies for total ones) gave a large MAE without a hint: errors that
    an energy per element explains are warned about; a model's ordinary errors, or too few structures to tell,
    are not."""
    import logging

    from conftest import tiny_frames

    from multifi.data.readers.ase_files import read_ase
    from multifi.data.split import labelled_pairs
    from multifi.evaluation import warn_per_element_errors

    ase.io.write(tmp_path / "tiny.extxyz", tiny_frames(80))
    ds = read_ase(tmp_path / "tiny.extxyz")
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    pairs = pairs[pairs[:, 1] == ds.fidelities.index("lo")]
    labels = ds.energy[pairs[:, 0], pairs[:, 1]]
    n = ds.n_atoms[pairs[:, 0]]
    rng = np.random.default_rng(0)
    model_error = rng.normal(0, 0.04, len(pairs)) * n  # 40 meV/atom, no pattern
    shift = {1: 0.3, 6: -0.8, 7: 0.5, 8: 0.2}
    per_element = np.array(
        [sum(shift[int(z)] for z in ds.numbers[ds.offsets[s] : ds.offsets[s + 1]]) for s in pairs[:, 0]]
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert warn_per_element_errors(ds, pairs, labels + model_error, "a.extxyz") == []
        assert warn_per_element_errors(ds, pairs, labels + model_error + per_element, "b.extxyz") == ["lo"]
        assert warn_per_element_errors(ds, pairs[:20], labels[:20] + per_element[:20], "c.extxyz") == []
        before = 1000 * np.mean(np.abs(model_error + per_element) / n)  # meV/atom
        # the model's own test error as large (an undertrained model: its errors follow the elements there too)
        assert (
            warn_per_element_errors(ds, pairs, labels + model_error + per_element, "d.extxyz", as_tested={"lo": before})
            == []
        )
        assert warn_per_element_errors(
            ds, pairs, labels + model_error + per_element, "e.extxyz", as_tested={"lo": 40.0}
        ) == ["lo"]
    assert "b.extxyz: lo energy errors are mostly one energy per element" in caplog.text
    assert "a.extxyz" not in caplog.text and "c.extxyz" not in caplog.text and "d.extxyz" not in caplog.text
    assert "e.extxyz: lo energy errors" in caplog.text


def test_evaluating_a_file_of_the_models_own_results_is_said_to_measure_nothing(cli_run, tmp_path, capsys, caplog):
    """An MD trajectory written as extxyz with multifi.Calculator keeps no calculator name: read as labels, evaluate
    scored the model against itself (0.000) without a word."""
    import logging

    import multifi

    _, run_dir = cli_run
    calc = multifi.Calculator(run_dir / "model.pt", fidelity="hi")
    for seed in range(4):  # each frame written once computed, as an MD run's writer does
        atoms = rattled_molecule("CH3OH", seed)
        atoms.calc = calc
        atoms.get_forces()
        atoms.info["fidelity"] = "hi"
        ase.io.write(tmp_path / "md.extxyz", atoms, append=True)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, _ = run(["evaluate", run_dir, tmp_path / "md.extxyz"], capsys)
    assert code == 0 and "every hi energy label equals this model's prediction" in caplog.text
    frames = ase.io.read(tmp_path / "md.extxyz", ":")
    frames[0].calc.results["energy"] += 0.01  # one reference label among them: they are labels
    ase.io.write(tmp_path / "mixed.extxyz", frames)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, _ = run(["evaluate", run_dir, tmp_path / "mixed.extxyz"], capsys)
    assert code == 0 and "equals this model's prediction" not in caplog.text


@pytest.mark.parametrize("name", ["back.extxyz", "back.xyz.gz"])
def test_data_convert_to_extxyz_round_trips_every_label(tmp_path, capsys, name):
    """`data convert --out back.extxyz` wrote a folder of .npy files under that name: it writes extxyz now, one
    frame per (structure, fidelity) label, which reads back as the same structures and labels (stress included)."""
    from ase.build import bulk
    from conftest import emt_labelled

    from multifi.data.sources import read_sources

    frames = []
    for i in range(6):
        a = bulk("Cu", "fcc", 3.6, cubic=True)
        a.rattle(0.05, seed=i)
        frames.append(emt_labelled(a, "lo"))
        b = emt_labelled(a, "hi", 1.1, 0.2)
        b.calc.results["stress"] = np.array([0.01, 0.02, 0.03, 0.0, 0.001, -0.002]) * (1 + i)
        frames.append(b)
    src = tmp_path / "src.extxyz"
    ase.io.write(src, frames)
    npz = tmp_path / "src.npz"
    assert run(["data", "convert", src, "--out", npz], capsys)[0] == 0
    out = tmp_path / name
    code, stdout, _ = run(["data", "convert", npz, "--out", out], capsys)
    assert code == 0 and out.is_file() and "as 12 frames" in stdout
    a, b = read_sources([str(npz)]), read_sources([str(out)])
    assert a.keys.tolist() == b.keys.tolist() and a.fidelities.names == b.fidelities.names
    np.testing.assert_array_equal(a.energy, b.energy)
    np.testing.assert_array_equal(a.forces, b.forces)
    np.testing.assert_allclose(b.stress, a.stress, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a.stress_mask, b.stress_mask)
    np.testing.assert_array_equal(a.positions, b.positions)


def test_parity_plot_energies_are_relative_to_the_models_element_references(
    cli_run, tiny_extxyz, tmp_path, monkeypatch
):
    """The parity plot showed total energies per atom (hundreds of eV/atom for DFT data: a perfect line whatever
    the error); evaluate --plot now draws them less the model's per-element reference energies."""
    import multifi.plots
    from multifi.data.readers.ase_files import read_ase
    from multifi.models.registry import load_potential
    from multifi.predict import predict_atoms

    _, run_dir = cli_run
    drawn = {}
    monkeypatch.setattr(
        multifi.plots,
        "parity_plot",
        lambda path, names, ref, pred, *a, **k: drawn.update(names=names, ref=ref, pred=pred, **k),
    )
    assert (
        main(["evaluate", str(run_dir), str(tiny_extxyz), "--fidelity", "hi", "--plot", str(tmp_path / "p.png")]) == 0
    )
    assert drawn["relative"] is True
    pot = load_potential(run_dir / "model.pt")
    ds = read_ase(tiny_extxyz)
    k = ds.fidelities.index("hi")
    s = np.flatnonzero(ds.energy_mask[:, k])
    col = pot.fidelities.index("hi")
    ref = pot.head.ref.double().numpy()[:, col]
    base = np.array([ref[ds.numbers[ds.offsets[i] : ds.offsets[i + 1]]].sum() for i in s])
    n = ds.n_atoms[s]
    np.testing.assert_allclose(drawn["ref"], (ds.energy[s, k] - base) / n, atol=1e-9)
    predicted, _, _ = predict_atoms(pot, [ds.to_atoms(int(i)) for i in s], "hi")
    np.testing.assert_allclose(drawn["pred"], (np.asarray(predicted) - base) / n, atol=1e-5)


def test_data_convert_to_extxyz_refuses_keys_ase_reads_as_numbers(tmp_path, capsys):
    """Keys 000123 or T came back from extxyz as 123 and True (two keys 1 and 01 became one structure with
    conflicting labels): an error naming the key, before anything is written."""
    from ase.build import molecule
    from conftest import emt_labelled

    from multifi.data.dataset import FidelityDataset

    frames = []
    for key in ("a1", "000123"):
        m = emt_labelled(molecule("H2O"), "lo")
        m.info["key"] = key
        frames.append(m)
    npz = tmp_path / "d.npz"
    FidelityDataset.from_records(
        [
            {"numbers": a.numbers, "positions": a.positions, "key": a.info["key"], "labels": {"lo": {"energy": 1.0}}}
            for a in frames
        ]
    ).save(npz)
    out = tmp_path / "d.extxyz"
    fails(["data", "convert", npz, "--out", out], capsys, "key '000123' would be read back from extxyz as 123")
    assert not out.exists()


def test_a_partly_recorded_contact_table_flags_no_pair_of_an_element_without_neighbours(cli_run):
    """0 in the contact table is 'unknown' for an element whose neighbours were never recorded (a model from
    before contacts were recorded, extended on data without it): its pairs are not 'never seen in training'."""
    from multifi.models.elements import outside_geometry
    from multifi.models.registry import load_potential

    _, run_dir = cli_run
    pot = load_potential(run_dir / "model.pt")
    pot.head.contact.zero_()
    pot.head.contact[1, 1] = 0.7  # only H–H recorded
    water = rattled_molecule("H2O", 3)
    i, j = np.nonzero(~np.eye(3, dtype=bool))
    d = np.linalg.norm(water.positions[j] - water.positions[i], axis=1)
    close, _, _ = outside_geometry(
        pot, torch.as_tensor(water.numbers), torch.as_tensor(i), torch.as_tensor(j), torch.as_tensor(d)
    )
    assert not close.any()
    pot.head.contact[8, 6] = pot.head.contact[6, 8] = 1.2  # O has neighbours in training, never H: O–H never seen
    close, _, _ = outside_geometry(
        pot, torch.as_tensor(water.numbers), torch.as_tensor(i), torch.as_tensor(j), torch.as_tensor(d)
    )
    pairs = {
        tuple(sorted((int(water.numbers[a]), int(water.numbers[b])))) for a, b, c in zip(i, j, close.tolist()) if c
    }
    assert pairs == {(1, 8)}


def test_data_with_a_runs_config_reads_matpes_stress_as_the_run_did(tmp_path, capsys):
    """`data convert --config RUN/config.yaml` of a run made before sources had a stress_order reads MatPES stresses
    in VASP's order, as that run trained on them; the same settings in a config of one's own read MatPES's order."""
    from test_reader_matpes import record, write_jsonl

    from multifi.data.dataset import FidelityDataset
    from multifi.data.readers.matpes import vasp_stress_to_ase

    stress = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    write_jsonl(tmp_path / "pbe.jsonl", [record(f"m{i}", stress=stress) for i in range(3)])
    raw = {"data": {"sources": [{"path": str(tmp_path / "pbe.jsonl")}], "split": {"val": 0.0, "test": 0.0}}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))  # no stress_order, no split order: an earlier run's
    (run_dir / "splits.json").write_text(json.dumps({"train": ["matpes:m0", "matpes:m1", "matpes:m2"]}))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw))
    for config, order in ((run_dir / "config.yaml", "vasp"), (tmp_path / "mine.yaml", "voigt")):
        out = tmp_path / f"{order}.npz"
        code, _, err = run(["data", "convert", "--config", config, "--out", out], capsys)
        assert code == 0, err
        got = FidelityDataset.load(out).stress[0, 0]
        np.testing.assert_allclose(got, vasp_stress_to_ase(np.array(stress), order=order))


def test_evaluate_says_when_the_run_read_a_matpes_files_stress_in_another_order(write_config, tmp_path, capsys, caplog):
    """A model trained on a MatPES file read with stress_order: vasp, evaluated on that file in MatPES's own order
    (the default): the shear stresses are compared in another order than they were trained, and evaluate says so;
    with --stress-order vasp it does not."""
    import logging

    from test_reader_matpes import record, write_jsonl

    records = []
    for i in range(12):
        r = record(f"m{i}", stress=[10.0 + i, 20, 30, 40, 50, 60 - i], energy=-6.5 - 0.01 * i)
        r["structure"]["lattice"]["matrix"] = (np.array(r["structure"]["lattice"]["matrix"]) * (1 + 0.01 * i)).tolist()
        for s in r["structure"]["sites"]:
            s["xyz"] = (np.array(s["abc"]) @ np.array(r["structure"]["lattice"]["matrix"])).tolist()
        records.append(r)
    data = write_jsonl(tmp_path / "pbe.jsonl", records)
    config = write_config(
        data={"sources": [{"path": str(data), "stress_order": "vasp"}], "split": {"val": 0.2, "test": 0.2}},
        train={"epochs": 1, "batch_size": 4, "progress": False, "threads": 1, "warmup_steps": 0},
    )
    assert run(["train", config], capsys)[0] == 0
    model = tmp_path / "run" / "model.pt"
    for extra, warned in (([], True), (["--stress-order", "vasp"], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            code, _, err = run(["evaluate", model, data, *extra], capsys)
        assert code == 0, err
        said = [r.getMessage() for r in caplog.records if "read this file's stresses in vasp order" in r.getMessage()]
        assert len(said) == int(warned), caplog.text
        if warned:
            assert "give --stress-order vasp" in said[0]
    # another MatPES file (a part of it, say) read in the default order, while the run read its MatPES sources in
    # VASP's: evaluate and predict say so (predict keeps the labels as ref_stress), unless an order is given
    import shutil

    import ase.io

    from multifi.data.readers.matpes import read_matpes
    from multifi.predict import label_results

    part = shutil.copy(data, tmp_path / "part.jsonl")
    out = tmp_path / "p.extxyz"
    for extra, warned in (([], True), (["--stress-order", "vasp"], False), (["--stress-order", "voigt"], False)):
        for command in (
            ["evaluate", model, part],
            ["predict", model, part, "--fidelity", "PBE", "--out", out, "--force"],
        ):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="multifi"):
                code, _, err = run([*command, *extra], capsys)
            assert code == 0, err
            said = [r.getMessage() for r in caplog.records if "read in MatPES's own stress order" in r.getMessage()]
            assert len(said) == int(warned), caplog.text
            if warned:
                assert "pbe.jsonl) in VASP's" in said[0] and "give --stress-order vasp" in said[0]
        ds = read_matpes(part, stress_order=(extra or ["", "voigt"])[1])  # the reference stresses as read
        written = np.array([a.info["ref_stress"] for a in ase.io.read(out, ":")])
        assert np.allclose(written, [label_results(ds, i, 0)["stress"] for i in range(len(ds))], atol=1e-12)
    shear = [label_results(read_matpes(part, stress_order=o), 0, 0)["stress"][3:] for o in ("voigt", "vasp")]
    assert not np.allclose(*shear)  # the two orders differ for these records
    # a MatPES file without stress labels has no order to mix up: nothing said
    unstressed = write_jsonl(tmp_path / "no_stress.jsonl", [dict(r, stress=None) for r in records[:4]])
    for command in (
        ["evaluate", model, unstressed],
        ["predict", model, unstressed, "--fidelity", "PBE", "--out", out, "--force"],
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multifi"):
            code, _, err = run(command, capsys)
        assert code == 0, err
        assert "stress order" not in caplog.text, caplog.text
    argv = ["predict", model, out, "--fidelity", "PBE", "--out", tmp_path / "q.extxyz", "--stress-order", "vasp"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "p.extxyz: --stress-order applies to MatPES records, not to this file" in err


def test_the_dry_run_plans_the_steps_of_several_processes(write_config, caplog):
    """With train.devices 2 each process takes half the samples in batches of train.batch_size: the plan and the
    warm-up warning counted as for one process (twice the steps the run took)."""
    import logging
    import math

    config = write_config(train={"epochs": 2, "batch_size": 8, "devices": 2, "warmup_steps": 100, "threads": 1})
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert main(["train", str(config), "--dry-run"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training: "))
    n = int(line.split()[1])
    per_epoch = math.ceil(math.ceil(n / 2) / 8)  # each process: its half, in batches of 8
    assert (
        f"batch 8 in each of 2 processes: {per_epoch} steps per epoch, 2 epochs, at most {2 * per_epoch} steps" in line
    )
    assert f"longer than the run ({2 * per_epoch} steps)" in caplog.text
