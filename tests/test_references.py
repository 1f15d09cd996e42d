"""Reference energies of elements a fidelity has no labels for: estimated from the other fidelities,
recorded with the model, and reported at training and at prediction."""

from __future__ import annotations

import logging

import ase.io
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, emt_labelled, rattled_molecule

from multifi.calculator import Calculator
from multifi.cli.main import main
from multifi.data.dataset import FidelityDataset
from multifi.data.split import labelled_pairs
from multifi.data.stats import N_ELEMENTS, fit_new_fidelity, fit_references
from multifi.errors import MultifiError
from multifi.models.registry import build_potential, load_potential, save_potential
from multifi.predict import predict_atoms

LO = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0, 9: -2700.0}  # eV per atom, like an all-electron method
ELEMENTS = sorted(LO)


def two_fidelities(shift: dict[int, float], without: int = 9, n: int = 80, seed: int = 0) -> FidelityDataset:
    """Random H/C/N/O/F compositions: 'lo' = Σ LO + noise on all; 'hi' = 'lo' + Σ shift on those without `without`."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        numbers = rng.choice(ELEMENTS, size=rng.integers(3, 10))
        e_lo = sum(LO[int(z)] for z in numbers) + 0.01 * len(numbers) * rng.normal()
        labels = {"lo": {"energy": e_lo}}
        if without not in numbers and i % 2 == 0:
            labels["hi"] = {"energy": e_lo + sum(shift[int(z)] for z in numbers) + 0.01 * len(numbers) * rng.normal()}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    return FidelityDataset.from_records(recs)


def fit(ds):
    refs = fit_references(ds, labelled_pairs(ds, np.arange(len(ds))))
    return refs, ds.fidelities.index("lo"), ds.fidelities.index("hi")


@pytest.mark.parametrize("kind", ["constant", "linear in Z"])
def test_shared_shift_is_recovered_for_an_element_without_labels(kind):
    """'hi' is 'lo' shifted by a known per-element amount that follows one rule for all elements
    (a constant, or linear in Z): F, never labelled at 'hi', gets lo[F] + its shift."""
    shift = {z: (-0.7 if kind == "constant" else 0.3 - 0.25 * z) for z in ELEMENTS}
    refs, lo, hi = fit(two_fidelities(shift))
    assert not refs.fitted[9, hi] and refs.fitted[ELEMENTS, lo].all() and refs.fitted[[1, 6, 7, 8], hi].all()
    assert refs.estimated(hi) == [9] and refs.estimated(lo) == []
    assert refs.ref[9, hi] == pytest.approx(LO[9] + shift[9], abs=0.05)
    assert refs.spread[hi] < 0.05  # leave-one-out error of the shift model: small, the rule holds
    assert refs.ref.shape == (N_ELEMENTS, 2) and np.isfinite(refs.ref).all()


def test_unshared_shift_is_flagged_and_fitted_references_are_unchanged():
    """Per-element shifts without a rule: F's estimate is finite but flagged, and its expected error
    (leave-one-out over the elements labelled at both) is reported large; references fitted from a
    fidelity's own labels are exactly that fidelity's least-squares fit."""
    shift = {1: 0.4, 6: -3.0, 7: 2.5, 8: -1.0, 9: 6.0}
    ds = two_fidelities(shift)
    refs, lo, hi = fit(ds)
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    own = fit_references(ds, pairs[pairs[:, 1] == hi])  # 'hi' alone: its own least squares
    np.testing.assert_array_equal(refs.ref[[1, 6, 7, 8], hi], own.ref[[1, 6, 7, 8], hi])
    assert not refs.fitted[9, hi] and np.isfinite(refs.ref[9, hi])
    assert refs.spread[hi] > 0.5
    assert abs(refs.ref[9, hi] - (LO[9] + shift[9])) > 0.5  # cannot be known: hence the flag and the warning


def test_new_fidelity_next_to_known_references():
    """fit_new_fidelity (growing a trained model's table): the new column from its own labels and,
    for an element it lacks, from the known fidelities' references."""
    shift = {z: -0.7 for z in ELEMENTS}
    ds = two_fidelities(shift)
    refs, lo, hi = fit(ds)
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    new = fit_new_fidelity(ds, pairs, hi, refs.ref[:, [lo]], refs.fitted[:, [lo]])
    assert new.ref.shape == (N_ELEMENTS, 1) and not new.fitted[9, 0] and new.fitted[[1, 6, 7, 8], 0].all()
    assert new.ref[9, 0] == pytest.approx(LO[9] - 0.7, abs=0.05)
    np.testing.assert_allclose(new.ref[[1, 6, 7, 8], 0], refs.ref[[1, 6, 7, 8], hi], atol=1e-12)


def test_compositions_the_labels_do_not_determine_come_from_the_other_fidelity():
    """At 'hi', N and O appear only together as NO (one direction of two): the fit keeps the N+O sum the
    labels fix and takes the split from 'lo'."""
    rng = np.random.default_rng(3)
    recs = []
    for i in range(60):
        numbers = rng.choice([1, 6, 7, 8], size=rng.integers(3, 9))
        if i % 2 == 0:  # 'hi': H, C and NO units only
            k = rng.integers(0, 3)
            numbers = np.concatenate([rng.choice([1, 6], size=rng.integers(2, 6)), np.tile([7, 8], k)])
        e_lo = sum(LO[int(z)] for z in numbers)
        labels = {"lo": {"energy": float(e_lo)}}
        if i % 2 == 0:
            labels["hi"] = {"energy": float(e_lo - 0.5 * len(numbers))}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    ds = FidelityDataset.from_records(recs)
    refs, lo, hi = fit(ds)
    np.testing.assert_allclose(refs.ref[[1, 6, 7, 8], hi], [LO[z] - 0.5 for z in (1, 6, 7, 8)], atol=1e-3)


# ---------------------------------------------------------------------------------------------- reported
def frames_without_nitrogen_at_hi():
    """'lo' on 20 molecules; 'hi' only on those without N."""
    frames = []
    for i, name in enumerate(["H2O", "NH3", "CH4", "CH3OH", "HCN", "C2H4", "CO2", "H2CO"] * 3):
        a = rattled_molecule(name, seed=i)
        frames.append(emt_labelled(a, "lo"))
        if 7 not in a.numbers:
            frames.append(emt_labelled(a, "hi", scale=1.1, per_atom=0.3))
    return frames


@pytest.fixture(scope="module")
def run_without_n(tmp_path_factory):
    from multifi.config import validate_config
    from multifi.train.run import train

    root = tmp_path_factory.mktemp("refs")
    data = root / "data.extxyz"
    ase.io.write(data, frames_without_nitrogen_at_hi(), format="extxyz")
    cfg = {
        "data": {"sources": [{"path": str(data)}], "split": {"val": 0.1, "test": 0.1, "seed": 0}},
        "model": TINY_MODEL,
        "output_dir": str(root / "run"),
        "train": {"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
    }
    logger = logging.getLogger("multifi")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        run_dir = train(validate_config(cfg))
    finally:
        logger.removeHandler(handler)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir, [r.getMessage() for r in records if r.levelno >= logging.WARNING], data


def test_training_warns_once_per_fidelity_lacking_elements(run_without_n):
    run_dir, warnings, _ = run_without_n
    about = [w for w in warnings if "no energy labels with" in w]
    assert (
        len(about) == 1
        and about[0].startswith("hi: no energy labels with N in the training labels")
        and "estimated" in about[0]
    )
    head = load_potential(run_dir / "model.pt").head
    assert not head.fitted[7, 1] and head.fitted[[1, 6, 7, 8], 0].all() and head.fitted[[1, 6, 8], 1].all()
    assert head.ref[7, 1] != 0


def test_prediction_warns_naming_element_and_fidelity(run_without_n, caplog):
    run_dir, _, data = run_without_n
    pot = load_potential(run_dir / "model.pt")
    ammonia = [rattled_molecule("NH3", 0)]
    with caplog.at_level(logging.WARNING, logger="multifi"):
        predict_atoms(pot, [rattled_molecule("H2O", 0)], "hi")
        predict_atoms(pot, ammonia, "lo")
        assert not caplog.records  # N has 'lo' labels; H2O has no estimated reference
        predict_atoms(pot, ammonia, "hi")
    assert len(caplog.records) == 1 and "hi reference energy of N was estimated" in caplog.records[0].getMessage()
    with pytest.raises(
        MultifiError, match=r"refused \(strict references\): the hi reference energy of N was estimated"
    ):
        predict_atoms(pot, ammonia, "hi", strict_references=True)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        atoms = ammonia[0].copy()
        atoms.calc = Calculator(pot, fidelity="hi")
        for _ in range(3):
            atoms.rattle(0.01)
            atoms.get_potential_energy()
    assert len(caplog.records) == 1  # once per calculator, not at every MD step
    atoms.calc = Calculator(pot, fidelity="hi", strict_references=True)
    with pytest.raises(MultifiError, match="of N was estimated"):
        atoms.get_potential_energy()
    # the elements are checked once per composition and fidelity: new elements or a new fidelity, again
    calc = Calculator(pot, fidelity="hi", strict_references=True)
    water = rattled_molecule("H2O", 0)
    water.calc = calc
    water.get_potential_energy()
    atoms.calc = calc
    for _ in range(2):
        with pytest.raises(MultifiError, match="of N was estimated"):
            atoms.get_potential_energy()
    calc.fidelity = "lo"
    atoms.get_potential_energy()
    calc.fidelity = "hi"
    with pytest.raises(MultifiError, match="of N was estimated"):
        atoms.get_potential_energy()

    caplog.clear()
    labelled = data.parent / "ammonia_hi.extxyz"
    ase.io.write(labelled, [emt_labelled(rattled_molecule(m, 5), "hi") for m in ("NH3", "H2O")], format="extxyz")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["evaluate", str(run_dir / "model.pt"), str(data)]) == 0  # no 'hi' label on N: silent
        assert main(["evaluate", str(run_dir / "model.pt"), str(labelled)]) == 0
    assert [r.getMessage() for r in caplog.records if "estimated" in r.getMessage()] == [
        f"{labelled}: the hi reference energy of N was estimated from the other fidelities (no hi training label "
        "contained it); expect larger hi energy errors for structures with N"
    ]


def test_prediction_at_a_fidelity_without_any_training_label_says_its_embedding_never_trained(run_without_n, caplog):
    """A fidelity that had no training label at all (train_limits 0): not only its references are estimated, its
    embedding never trained; said instead of the per-element estimate."""
    run_dir, _, _ = run_without_n
    pot = load_potential(run_dir / "model.pt")
    assert pot.spec["data"]["train"]["hi"] > 0
    with torch.no_grad():  # as a run with train_limits {hi: 0} has it: no reference fitted, no label counted
        pot.head.fitted[:, pot.fidelities.index("hi")] = False
    with caplog.at_level(logging.WARNING, logger="multifi"):
        predict_atoms(pot, [rattled_molecule("H2O", 0)], "hi")  # hi labels recorded: its references estimated
    assert "of H, O were estimated" in caplog.text and "never trained" not in caplog.text
    caplog.clear()
    pot.spec["data"]["train"]["hi"] = 0
    with caplog.at_level(logging.WARNING, logger="multifi"):
        predict_atoms(pot, [rattled_molecule("H2O", 0)], "hi")
        predict_atoms(pot, [rattled_molecule("H2O", 0)], "lo")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("the model had no hi training labels: its hi embedding was never")
    assert "reference energies of H, O were estimated" in said[0]


def test_uncertainty_includes_the_error_of_an_estimated_reference(run_without_n, tmp_path, caplog):
    """σ of a structure with N at hi (its reference estimated) adds the estimate's leave-one-out error per N atom,
    spread·n_N, to the LLPR σ (N2H4: twice NH3's); structures without an estimate keep the LLPR σ; predict and the
    calculator agree; a model saved before the error was recorded gets it from its references; one whose error is
    unknown writes NaN for them and says so, its calibration still valid."""
    from multifi.predict import predict_file
    from multifi.uncertainty import LLPR, _run_data, calibrate_run, dataset_features, llpr_path

    run_dir, _, _ = run_without_n
    pot = load_potential(run_dir / "model.pt")
    dataset, pairs = _run_data(run_dir)
    spread = float(pot.head.spread[1])
    assert spread == pytest.approx(fit_references(dataset, pairs["train"]).spread[1]) and spread > 0.01
    calibrate_run(run_dir)
    llpr = LLPR.load(llpr_path(run_dir / "model.pt"), pot)
    mols = [rattled_molecule(m, 3) for m in ("NH3", "N2H4", "H2O")]
    ase.io.write(tmp_path / "in.extxyz", mols, format="extxyz")
    out = tmp_path / "out.extxyz"
    predict_file(run_dir / "model.pt", tmp_path / "in.extxyz", ["hi", "lo"], out, uncertainty=True)
    got = ase.io.read(out, ":")
    ds = FidelityDataset.from_records([{"numbers": a.numbers, "positions": a.positions} for a in mols])
    for name, key, n_estimated in (("hi", "energy_sigma", [1, 2, 0]), ("lo", "energy_sigma_lo", [0, 0, 0])):
        features, _ = dataset_features(pot, ds, np.arange(3), name)
        own = llpr.of(name).sigma(features)
        sigma = np.array([a.info[key] for a in got])
        np.testing.assert_allclose(sigma**2 - own**2, (spread * np.array(n_estimated)) ** 2 * (name == "hi"), atol=1e-9)
    ammonia = mols[0].copy()
    ammonia.calc = Calculator(run_dir / "model.pt", fidelity="hi", uncertainty=True)
    ammonia.get_potential_energy()
    assert ammonia.calc.results["energy_sigma"] == pytest.approx(got[0].info["energy_sigma"], rel=1e-5)

    state = {k: v for k, v in pot.state_dict().items() if k != "head.spread"}  # as a model saved before the record
    before = build_potential(TINY_MODEL, ["lo", "hi"])
    before.load_state_dict(state)  # the error follows from the references it recorded
    assert before.head.spread.tolist() == pytest.approx(pot.head.spread.tolist())
    pot.head.spread.fill_(-1.0)  # an error nothing measured (too few elements labelled at two fidelities)
    old = save_potential(pot, tmp_path / "old.pt")
    LLPR.load(llpr_path(run_dir / "model.pt"), pot).save(llpr_path(old))
    LLPR.load(llpr_path(old), pot)  # the same weights: the calibration holds
    with caplog.at_level(logging.WARNING, logger="multifi"):
        predict_file(old, tmp_path / "in.extxyz", "hi", tmp_path / "old.extxyz", uncertainty=True)
    sigma = [a.info["energy_sigma"] for a in ase.io.read(tmp_path / "old.extxyz", ":")]
    assert np.isnan(sigma[:2]).all() and np.isfinite(sigma[2])
    assert "energy_sigma is NaN for 2 of them: the model has no error for its estimate" in caplog.text
    caplog.clear()
    ammonia.calc = Calculator(old, fidelity="hi", uncertainty=True)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        for _ in range(2):
            ammonia.rattle(0.01)
            ammonia.get_potential_energy()
            assert np.isnan(ammonia.calc.results["energy_sigma"])
    assert caplog.text.count("energy_sigma is NaN at hi") == 1  # once per fidelity and calculator


def test_the_estimate_error_is_known_at_the_gauge_fidelity_too():
    """The fidelity the shift model takes as its gauge (most references) had no leave-one-out error: σ of its
    structures with an estimated element was NaN in a freshly trained model."""
    rng = np.random.default_rng(4)
    base = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0, 9: -2710.0}
    recs = []
    for fid, elements, shift in (("A", (1, 6, 8, 9), 0.0), ("B", (1, 6, 7, 8), 0.4)):
        for _ in range(40):
            numbers = rng.choice(elements, size=rng.integers(3, 9))
            energy = sum(base[int(z)] + shift * int(z) / 10 for z in numbers) + rng.normal(0, 0.05)
            pos = rng.normal(size=(len(numbers), 3)) * 3
            recs.append({"numbers": numbers, "positions": pos, "labels": {fid: {"energy": float(energy)}}})
    ds = FidelityDataset.from_records(recs)
    refs = fit_references(ds, labelled_pairs(ds, np.arange(len(ds))))
    a, b = ds.fidelities.index("A"), ds.fidelities.index("B")
    assert not refs.fitted[7, a] and not refs.fitted[9, b]  # each fidelity estimates one element
    assert np.isfinite(refs.spread[[a, b]]).all()
    from multifi.data.stats import estimate_errors

    null = np.zeros((N_ELEMENTS, 2, 4))
    np.testing.assert_allclose(estimate_errors(refs.ref, refs.fitted, null), refs.spread)


