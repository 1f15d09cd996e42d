"""Atomic energies as reference energies (data.atomic_energies, MACE's E0s): references = atomic energy + the
fidelity's mean binding energy per atom; an element given an atomic energy without labels at a fidelity is known
there, not estimated; one-atom frames as the source; clear errors for what cannot work."""

from __future__ import annotations

import json
import logging

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from conftest import emt_labelled, tiny_frames

from multifi.card import format_card, model_card
from multifi.cli.main import main
from multifi.data.checks import isolated_atoms
from multifi.data.dataset import FidelityDataset
from multifi.data.split import labelled_pairs
from multifi.data.stats import N_ELEMENTS, fit_references
from multifi.models.registry import build_potential, load_potential
from multifi.predict import predict_atoms
from multifi.train.extension_data import load_old_run
from multifi.uncertainty import weights_fingerprint

E0 = {  # eV per free atom: two methods that differ in their atoms far more than in their bonds
    "lo": {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0, 9: -2700.0},
    "hi": {1: -13.0, 6: -1025.0, 7: -1470.0, 8: -2050.0, 9: -2690.0},
}
BIND = {1: -1.0, 6: -4.0, 7: -3.0, 8: -2.5, 9: -1.5}  # eV per atom of each element in a bond, shared by both


def molecules_without_f_at_hi(n: int = 120) -> FidelityDataset:
    """Random H/C/N/O/F compositions: E = Σ E0[f] + binding (binding at 'hi' 1.05× that at 'lo'); 'hi' labels only
    on every second structure without F."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        numbers = rng.choice(sorted(BIND), size=rng.integers(3, 10))
        bind = sum(BIND[int(z)] for z in numbers) + 0.05 * len(numbers) * rng.normal()
        labels = {"lo": {"energy": sum(E0["lo"][int(z)] for z in numbers) + bind}}
        if 9 not in numbers and i % 2 == 0:
            labels["hi"] = {"energy": sum(E0["hi"][int(z)] for z in numbers) + 1.05 * bind}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    return FidelityDataset.from_records(recs)


def table(ds: FidelityDataset) -> np.ndarray:
    out = np.full((N_ELEMENTS, len(ds.fidelities)), np.nan)
    for name, energies in E0.items():
        for z, e in energies.items():
            out[z, ds.fidelities.index(name)] = e
    return out


def test_references_are_atomic_energies_plus_the_least_squares_binding_shift():
    ds = molecules_without_f_at_hi()
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    refs = fit_references(ds, pairs, atomic=table(ds))
    for name in ("lo", "hi"):
        k = ds.fidelities.index(name)
        rows = pairs[(pairs[:, 1] == k), 0]
        n = ds.n_atoms[rows].astype(float)
        beyond = ds.energy[rows, k] - np.array(
            [sum(E0[name][int(z)] for z in ds.numbers[ds.atoms_slice(s)]) for s in rows]
        )
        mu = n @ beyond / (n @ n)  # one energy per atom, least squares on the totals
        assert refs.atomic_shift[k] == pytest.approx(mu, rel=1e-10)
        np.testing.assert_allclose(refs.ref[sorted(BIND), k], [E0[name][z] + mu for z in sorted(BIND)], rtol=1e-12)
        assert refs.fitted[sorted(BIND), k].all()
        resid = (beyond - n * mu) / n
        assert refs.scale[k] == pytest.approx(resid.std(), rel=1e-10)
    hi = ds.fidelities.index("hi")
    assert np.flatnonzero(refs.given[:, hi]).tolist() == [9] and not refs.given[:, ds.fidelities.index("lo")].any()
    assert refs.estimated(hi) == []  # F at 'hi' is known, not estimated
    # without atomic energies, F's 'hi' reference is an estimate off by the element's own bonding
    plain = fit_references(ds, pairs)
    assert not plain.fitted[9, hi] and plain.estimated(hi) == [9]


def test_an_element_without_an_atomic_energy_is_estimated_from_the_other_fidelities():
    ds = molecules_without_f_at_hi()
    atomic = table(ds)
    hi = ds.fidelities.index("hi")
    atomic[9, hi] = np.nan
    refs = fit_references(ds, labelled_pairs(ds, np.arange(len(ds))), atomic=atomic)
    assert refs.estimated(hi) == [9] and not refs.given[:, hi].any()
    assert np.isfinite(refs.ref[9, hi])


# ---------------------------------------------------------------------------------------------- training
def with_free_atoms(path, frames=None, elements=("H", "C", "N", "O"), fidelities=("lo", "hi")):
    """tiny_frames plus one free atom of each element per fidelity (EMT at 'lo', 1.1·EMT + 0.3 eV at 'hi')."""
    frames = list(tiny_frames() if frames is None else frames)
    for symbol in elements:
        atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        for name in fidelities:
            frames.append(emt_labelled(atom, name, *((1.1, 0.3) if name == "hi" else ())))
    ase.io.write(path, frames, format="extxyz")
    return frames[-len(elements) * len(fidelities) :]


def as_table(free) -> dict:
    """{fidelity: {symbol: eV}} of one-atom frames."""
    energies: dict = {}
    for a in free:
        energies.setdefault(a.info["fidelity"], {})[a.get_chemical_symbols()[0]] = float(a.get_potential_energy())
    return energies


def test_training_takes_the_one_atom_frames_as_atomic_energies(tmp_path, write_config, caplog):
    data = tmp_path / "with_atoms.extxyz"
    free = with_free_atoms(data)
    cfg = write_config(data={"sources": [{"path": str(data)}], "atomic_energies": "isolated"})
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert main(["train", str(cfg)]) == 0
    assert "one-atom frame label(s) taken as atomic energies" in caplog.text
    assert (
        "hi: no energy labels with N in the training labels; their hi references are their given atomic" in caplog.text
    )
    pot = load_potential(tmp_path / "run")
    head = pot.head
    assert head.atomic.all()
    for a in free:
        k, z = pot.fidelities.index(a.info["fidelity"]), int(a.numbers[0])
        assert float(head.ref[z, k] - head.atomic_shift[k]) == pytest.approx(a.get_potential_energy(), abs=1e-9)
    # N: no 'hi' training molecule holds it (tiny_frames' 'hi' molecules are the even ones), its free atom does
    hi = pot.fidelities.index("hi")
    assert torch.nonzero(head.given[:, hi]).flatten().tolist() == [7]
    card = format_card(model_card(tmp_path / "run"))
    assert "references: atomic energy + shift" in card and "given, no labels: N" in card
    for a in free:  # the atomic energies themselves, as given
        e = a.get_potential_energy()
        assert f"{a.get_chemical_symbols()[0]} {e:.4f}" in card.split(f"    {a.info['fidelity']}: ")[1].split("\n")[0]
    caplog.clear()
    nh3 = tiny_frames()[2]  # NH3
    predict_atoms(pot, [nh3], fidelity="hi")
    assert "given atomic energy" in caplog.text and "learnt at the other fidelities only" in caplog.text
    from multifi.deploy import deploy

    meta = deploy(tmp_path / "run" / "model.pt", "hi", tmp_path / "hi.pt")  # LAMMPS' file records them too
    assert meta["given_elements"] == ["N"] and meta["estimated_elements"] == []
    # the frames are references: not in any split's structure counts
    counts = {
        s: sum(v.values()) for s, v in model_card(tmp_path / "run")["data"].items() if s in ("train", "val", "test")
    }
    assert sum(counts.values()) == len(tiny_frames())
    caplog.clear()  # evaluated, the free atoms are left out (they are the references), as MACE's evaluation does
    from multifi.evaluation import evaluate_files

    with caplog.at_level(logging.WARNING, logger="multifi"):
        result = evaluate_files(tmp_path / "run" / "model.pt", [data], diagnose=False)
    assert "8 free atom(s) (one-atom frames) at fidelities whose references are atomic energies left out" in caplog.text
    fids = result.payload["fidelities"]
    assert {k: v["n"] for k, v in fids.items()} == {"lo": 40, "hi": 20}


def test_atomic_energies_from_a_table_match_the_same_frames(tmp_path, write_config, tiny_extxyz):
    data = tmp_path / "with_atoms.extxyz"
    energies = as_table(with_free_atoms(data))
    cfg = write_config(data={"sources": [{"path": str(tiny_extxyz)}], "atomic_energies": energies})
    assert main(["train", str(cfg)]) == 0
    head = load_potential(tmp_path / "run").head
    assert head.atomic.all() and head.given.any()


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"lo": {"H": -1.0, "C": -2.0, "O": -3.0}}, "lo's training labels contain N without an atomic energy"),
        ({"LO": {"H": -1.0}}, "no fidelity 'LO' in the data"),
        ({"lo": {"Xx": -1.0}}, "'Xx' is no element (a symbol, or an atomic number"),
        ({"lo": {"H": "3.21 eV"}}, "lo: H: '3.21 eV' is no energy in eV"),
        ({"lo": [1, 2]}, "lo: expected {element: eV, …}"),
    ],
)
def test_tables_that_cannot_work_are_refused(write_config, capsys, setting, message):
    assert main(["train", str(write_config(data={"atomic_energies": setting}))]) != 0
    assert message in capsys.readouterr().err


def test_a_trained_fidelity_without_atomic_energies_is_refused(tmp_path, write_config, capsys):
    data = tmp_path / "with_atoms.extxyz"
    with_free_atoms(data, fidelities=("lo",))
    assert main(["train", str(write_config(data={"sources": [{"path": str(data)}], "atomic_energies": "isolated"}))])
    err = capsys.readouterr().err
    assert "hi's training labels contain" in err and "no one-atom frame labelled there" in err


def test_disagreeing_one_atom_frames_are_refused(tmp_path, write_config, capsys):
    data = tmp_path / "with_atoms.extxyz"
    frames = tiny_frames()
    h, moved = Atoms("H", positions=[[0.0, 0.0, 0.0]]), Atoms("H", positions=[[1.0, 0.0, 0.0]])  # two structures
    frames += [emt_labelled(h, "lo"), emt_labelled(moved, "lo", per_atom=0.5)]
    with_free_atoms(data, frames)
    assert main(["train", str(write_config(data={"sources": [{"path": str(data)}], "atomic_energies": "isolated"}))])
    assert "one-atom frames of H at lo disagree" in capsys.readouterr().err


def test_a_fidelity_blind_model_refuses_atomic_energies(write_config, capsys):
    cfg = write_config(
        data={"atomic_energies": {"lo": {"H": -1.0}}},
        model={"backbone": "painn", "features": 16, "interactions": 1, "fidelity_embedding": {"inject": "single"}},
    )
    assert main(["train", str(cfg)]) != 0
    assert "atomic_energies are per fidelity" in capsys.readouterr().err


def test_models_saved_before_load_with_least_squares_records_and_keep_their_fingerprint():
    """A model saved before the atomic-energy records loads with least-squares ones, and its calibration files keep
    matching it: the fingerprint is the hash the version before computed (every state entry but head.spread)."""
    import hashlib

    pot = build_potential({"backbone": "painn", "features": 8, "interactions": 1}, ["a", "b"])
    old = {k: v for k, v in pot.state_dict().items() if k not in ("head.atomic", "head.atomic_shift", "head.given")}
    h = hashlib.sha1()
    for name, t in sorted(old.items()):
        if name != "head.spread":
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    fresh = build_potential({"backbone": "painn", "features": 8, "interactions": 1}, ["a", "b"])
    fresh.load_state_dict(old)
    assert not fresh.head.atomic.any() and not fresh.head.given.any()
    assert weights_fingerprint(fresh) == h.hexdigest()[:20]
    fresh.head.atomic_shift.fill_(-2.0)  # records of how the references were made change no prediction: no hash
    assert weights_fingerprint(fresh) == h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- extend
def test_extending_a_model_on_atomic_energies_needs_and_takes_the_new_fidelitys(tmp_path, write_config, capsys, caplog):
    molecules = [a for a in tiny_frames() if a.info["fidelity"] == "lo"]
    old_data, new_data = tmp_path / "lo.extxyz", tmp_path / "hi.extxyz"
    with_free_atoms(old_data, molecules, fidelities=("lo",))
    hi = [emt_labelled(a, "hi", 1.1, 0.3) for a in molecules if 7 not in a.numbers]  # no N at 'hi'
    free = with_free_atoms(new_data, hi, fidelities=("hi",))
    cfg = write_config(data={"sources": [{"path": str(old_data)}], "atomic_energies": "isolated"})
    assert main(["train", str(cfg)]) == 0
    model = tmp_path / "run" / "model.pt"
    old_run = load_old_run(tmp_path / "run")  # replay and forgetting never see the frames as data
    frames = np.flatnonzero(isolated_atoms(old_run.dataset))
    assert len(frames) and not any(np.isin(p[:, 0], frames).any() for p in (old_run.train, old_run.val, old_run.test))
    common = ["extend", str(model), "--data", str(new_data), "--fidelity", "hi", "--max-steps", "3"]
    common += ["--set", "train.progress=false", "--set", "train.threads=1"]
    assert main([*common, "--out", str(tmp_path / "no")]) != 0
    assert "give hi's: data.atomic_energies" in capsys.readouterr().err
    out = tmp_path / "ext"
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main([*common, "--out", str(out), "--set", "data.atomic_energies=isolated"]) == 0
    assert (
        "hi: no energy labels with N in the training labels; their hi references are their given atomic" in caplog.text
    )
    new, old = load_potential(out / "model.pt"), load_potential(model)
    k = new.fidelities.index("hi")
    assert bool(new.head.atomic[k]) and torch.nonzero(new.head.given[:, k]).flatten().tolist() == [7]
    for a in free:
        z = int(a.numbers[0])
        assert float(new.head.ref[z, k] - new.head.atomic_shift[k]) == pytest.approx(a.get_potential_energy(), abs=1e-9)
    assert torch.equal(new.head.ref[:, :k], old.head.ref) and torch.equal(
        new.head.atomic_shift[:k], old.head.atomic_shift
    )
    kept = load_old_run(out)  # the extension's own record (pairs.npz): what a later extension replays, calibrate reads
    frames = np.flatnonzero(isolated_atoms(kept.dataset))
    assert len(frames) and not any(np.isin(p[:, 0], frames).any() for p in (kept.train, kept.val, kept.test))


def test_a_least_squares_model_refuses_atomic_energies_for_a_new_fidelity(tmp_path, write_config, capsys):
    assert main(["train", str(write_config())]) == 0
    data = tmp_path / "new.extxyz"
    with_free_atoms(data, [emt_labelled(a, "new") for a in tiny_frames()[:10]], fidelities=("new",))
    args = ["extend", str(tmp_path / "run" / "model.pt"), "--data", str(data), "--fidelity", "new"]
    args += ["--out", str(tmp_path / "ext"), "--set", "data.atomic_energies=isolated", "--set", "train.threads=1"]
    assert main(args) != 0
    assert "references are least-squares fits" in capsys.readouterr().err


def test_a_table_file_beside_the_config(tmp_path, write_config, capsys):
    data = tmp_path / "with_atoms.extxyz"
    energies = as_table(with_free_atoms(data))
    (tmp_path / "e0s.json").write_text(json.dumps(energies))
    (tmp_path / "bad.yaml").write_text("lo: [1, 2]\n")
    assert main(["train", str(write_config(data={"atomic_energies": "bad.yaml"}))]) != 0
    assert "bad.yaml: expected {fidelity: {element: eV" in capsys.readouterr().err
    assert main(["train", str(write_config(data={"atomic_energies": "missing.yaml"}))]) != 0
    assert "missing.yaml: no such file" in capsys.readouterr().err
    assert main(["train", str(write_config(data={"atomic_energies": "e0s.json"}))]) == 0  # relative to the config
    head = load_potential(tmp_path / "run").head
    k = load_potential(tmp_path / "run").fidelities.index("hi")
    assert float(head.ref[1, k] - head.atomic_shift[k]) == pytest.approx(energies["hi"]["H"], abs=1e-9)


# ---------------------------------------------------------------------------------------------- free atoms as labels
def test_an_element_labelled_only_as_a_free_atom_is_estimated_not_fitted_to_it(caplog):
    """'hi' holds F only as a free atom: least squares would fit F's 'hi' reference to that atom's energy exactly,
    and every bonded F structure at 'hi' would be off by F's binding energy (a trial: 5.3 eV/atom for Ni), silently.
    F's 'hi' reference is estimated instead, like an element without labels, and training says why."""
    from multifi.train.preflight import report_references

    base = molecules_without_f_at_hi()
    free_f = FidelityDataset.from_records(
        [
            {
                "numbers": [9],
                "positions": [[0.0, 0.0, 0.0]],
                "labels": {"hi": {"energy": E0["hi"][9]}, "lo": {"energy": E0["lo"][9]}},
            }
        ]
    )
    ds = FidelityDataset.merge([base, free_f])
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    refs = fit_references(ds, pairs)
    hi, lo = ds.fidelities.index("hi"), ds.fidelities.index("lo")
    assert not refs.fitted[9, hi] and refs.free_only[9, hi] and refs.fitted[9, lo] and not refs.free_only[9, lo]
    assert abs(refs.ref[9, hi] - E0["hi"][9]) > 0.5  # not the free atom's energy
    np.testing.assert_allclose(
        refs.ref[9, hi], fit_references(base, labelled_pairs(base, np.arange(len(base)))).ref[9, hi], atol=0.3
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        report_references(refs, ds.fidelities.names)
    assert "hi: its only energy labels with F are free atoms" in caplog.text
    assert "hi: no energy labels with F" not in caplog.text
    # as atomic energies (references), the free atom is what the reference is made of: no estimate
    atomic = fit_references(ds, pairs, atomic=table(ds))
    assert atomic.fitted[9, hi] and not atomic.free_only[9, hi]


def test_atomic_energies_in_hartree_are_refused(tmp_path, write_config, capsys):
    data = tmp_path / "with_atoms.extxyz"
    free = with_free_atoms(data)
    hartree = {}
    for a in free:
        hartree.setdefault(a.info["fidelity"], {})[a.get_chemical_symbols()[0]] = (
            float(a.get_potential_energy()) / 27.211386 - 40.0
        )
    cfg = write_config(data={"atomic_energies": hartree})
    assert main(["train", str(cfg)]) != 0
    err = capsys.readouterr().err
    assert "beyond their atomic energies, where binding energies are a few eV per atom" in err and "Hartree" in err


def test_an_element_only_in_the_table_stays_unknown(tmp_path, write_config, capsys):
    energies = {"lo": {s: -1.0 for s in ("H", "C", "N", "O", "F")}, "hi": {s: -1.0 for s in ("H", "C", "N", "O", "F")}}
    assert main(["train", str(write_config(data={"atomic_energies": energies}))]) == 0
    pot = load_potential(tmp_path / "run")
    assert not bool(pot.head.known()[9]) and not pot.head.given[9].any()
    hf = Atoms("HF", positions=[[0, 0, 0], [0, 0, 0.92]])
    with pytest.raises(Exception, match="element F was not seen in training"):
        predict_atoms(pot, [hf], fidelity="lo")


def test_mace_tables_by_atomic_number_and_tables_checked_against_the_data_frames(tmp_path, write_config, caplog):
    """MACE writes E0s as {1: -13.6, 8: -2041.9}: read as such; a table entry far from the data's own one-atom frame
    of that element and fidelity (a unit, a typo) is said with both numbers (a trial's O off by 5 eV trained silently,
    its error 2.8× higher)."""
    from ase.data import atomic_numbers

    data = tmp_path / "with_atoms.extxyz"
    energies = as_table(with_free_atoms(data))
    by_number = {f: {atomic_numbers[s]: e for s, e in row.items()} for f, row in energies.items()}
    energies["hi"]["O"] += 5.0
    cfg = write_config(data={"sources": [{"path": str(data)}], "atomic_energies": energies})
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["train", "--dry-run", str(cfg)]) == 0
    assert (
        "data.atomic_energies: hi: O" in caplog.text and "but the data's one-atom frame of O at hi has" in caplog.text
    )
    caplog.clear()
    cfg = write_config(
        data={"sources": [{"path": str(data)}], "atomic_energies": by_number}, output_dir=str(tmp_path / "n")
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["train", str(cfg)]) == 0
    assert "one-atom frame" not in caplog.text or "but the data's" not in caplog.text
    head = load_potential(tmp_path / "n").head
    assert head.atomic.all() and float(head.ref[8, 1] - head.atomic_shift[1]) == pytest.approx(
        by_number["hi"][8], abs=1e-9
    )