def test_reference_error_counts_atoms_of_one_element_together_and_elements_apart():
    pot = build_potential(TINY_MODEL, ["lo", "hi"])
    ref = np.zeros((N_ELEMENTS, 2))
    ref[[1, 6, 7, 8]] = -1.0
    fitted = ref != 0
    fitted[[7, 8], 1] = False  # N and O estimated at hi
    pot.head.set_baseline(ref, np.ones(2), fitted, spread=np.array([np.nan, 0.5]))
    assert pot.head.spread.tolist() == [-1.0, 0.5]
    numbers = torch.tensor([7, 7, 1, 8, 1, 6, 7, 8, 8, 8])  # N2H O | H C | N O3
    structure = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    hi = pot.head.reference_error(numbers, structure, torch.ones(3, dtype=torch.long), 3)
    np.testing.assert_allclose(hi.numpy(), 0.5 * np.sqrt([4 + 1, 0, 1 + 9]))
    lo = pot.head.reference_error(numbers, structure, torch.zeros(3, dtype=torch.long), 3)
    assert lo.tolist() == [0.0, 0.0, 0.0]  # nothing estimated at lo (its unknown error never enters)


def test_deploy_warns_about_estimated_references_and_records_them(run_without_n, tmp_path, caplog):
    """A file for LAMMPS at a fidelity with an estimated reference: the same warning as predict, the elements in
    its metadata; strict_references refuses it and writes nothing; another fidelity is silent."""
    import json

    import torch

    from multifi.deploy import deploy

    run_dir, _, _ = run_without_n
    out = tmp_path / "hi.pt"
    with caplog.at_level(logging.WARNING, logger="multifi"):
        meta = deploy(run_dir / "model.pt", "lo", tmp_path / "lo.pt")
        said = [r.getMessage() for r in caplog.records if "stress label" not in r.getMessage()]  # molecules: none
        assert not said and meta["estimated_elements"] == []
        caplog.clear()
        meta = deploy(run_dir / "model.pt", "hi", out)
    assert meta["estimated_elements"] == ["N"]
    assert [r.getMessage() for r in caplog.records if "stress label" not in r.getMessage()] == [
        f"{out}: the hi reference energy of N was estimated from the other fidelities (no hi training label "
        "contained it); expect larger hi energy errors for structures with N"
    ]
    extra = {"multifi.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["multifi.json"])["estimated_elements"] == ["N"]
    strict = tmp_path / "strict.pt"
    with pytest.raises(MultifiError, match="hi reference energy of N was estimated"):
        deploy(run_dir / "model.pt", "hi", strict, strict_references=True)
    assert not strict.exists()
    r = main(["deploy", str(run_dir / "model.pt"), "--fidelity", "hi", "--out", str(strict), "--strict-references"])
    assert r != 0 and not strict.exists()


def test_models_saved_before_the_record_load_with_nonzero_references_as_fitted(tmp_path):
    pot = build_potential(TINY_MODEL, ["lo", "hi"])
    ref = np.zeros((N_ELEMENTS, 2))
    ref[[1, 8], 0], ref[1, 1] = [-13.0, -2000.0], -13.5
    pot.head.set_baseline(ref, np.ones(2))
    state = {
        "multifi_potential": 1,
        "spec": pot.spec,
        "state_dict": {k: v for k, v in pot.state_dict().items() if k != "head.fitted"},
    }
    torch.save(state, tmp_path / "old.pt")
    old = load_potential(tmp_path / "old.pt")
    assert old.elements == [1, 8]
    np.testing.assert_array_equal(old.head.fitted.numpy(), ref != 0)
    pot.head.set_baseline(ref, np.ones(2), fitted=np.ones((N_ELEMENTS, 2), bool))
    assert load_potential(save_potential(pot, tmp_path / "new.pt")).head.fitted.all()


def test_model_card_shows_which_references_are_estimated(tmp_path):
    """multifi info: per fidelity, the elements with references from its own labels and those estimated."""
    import torch

    from multifi.card import format_card, model_card
    from multifi.models.registry import build_potential, save_potential

    pot = build_potential(
        {
            "backbone": "painn",
            "features": 8,
            "interactions": 1,
            "cutoff": 3.0,
            "n_rbf": 4,
            "fidelity_embedding": {"dim": 2, "inject": "both"},
        },
        ["PBE", "R2SCAN"],
    )
    ref = np.zeros((119, 2))
    ref[[8, 14, 15], 0] = [-4.0, -5.0, -6.0]
    ref[[8, 14, 15], 1] = [-4.5, -5.5, -6.6]
    fitted = ref != 0
    fitted[[8, 15], 1] = False  # R2SCAN labels had no O and no P: estimated
    pot.head.set_baseline(ref, np.ones(2), fitted)
    path = save_potential(pot, tmp_path / "m.pt")
    card = model_card(path)
    by_name = {f["name"]: f for f in card["fidelities"]}
    assert by_name["PBE"]["elements"] == ["O", "Si", "P"] and by_name["PBE"]["estimated"] == []
    assert by_name["R2SCAN"]["elements"] == ["Si"] and by_name["R2SCAN"]["estimated"] == ["O", "P"]
    assert "(estimated, no labels: O P)" in format_card(card)  # no error known (spread unset)
    assert torch.equal(pot.head.fitted, torch.as_tensor(fitted))
    pot.head.set_baseline(ref, np.ones(2), fitted, spread=np.array([np.nan, 0.8125]))
    card = model_card(save_potential(pot, tmp_path / "m2.pt"))
    assert [f["estimate_error_eV"] for f in card["fidelities"]] == [None, 0.8125]
    assert "(estimated, no labels: O P; ± 0.812 eV per atom)" in format_card(card)


def test_model_card_similarity_table_is_aligned_with_long_fidelity_names(tmp_path):
    from multifi.card import format_card, model_card
    from multifi.models.registry import build_potential, save_potential

    pot = build_potential(TINY_MODEL, ["GFN2-xTB", "B3LYP/6-31G(2df,p)"])
    ref = np.zeros((119, 2))
    ref[[1, 8], :] = -1.0
    pot.head.set_baseline(ref, np.ones(2))
    text = format_card(model_card(save_potential(pot, tmp_path / "m.pt")))
    table = text.split("cosine similarity of the fidelity vectors:\n")[1].split("\n\n")[0].splitlines()
    assert len(table) == 3 and len({len(line) for line in table}) == 1  # header and rows column-aligned


def test_evaluate_separates_structures_with_estimated_references(run_without_n, tmp_path, capsys):
    """Structures with N at 'hi' (its reference estimated) stay in the errors; their count and the errors without
    them (what a model of 'hi' alone could be compared on) are reported, in metrics and in the table."""
    import json

    run_dir, _, _ = run_without_n
    pot = load_potential(run_dir / "model.pt")
    frames = [emt_labelled(rattled_molecule(m, i), "hi") for i, m in enumerate(("NH3", "H2O", "CH4", "NH3"))]
    path = tmp_path / "hi.extxyz"
    ase.io.write(path, frames)
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run_dir / "model.pt"), str(path), "--out", str(out)]) == 0
    m = json.loads(out.read_text())["fidelities"]["hi"]
    assert m["n"] == 4 and m["n_estimated_references"] == 2 and m["fitted_references"]["n"] == 2
    water_methane = frames[1:3]
    e = predict_atoms(pot, water_methane, "hi")[0]
    want = 1000 * np.mean(np.abs(e - np.array([a.get_potential_energy() for a in water_methane])))
    assert m["fitted_references"]["energy_mae_meV"] == pytest.approx(want, rel=1e-6)
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("  without 2 estimated"))
    assert len(row.split()) == 3 + 5  # its label, then the energy columns only: forces do not depend on references
    from ase.calculators.singlepoint import SinglePointCalculator

    # NH3 without an energy label: a structure whose errors hold no energy is not counted as estimated
    frames[0].calc = SinglePointCalculator(frames[0], forces=frames[0].get_forces())
    ase.io.write(path, frames)
    out = tmp_path / "m2.json"
    assert main(["evaluate", str(run_dir / "model.pt"), str(path), "--out", str(out)]) == 0
    m = json.loads(out.read_text())["fidelities"]["hi"]
    assert m["n"] == 3 and m["n_estimated_references"] == 1 and m["fitted_references"]["n"] == 2


def test_evaluate_warns_when_errors_mean_labels_of_another_method(run_without_n, tmp_path, caplog):
    """Energies of another level of theory (here shifted by 50 eV per atom) scored as 'lo': a warning, not only
    a huge number."""
    run_dir, _, _ = run_without_n
    frames = [emt_labelled(rattled_molecule(m, i), "lo", per_atom=50.0) for i, m in enumerate(("H2O", "CH4"))]
    path = tmp_path / "other_method.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["evaluate", str(run_dir / "model.pt"), str(path)]) == 0
    assert "lo energy MAE" in caplog.text and "are these labels at lo" in caplog.text
    caplog.clear()
    ase.io.write(path, [emt_labelled(rattled_molecule("H2O", 0), "lo")])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["evaluate", str(run_dir / "model.pt"), str(path)]) == 0
    assert "are these labels" not in caplog.text


def test_validation_energy_errors_leave_out_estimated_references():
    """The validation energy errors that pick the best checkpoint skip structures whose reference at their
    fidelity was estimated (a constant offset there froze the monitored error of joint runs); forces are kept."""
    from multifi.data.batch import graph_from_atoms
    from multifi.train.module import PotentialModule

    module = PotentialModule({"model": TINY_MODEL, "fidelities": ["lo", "hi"]}, {}, {"ema_decay": 0.0})
    ref = np.zeros((119, 2))
    ref[[1, 7, 8], 0] = -1.0
    ref[[1, 8], 1] = -1.1
    module.potential.head.set_baseline(ref, np.ones(2), ref != 0)  # hi has no N reference of its own
    module.sync_ema()
    mols = [rattled_molecule("NH3", 0), rattled_molecule("H2O", 1), rattled_molecule("NH3", 2)]
    g = graph_from_atoms(mols, 3.0, [1, 1, 0])
    g.energy_mask = torch.ones(3, dtype=torch.bool)
    g.forces_mask = torch.ones(3, dtype=torch.bool)
    g.energy = torch.tensor([-80.0, -8.0, -8.0], dtype=g.energy.dtype)  # NH3 at hi far off: its term shows
    kept = module._without_estimated_energies(g)
    assert kept.energy_mask.tolist() == [False, True, True]  # NH3 at hi out; NH3 at lo (fitted) and water in
    assert kept.forces_mask.tolist() == [True, True, True]
    module.on_validation_epoch_start()
    module.validation_step(g, 0)  # the validation loss (default monitor) leaves them out too
    with torch.enable_grad():
        out = module.eval_potential(g, forces=True)
    masked, unmasked = module.loss_fn(out, kept)[0], module.loss_fn(out, g)[0]
    assert float(module.val_loss.sums["val_loss"]) == pytest.approx(3 * float(masked), rel=1e-5)
    assert float(masked) != pytest.approx(float(unmasked), rel=1e-2)
    null = np.zeros((1, 119))
    null[0, [1, 8]] = [2**-0.5, -(2**-0.5)]  # 'lo' fixed H and O only as H + O (e.g. only OH groups)
    module.potential.head.set_baseline(ref, np.ones(2), ref != 0, [null, np.zeros((0, 119))])
    module.sync_ema()
    g = graph_from_atoms([mols[1], mols[1]], 3.0, [0, 1])
    g.energy_mask = torch.ones(2, dtype=torch.bool)
    kept = module._without_estimated_energies(g)
    assert kept.energy_mask.tolist() == [False, True]  # H2O at lo: an H:O ratio its labels never had; at hi: fitted