def test_a_one_atom_frame_in_a_small_box_is_said_to_be_no_free_atom(tmp_path, write_config, capsys):
    data = tmp_path / "boxed.extxyz"
    frames = list(tiny_frames())
    for symbol in "HCNO":
        for name in ("lo", "hi"):
            atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]], cell=[5.0 if symbol == "O" else 12.0] * 3, pbc=True)
            frames.append(emt_labelled(atom, name, *((1.1, 0.3) if name == "hi" else ())))
    ase.io.write(data, frames, format="extxyz")
    assert main(
        [
            "train",
            "--dry-run",
            str(write_config(data={"sources": [{"path": str(data)}], "atomic_energies": "isolated"})),
        ]
    )
    err = capsys.readouterr().err
    assert (
        "contain O without an atomic energy" in err
        and "one-atom frames of O lie in cells whose periodic images are closer than 6 Å" in err
    )


def test_an_element_only_in_the_table_is_said(write_config, caplog):
    energies = {f: {s: -1.0 for s in ("H", "C", "N", "O", "Pt")} for f in ("lo", "hi")}
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["train", "--dry-run", str(write_config(data={"atomic_energies": energies}))]) == 0
    assert "data.atomic_energies: Pt: no training label holds it: the model does not learn it" in caplog.text


def test_a_resume_refuses_a_table_edited_since_the_run_started(tmp_path, write_config, capsys):
    """The checkpoint's references are made of the table the run started with: a resume after the table file was
    edited is a one-line error (it went on silently with the old references), and goes on once it is restored."""
    energies = as_table(with_free_atoms(tmp_path / "atoms.extxyz"))
    table = tmp_path / "e0s.json"
    table.write_text(json.dumps(energies))
    cfg = write_config(data={"atomic_energies": "e0s.json"})
    assert main(["train", str(cfg)]) == 0
    for name in ("model.pt", "metrics.json"):  # as a kill before the end leaves it
        (tmp_path / "run" / name).unlink()
    edited = json.loads(table.read_text())
    edited["hi"]["O"] += 1.0
    table.write_text(json.dumps(edited))
    assert main(["train", "--resume", str(tmp_path / "run")]) != 0
    assert "data.atomic_energies changed since the run started (hi O:" in capsys.readouterr().err
    table.write_text(json.dumps(energies))
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0