def test_elements_only_in_fixed_proportions_are_reported(caplog):
    """Ga and As only as GaAs at 'hi' (both also alone at 'lo'): the fit records them as open at 'hi', keeps
    their sum, takes the split from 'lo'; training warns naming them."""
    rng = np.random.default_rng(1)
    lo_ref, shift = {31: -3.0, 33: -4.5, 14: -5.0}, {31: -0.2, 33: -0.4, 14: -0.3}
    recs = []
    for i in range(30):
        if i % 2:  # 'lo' only: any proportions
            numbers = rng.choice([31, 33, 14], size=rng.integers(2, 7))
            labels = {"lo": {"energy": float(sum(lo_ref[int(z)] for z in numbers))}}
        else:  # both: GaAs units and Si
            numbers = np.array([31, 33] * int(rng.integers(1, 4)) + [14] * int(rng.integers(0, 3)))
            e = float(sum(lo_ref[int(z)] for z in numbers))
            labels = {"lo": {"energy": e}, "hi": {"energy": e + float(sum(shift[int(z)] for z in numbers))}}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    ds = FidelityDataset.from_records(recs)
    refs, lo, hi = fit(ds)
    assert refs.open(hi) == [31, 33] and refs.open(lo) == []
    assert refs.ref[31, hi] + refs.ref[33, hi] == pytest.approx(-3.0 - 4.5 - 0.6, abs=1e-6)  # the sum: fitted
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    new = fit_new_fidelity(ds, pairs, hi, refs.ref[:, [lo]], refs.fitted[:, [lo]])
    assert new.open(0) == [31, 33]
    from multifi.train.preflight import report_references

    with caplog.at_level(logging.WARNING, logger="multifi"):
        report_references(refs, ["lo", "hi"])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "hi: the training labels contain Ga, As only in fixed proportions" in text and "lo:" not in text


def _gaas_fidelities(caplog=None):
    """'lo' on Ga, As, Si in any proportions; 'hi' on GaAs units plus Si only (see the test above)."""
    rng = np.random.default_rng(1)
    lo_ref, shift = {31: -3.0, 33: -4.5, 14: -5.0}, {31: -0.2, 33: -0.4, 14: -0.3}
    recs = []
    for i in range(30):
        if i % 2:
            numbers = rng.choice([31, 33, 14], size=rng.integers(2, 7))
            labels = {"lo": {"energy": float(sum(lo_ref[int(z)] for z in numbers))}}
        else:
            numbers = np.array([31, 33] * int(rng.integers(1, 4)) + [14] * int(rng.integers(0, 3)))
            e = float(sum(lo_ref[int(z)] for z in numbers))
            labels = {"lo": {"energy": e}, "hi": {"energy": e + float(sum(shift[int(z)] for z in numbers))}}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    return FidelityDataset.from_records(recs)


def test_structures_with_open_proportions_are_flagged_at_prediction(tmp_path, caplog):
    """GaAs at 'hi' is fitted (no warning), Ga2As and pure Ga are not: warned (strict: an error), counted as
    estimated by evaluate, listed by info and deploy; the record survives save and load."""
    from multifi.card import format_card, model_card
    from multifi.deploy import metadata
    from multifi.models.elements import check_elements, open_compositions
    from multifi.train.evaluate import pairs_with_estimated_references

    ds = _gaas_fidelities()
    refs, lo, hi = fit(ds)
    pot = build_potential(TINY_MODEL, ["lo", "hi"])
    pot.head.set_baseline(refs.ref, refs.scale, refs.fitted, refs.null)
    save_potential(pot, tmp_path / "model.pt")
    pot = load_potential(tmp_path / "model.pt")
    assert pot.head.open_elements(1) == [31, 33] and pot.head.open_elements(0) == []
    numbers = np.array([31, 33, 31, 33, 31, 31, 33, 14, 31])  # GaAs | Ga2As | SiGa
    n_atoms = np.array([2, 3, 2, 2])[:3]
    numbers = numbers[: n_atoms.sum()]
    np.testing.assert_array_equal(open_compositions(pot, numbers, n_atoms, np.ones(3, int)), [False, True, False])
    np.testing.assert_array_equal(open_compositions(pot, numbers, n_atoms, np.zeros(3, int)), [False, False, False])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_elements(pot, numbers[:2], np.array([2]), 1)  # GaAs: silent
        assert not caplog.records
        check_elements(pot, numbers, n_atoms, 1, keys=["gaas", "ga2as", "gasi"])
    assert "1 structure(s) (ga2as) hold Ga, As in proportions no hi training label had" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_elements(pot, np.array([31, 31, 14]), np.array([3]), 1, keys=["ga2si"])  # names what it holds
    assert "structure ga2si holds Ga in proportions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):  # a calculator's one structure has no key
        check_elements(pot, np.array([31, 31, 14]), np.array([3]), 1)
    assert "this structure holds Ga in proportions" in caplog.text and "(0)" not in caplog.text
    # a calculator checks structure after structure with one `seen` set: each open element is said once (As after
    # Ga was silent: the set held the fidelity, not the element)
    seen: set = set()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        for z in ([31, 31, 31], [33, 33, 33], [31, 31, 31], [31, 33, 33]):
            check_elements(pot, np.array(z), np.array([3]), 1, seen=seen)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "holds Ga in" in said[0] and "holds As in" in said[1], said
    with pytest.raises(MultifiError, match="ga2as"):
        check_elements(pot, numbers, n_atoms, 1, keys=["gaas", "ga2as", "gasi"], strict=True)
    recs = [
        {
            "numbers": z,
            "positions": np.random.default_rng(0).normal(size=(len(z), 3)) * 3,
            "labels": {"hi": {"energy": -1.0}},
        }
        for z in (numbers[:2], numbers[2:5], numbers[5:])
    ]
    test = FidelityDataset.from_records(recs)
    flags = pairs_with_estimated_references(pot, test, labelled_pairs(test, np.arange(3)))
    np.testing.assert_array_equal(flags, [False, True, False])
    card = model_card(tmp_path / "model.pt")
    assert card["fidelities"][1]["open"] == ["Ga", "As"] and "only in fixed proportions: Ga As" in format_card(card)
    assert metadata(pot, "hi", torch.float64)["open_elements"] == ["Ga", "As"]