def test_maces_e0_frames_weighted_0_are_read_as_atomic_energies(tmp_path, write_config, caplog):
    """MACE's training files weigh their IsolatedAtom frames 0 (config_weight) and take them as E0s: with `isolated`
    their energies are the atomic energies; without, they stay out (weight 0) and the warning names `isolated`. A
    one-atom crystal weighted 0 stays out either way."""
    from multifi.config import load_config
    from multifi.train.prepare import prepare_data

    frames = [a for a in tiny_frames() if a.info["fidelity"] == "lo"]
    free = [emt_labelled(Atoms(s, positions=[[0.0, 0.0, 0.0]]), "lo") for s in ("H", "C", "N", "O")]
    crystal = emt_labelled(Atoms("Cu", cell=np.eye(3) * 2.5, pbc=True), "lo")
    for a in [*free, crystal]:
        a.info.update(config_type="IsolatedAtom", config_weight=0.0, config_energy_weight=0.0)  # counted once
    data = tmp_path / "mace.extxyz"
    ase.io.write(data, frames + free + [crystal], format="extxyz")
    cfg = write_config(data={"sources": [{"path": str(data)}], "atomic_energies": "isolated"})
    with caplog.at_level(logging.INFO, logger="multifi"):
        prepared = prepare_data(load_config(cfg))
    assert "4 free-atom energies weighted 0 (MACE's E0 frames) read" in caplog.text
    assert "1 frame(s) without any label left skipped" in caplog.text  # the crystal
    k = prepared.dataset.fidelities.index("lo")
    for a in free:
        got = prepared.atomic.values[int(a.numbers[0]), k]
        assert got == pytest.approx(a.get_potential_energy(), abs=1e-9)
    assert np.isnan(prepared.atomic.values[29, k])
    caplog.clear()
    cfg = write_config(data={"sources": [{"path": str(data)}]})
    with caplog.at_level(logging.INFO, logger="multifi"):
        prepared = prepare_data(load_config(cfg))
    assert prepared.dataset.n_atoms.min() > 1  # no free atom trained
    assert "5 frame(s) without any label left skipped (4 of them free atoms" in caplog.text
    assert "data.atomic_energies: isolated takes them" in caplog.text