def test_more_open_compositions_than_recorded_mark_their_elements_estimated():
    from multifi.models.head import NULL_DIRS

    pot = build_potential(TINY_MODEL, ["lo"])
    null = np.zeros((NULL_DIRS + 1, N_ELEMENTS))
    for d in range(NULL_DIRS + 1):
        null[d, [1 + d, 20 + d]] = [2**-0.5, -(2**-0.5)]
    fitted = np.zeros((N_ELEMENTS, 1), bool)
    fitted[1:40] = True
    pot.head.set_baseline(np.where(fitted, -1.0, 0.0), np.ones(1), fitted, [null])
    assert not pot.head.null.any() and not pot.head.fitted[[1, 5, 20, 24], 0].any() and pot.head.fitted[10, 0]
    assert 5 in pot.elements  # still known, now estimated


def test_the_estimate_error_names_how_many_elements_it_comes_from(caplog):
    """An element missing at 'hi' is estimated; the leave-one-out error quoted beside it says over how many
    elements (labelled at 'hi' and elsewhere) it was measured, and that two are a rough guide."""
    from multifi.train.preflight import report_references

    rng = np.random.default_rng(3)
    lo_ref, hi_ref = {29: -3.5, 13: -3.0, 47: -2.8}, {29: -4.2, 13: -3.6}
    recs = []
    for i in range(40):
        numbers = rng.choice([29, 13, 47] if i % 2 else [29, 13], size=int(rng.integers(2, 6)))
        labels = {"lo": {"energy": float(sum(lo_ref[int(z)] for z in numbers)) + rng.normal(0, 0.01)}}
        if not i % 2:
            labels["hi"] = {"energy": float(sum(hi_ref[int(z)] for z in numbers)) + rng.normal(0, 0.01)}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    refs, _, _ = fit(FidelityDataset.from_records(recs))
    with caplog.at_level(logging.WARNING, logger="multifi"):
        report_references(refs, ["lo", "hi"])
    assert "hi: no energy labels with Ag in the training labels" in caplog.text
    assert "over the 2 elements labelled at hi and another fidelity" in caplog.text and "rough guide" in caplog.text


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_monitoring_a_fidelity_whose_validation_energies_are_all_estimated(tmp_path, capsys, dry_run):
    """'hi' trains without N and validates only on N molecules: monitoring its energy MAE is a one-line error
    before training (was a Lightning traceback at the first validation), and so is its force MAE (no training
    label holds N, so validation leaves those molecules out)."""
    from test_cli import fails

    frames, keys = [], {"train": [], "val": [], "test": []}
    for i, name in enumerate(["H2O", "NH3", "CH4", "CH3OH", "HCN", "C2H4", "CO2", "H2CO"] * 3):
        a = rattled_molecule(name, seed=i)
        a.info["key"] = f"m{i}"
        has_n = 7 in a.numbers
        keys["val" if has_n else "test" if i in (2, 3) else "train"].append(f"m{i}")
        frames += [emt_labelled(a, "lo"), emt_labelled(a, "hi", scale=1.1, per_atom=0.3)]
    ase.io.write(tmp_path / "data.extxyz", frames, format="extxyz")
    for split, names in keys.items():
        (tmp_path / f"{split}.txt").write_text("\n".join(names) + "\n")
    cfg = {
        "data": {
            "sources": [{"path": str(tmp_path / "data.extxyz")}],
            "split": {"files": {s: str(tmp_path / f"{s}.txt") for s in keys}},
        },
        "model": TINY_MODEL,
        "output_dir": str(tmp_path / "run"),
        "train": {"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "monitor": "hi"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    fails(
        ["train", str(tmp_path / "c.yaml"), *dry_run],
        capsys,
        f"{tmp_path / 'c.yaml'}: train.monitor",
        "no hi training label contains N",
    )
    assert not (tmp_path / "run").exists()
    # N is in no training structure at all: validation leaves those structures out entirely (as the test report
    # does), so their force MAE is never measured either
    argv = ["train", str(tmp_path / "c.yaml"), "--dry-run", "--set", "train.monitor_metric=forces_mae_meV_per_A"]
    fails(
        argv,
        capsys,
        "train.monitor_metric: every one of the",
        "validation structures with force labels at 'hi' holds N",
    )


def test_evaluate_names_the_structure_with_an_open_composition(tmp_path, caplog):
    """The warning names the structure by its number and key, not by its (structure, fidelity) pair's index."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    refs, _, _ = fit(_gaas_fidelities())
    pot = build_potential(TINY_MODEL, ["lo", "hi"])
    pot.head.set_baseline(refs.ref, refs.scale, refs.fitted, refs.null)
    save_potential(pot, tmp_path / "model.pt")
    frames = []
    for key, numbers, fidelities in [("gaas", [31, 33], ["lo", "hi"]), ("ga2as", [31, 33, 31], ["hi"])]:
        for fidelity in fidelities:  # pairs: (gaas, lo), (gaas, hi), (ga2as, hi)
            a = Atoms(numbers=numbers, positions=np.arange(3 * len(numbers)).reshape(-1, 3) * 0.9)
            a.info.update(key=key, fidelity=fidelity)
            a.calc = SinglePointCalculator(a, energy=-8.0 * len(numbers))
            frames.append(a)
    ase.io.write(tmp_path / "test.extxyz", frames, format="extxyz")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["evaluate", str(tmp_path / "model.pt"), str(tmp_path / "test.extxyz")]) == 0
    assert "1 structure(s) (1 (0-based, key ga2as)) hold Ga, As in proportions" in caplog.text


def test_a_fidelity_with_fewer_labels_than_elements_takes_the_shape_of_the_closest_fidelity():
    """GFN1-like labels on 4 molecules of 5 elements (no reference identified alone): the open composition is
    estimated from the fidelity whose references it resembles (GFN2-like, semi-empirical scale), not from the
    all-electron one the shift model's gauge sits at (that put a test molecule ~1 000 eV off)."""
    rng = np.random.default_rng(0)
    Z = [1, 6, 7, 8, 9]
    dft = {1: -13.6, 6: -1030.0, 7: -1486.0, 8: -2040.0, 9: -2710.0}
    gfn2 = {1: -10.7, 6: -48.0, 7: -71.0, 8: -103.0, 9: -130.0}
    gfn1 = {z: 1.03 * v - 0.5 for z, v in gfn2.items()}
    recs = []
    for i in range(60):
        numbers = rng.choice(Z, size=rng.integers(3, 12))
        labels = {"dft": sum(dft[int(z)] for z in numbers), "gfn2": sum(gfn2[int(z)] for z in numbers)}
        if i < 4:
            numbers = np.array([1, 1, 6, 7, 8, 9][: 3 + i] + [1, 6, 8][: i % 3 + 1])
            labels = {"dft": sum(dft[int(z)] for z in numbers), "gfn1": sum(gfn1[int(z)] for z in numbers)}
        labels = {k: {"energy": float(v)} for k, v in labels.items()}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    ds = FidelityDataset.from_records(recs)
    refs = fit_references(ds, labelled_pairs(ds, np.arange(len(ds))))
    k = list(ds.fidelities.names).index("gfn1")
    assert refs.open(k)  # the 4 labels leave a composition open
    test = [1, 1, 1, 1, 6, 6, 6, 7, 8, 9]
    assert abs(sum(refs.ref[z, k] - gfn1[z] for z in test)) < 0.5  # eV (was ≈ 1 010)


def test_evaluate_data_naming_a_fidelity_in_another_case(run_without_n, tmp_path, capsys):
    """Frames at 'LO' for a model with 'lo': both ways of calling evaluate say to write the model's name into the
    file (they used to send the user from one message to the other)."""
    from test_cli import fails

    run_dir, _, _ = run_without_n
    frames = [emt_labelled(rattled_molecule("H2O", 3), "LO")]
    ase.io.write(tmp_path / "upper.extxyz", frames, format="extxyz")
    fails(["evaluate", str(run_dir), str(tmp_path / "upper.extxyz")], capsys, "it has 'lo', equal up to case")
    fails(
        ["evaluate", str(run_dir), str(tmp_path / "upper.extxyz"), "--fidelity", "lo"],
        capsys,
        "write 'lo' into the file's info['fidelity']",
    )


@pytest.mark.parametrize("few", ["agfn1", "zgfn1"])  # before or after gfn2 in the (sorted) fidelity table
def test_an_element_the_few_labels_lack_is_estimated_whatever_the_order_of_fidelities(few):
    """As above, S labelled at 'dft' only: the few-label fidelity's S reference comes from the shape it resembles
    plus its shift, never from an unfilled entry of the other fidelity's column (it was −17 or −7 294 eV by the
    order of the fidelities)."""
    rng = np.random.default_rng(0)
    Z = [1, 6, 7, 8, 9, 16]
    dft = {1: -13.6, 6: -1030.0, 7: -1486.0, 8: -2040.0, 9: -2710.0, 16: -10850.0}
    gfn2 = {1: -10.7, 6: -48.0, 7: -71.0, 8: -103.0, 9: -130.0}
    gfn1 = {z: 1.03 * v - 0.5 for z, v in gfn2.items()}
    recs = []
    for i in range(60):
        numbers = rng.choice(Z, size=rng.integers(3, 12))
        labels = {"dft": sum(dft[int(z)] for z in numbers)}
        if 16 not in numbers:
            labels["gfn2"] = sum(gfn2[int(z)] for z in numbers)
        if i < 4:
            numbers = np.array([1, 1, 6, 7, 8, 9][: 3 + i] + [1, 6, 8][: i % 3 + 1])
            labels = {"dft": sum(dft[int(z)] for z in numbers), few: sum(gfn1[int(z)] for z in numbers)}
        labels = {k: {"energy": float(v)} for k, v in labels.items()}
        recs.append({"numbers": numbers, "positions": rng.normal(size=(len(numbers), 3)) * 3, "labels": labels})
    ds = FidelityDataset.from_records(recs)
    names = list(ds.fidelities.names)
    refs = fit_references(ds, labelled_pairs(ds, np.arange(len(ds))))
    k, g = names.index(few), names.index("gfn2")
    assert not refs.fitted[16, k] and not refs.fitted[16, g]
    assert abs(refs.ref[16, k] - refs.ref[16, g]) < 30.0  # next to gfn2's estimate (eV), not at 0 or at DFT's


def test_the_leave_one_out_error_of_an_estimate_is_reported_for_every_fidelity():
    """The error extend reports for an old fidelity's estimated reference of a new element: the gauge fidelity
    (most references: usually the old one) got NaN, said as 'unknown' although six elements were shared."""
    from multifi.data.stats import N_ELEMENTS, shared_estimates_with_error

    rng = np.random.default_rng(0)
    ref, fitted = np.zeros((N_ELEMENTS, 2)), np.zeros((N_ELEMENTS, 2), bool)
    old = [1, 6, 7, 8, 9, 15, 16, 17, 35, 53]
    ref[old, 0] = -13.6 * np.asarray(old, float) ** 1.3 + rng.normal(0, 0.3, len(old))
    fitted[old, 0] = True
    shared = old[:6]
    ref[shared + [34], 1] = -13.6 * np.asarray(shared + [34], float) ** 1.3 + 2.0 + rng.normal(0, 0.3, 7)
    fitted[shared + [34], 1] = True
    prior, loo = shared_estimates_with_error(ref, fitted)
    assert np.isfinite(loo).all() and (loo > 0).all() and (loo < 5).all(), loo
    assert prior[34, 0] != 0


def test_a_fidelity_whose_validation_energies_are_all_left_out_is_warned_about(caplog):
    """Every validation structure of a fidelity holds an element its training labels lack: its validation energy
    error is never measured (no curve), said once before training, not only by `multifi plot` afterwards."""
    from multifi.train.module import PotentialModule
    from multifi.train.preflight import warn_unmeasured_energies

    module = PotentialModule({"model": TINY_MODEL, "fidelities": ["lo", "hi"]}, {}, {"ema_decay": 0.0})
    ref = np.zeros((119, 2))
    ref[[1, 7, 8], 0] = -1.0
    ref[[1, 8], 1] = -1.1  # hi has no N reference of its own
    module.potential.head.set_baseline(ref, np.ones(2), ref != 0)
    mols = [rattled_molecule("NH3", 0), rattled_molecule("NH3", 1), rattled_molecule("H2O", 2)]
    recs = [
        {
            "numbers": m.numbers,
            "positions": m.positions,
            "key": f"m{i}",
            "labels": {"lo": {"energy": -5.0}, "hi": {"energy": -5.5}},
        }
        for i, m in enumerate(mols)
    ]
    ds = FidelityDataset.from_records(recs)
    val = np.array([[0, 0], [0, 1], [1, 1]])  # hi: NH3 only
    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_unmeasured_energies(ds, val, module.potential.head)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("hi: none of the 2 validation structures at 'hi' has a reference energy the training")
    assert "no hi training label contains N" in message and "never measured" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_unmeasured_energies(ds, np.array([[0, 1], [2, 1]]), module.potential.head)  # water at hi: measured
    assert not caplog.records
