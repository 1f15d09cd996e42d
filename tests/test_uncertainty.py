"""Uncertainty: readout features (the energy is linear in the last layer), LLPR against closed forms,
larger σ far from the training structures, calibration metrics, the side file, and the CLI
(`multifi calibrate`, `predict --uncertainty`, `evaluate --uncertainty`, ensembles)."""

from __future__ import annotations

import contextlib
import json

import ase.io
import numpy as np
import pytest
import torch
from ase.build import molecule
from conftest import MOLECULES, TINY_MODEL, emt_labelled, rattled_molecule
from test_cli import cli_run, fails, run  # noqa: F401  (module fixture: one tiny trained run)

from multifi.data.batch import graph_from_atoms
from multifi.errors import MultifiError
from multifi.keys import COUNT, ENERGY_MAE, ENERGY_RMSE, FORCES_MAE
from multifi.models.registry import build_potential, load_potential, save_potential
from multifi.uncertainty import (
    LLPR,
    calibration_metrics,
    fit_llpr_fidelity,
    llpr_path,
    miscalibration_area,
    readout_features,
    spearman,
    weights_fingerprint,
)


def tiny_potential(inject: str = "both", seed: int = 0):
    torch.manual_seed(seed)
    pot = build_potential({**TINY_MODEL, "fidelity_embedding": {"dim": 4, "inject": inject}}, ["lo", "hi"])
    ref = np.zeros((119, 2))
    ref[[1, 6, 7, 8], :] = np.random.default_rng(seed).normal(size=(4, 2))
    pot.head.set_baseline(ref, np.array([0.7, 1.3]))
    return pot.eval()


def test_ensemble_mean_is_the_mean_of_each_models_own_prediction():
    """EnsembleMean on a graph of the largest cutoff: energy, forces and stress the means of each model's prediction on
    its own cutoff's graph at the fidelity of the same name (the models list the fidelities in other orders); a
    fidelity a model lacks is an error naming it."""
    from ase.build import bulk

    from multifi.uncertainty import EnsembleMean

    torch.manual_seed(0)
    models = []
    for names, cutoff in ((["lo", "hi"], 4.0), (["hi", "lo"], 3.0), (["hi", "lo", "mid"], 3.5)):
        pot = build_potential({**TINY_MODEL, "cutoff": cutoff}, names).double().eval()
        pot.head.set_baseline(np.random.default_rng(len(models)).normal(size=(119, len(names))), np.ones(len(names)))
        models.append(pot)
    structures = [rattled_molecule("CH3OH", 3), bulk("Cu", "fcc", 3.6, cubic=True)]
    structures[1].rattle(0.05, seed=1)

    def predicted(pot, cutoff, name):
        g = graph_from_atoms(structures, cutoff, pot.fidelities.index(name), dtype=next(pot.parameters()).dtype)
        return pot(g, forces=True, stress=True)

    ensemble = EnsembleMean(models)
    assert ensemble.cutoff == 4.0
    for name in ("lo", "hi"):
        got = predicted(ensemble, 4.0, name)
        own = [predicted(m, m.cutoff, name) for m in models]
        assert set(got) == {"energy", "forces", "stress"}
        for key in got:
            want = torch.stack([o[key] for o in own]).mean(0)
            torch.testing.assert_close(got[key], want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(own[0]["energy"], own[1]["energy"])
    with pytest.raises(MultifiError, match="ensemble member 2 has no fidelity 'mid'"):
        EnsembleMean([models[2], models[0]])(graph_from_atoms(structures, 4.0, 2, dtype=torch.float64))
    # members of two precisions (a model trained in float64 stays so when loaded), either first
    single = models[1].float()
    for pair in ([models[0], single], [single, models[0]]):
        got = predicted(EnsembleMean(pair), 4.0, "hi")
        want = [predicted(m, m.cutoff, "hi") for m in pair]
        for key in got:
            assert got[key].dtype == torch.float64
            mean = (want[0][key].double() + want[1][key].double()) / 2
            torch.testing.assert_close(got[key], mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inject", ["both", "readout", "input", "heads", "onehot", "single"])
def test_energy_is_linear_in_the_last_layer_with_readout_features(inject):
    """E = scale_k · f·[w, b] + Σ ref: f is exactly the energy's gradient with respect to the last layer."""
    pot = tiny_potential(inject)
    mols = [rattled_molecule(n, i) for i, n in enumerate(MOLECULES)]
    g = graph_from_atoms(mols, pot.cutoff, 1)
    f, e = readout_features(pot, g)
    k = 0 if inject == "single" else 1
    last = pot.head.mlps[1 if inject == "heads" else 0][-1]
    assert f.shape == (len(mols), last.in_features + 1)
    np.testing.assert_allclose(f[:, -1].numpy(), [len(m) for m in mols])
    torch.testing.assert_close(e, pot(g)["energy"], rtol=0, atol=1e-9)
    wb = torch.cat([last.weight.detach().double().flatten(), last.bias.detach().double()])
    ref = torch.zeros(len(mols), dtype=torch.float64).index_add_(0, g.batch, pot.head.ref[g.numbers, k])
    torch.testing.assert_close(pot.head.scale[k] * (f @ wb) + ref, e, rtol=0, atol=1e-5)
    if inject != "single":  # the fidelity enters the features
        f_lo, _ = readout_features(pot, graph_from_atoms(mols, pot.cutoff, 0))
        assert not torch.allclose(f_lo, f)


def test_llpr_closed_form_one_feature():
    """F = [1, 2], λ = 1: Σ = 1/6; one validation point f = 3 with error 0.5: α² = 0.25 / (9/6), σ = |error|."""
    p = fit_llpr_fidelity(np.array([[1.0], [2.0]]), np.array([[3.0]]), np.array([0.5]), ridge=1.0)
    assert p.cov[0, 0] == pytest.approx(1 / 6)
    assert p.alpha == pytest.approx(np.sqrt(0.25 / 1.5))
    assert p.sigma(np.array([[3.0]]))[0] == pytest.approx(0.5)
    assert p.sigma(np.array([[6.0]]))[0] == pytest.approx(1.0)  # linear in |f|


def test_llpr_matches_direct_inverse_and_maximises_likelihood():
    rng = np.random.default_rng(3)
    F, fv = rng.normal(size=(40, 5)), rng.normal(size=(15, 5))
    err = rng.normal(0, 0.1, 15)
    p = fit_llpr_fidelity(F, fv, err, ridge=0.3)
    cov = np.linalg.inv(F.T @ F + 0.3 * np.eye(5))
    np.testing.assert_allclose(p.cov, cov, rtol=1e-10, atol=1e-12)
    u = np.sqrt(np.einsum("ni,ij,nj->n", fv, cov, fv))
    np.testing.assert_allclose(p.sigma(fv), p.alpha * u, rtol=1e-10)

    def nll(alpha):
        s = alpha * u
        return np.mean(np.log(s**2) + err**2 / s**2)

    assert nll(p.alpha) < min(nll(1.1 * p.alpha), nll(p.alpha / 1.1))
    grid = fit_llpr_fidelity(F, fv, err)  # λ from the grid: at least as likely as the fixed one
    s = grid.sigma(fv)
    assert np.mean(np.log(s**2) + err**2 / s**2) <= nll(p.alpha) + 1e-9


def test_ridge_goes_beyond_the_grid_while_the_likelihood_improves():
    """Validation errors proportional to the features' norm are likeliest as λ → ∞ (σ ∝ |f|): the search goes on past
    the grid's top to RIDGE_LIMIT and says it stopped there; errors that need no such ridge stay inside the grid."""
    from multifi.uncertainty import RIDGE_GRID, RIDGE_LIMIT

    rng = np.random.default_rng(5)
    F = rng.normal(size=(60, 4)) * [1.0, 1.0, 1.0, 0.01]  # training features leave the last direction out
    fv = rng.normal(size=(30, 4))
    scale = np.trace(F.T @ F) / 4
    norm_only = fit_llpr_fidelity(F, fv, 0.2 * np.linalg.norm(fv, axis=1) * rng.choice([-1, 1], 30))
    assert norm_only.ridge_at_limit and norm_only.ridge == pytest.approx(RIDGE_LIMIT * scale)
    top = fit_llpr_fidelity(F, fv, 0.2 * np.linalg.norm(fv, axis=1), ridge=RIDGE_GRID[-1] * scale)
    nll = lambda p: np.mean(np.log(p.sigma(fv) ** 2) + (0.2 * np.linalg.norm(fv, axis=1)) ** 2 / p.sigma(fv) ** 2)  # noqa: E731
    assert nll(norm_only) < nll(top)
    covered = fit_llpr_fidelity(F, fv, 0.3 * fv[:, 3])  # errors along the direction training left out
    assert not covered.ridge_at_limit and covered.ridge <= RIDGE_GRID[-1] * scale


def test_a_ridge_at_the_limit_is_saved_and_said_where_sigma_is_used(tmp_path, caplog):
    """The calibration file keeps that a fidelity's ridge ended at the limit (only calibrate said it): σ's users
    (predict, evaluate, the calculator through LLPR.of) say it once; files without the flag read as before."""
    import logging

    from multifi.uncertainty import LLPR

    rng = np.random.default_rng(5)
    F = rng.normal(size=(60, 4)) * [1.0, 1.0, 1.0, 0.01]
    fv = rng.normal(size=(30, 4))
    at_limit = fit_llpr_fidelity(F, fv, 0.2 * np.linalg.norm(fv, axis=1) * rng.choice([-1, 1], 30))
    inside = fit_llpr_fidelity(F, fv, 0.3 * fv[:, 3])
    LLPR({"lo": at_limit, "hi": inside}, "fp").save(tmp_path / "m.llpr.npz")
    back = LLPR.load(tmp_path / "m.llpr.npz")
    assert back.fidelities["lo"].ridge_at_limit and not back.fidelities["hi"].ridge_at_limit
    with caplog.at_level(logging.WARNING, logger="multifi"):
        back.of("hi")
        back.of("lo")
        back.of("lo")
    assert caplog.text.count("lo: σ calibrated at the largest ridge") == 1 and "hi: σ" not in caplog.text
    with np.load(tmp_path / "m.llpr.npz") as z:  # a file of the earlier layout: four numbers per fidelity
        old = {k: z[k][:4] if k.startswith("meta") else z[k] for k in z.files}
    np.savez(tmp_path / "old.llpr.npz", **old)
    assert not LLPR.load(tmp_path / "old.llpr.npz").fidelities["lo"].ridge_at_limit


def test_sigma_larger_far_from_the_training_structures():
    """LLPR on rattled H2O/CH4/NH3: compressed molecules and unseen ones get larger σ than any training one."""
    pot = tiny_potential()
    feats = lambda ms: readout_features(pot, graph_from_atoms(ms, pot.cutoff, 1))[0].numpy()
    train = [rattled_molecule(n, i) for i in range(6) for n in ("H2O", "CH4", "NH3")]
    val = [rattled_molecule(n, 100 + i) for i in range(3) for n in ("H2O", "CH4", "NH3")]
    p = fit_llpr_fidelity(feats(train), feats(val), np.random.default_rng(0).normal(0, 0.05, len(val)))
    far = []
    for n in ("H2O", "CH4", "NH3"):
        a = molecule(n)
        a.positions *= 0.6
        far.append(a)
    far += [molecule(n) for n in ("C2H6", "CH3OH", "HCN")]
    s_train, s_far = p.sigma(feats(train)), p.sigma(feats(far))
    assert s_far.min() > 1.5 * s_train.max()


def test_calibration_metrics():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.01, 1.0, 20000)
    err = rng.normal(0, sigma)
    m = calibration_metrics(err, sigma)
    assert m["n"] == 20000 and m["miscalibration_area"] < 0.01 and m["spearman"] > 0.3
    assert miscalibration_area(err, 10 * sigma) > 0.3  # far too wide
    assert miscalibration_area(err, sigma / 10) > 0.3  # far too narrow
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 2, 3.0]), np.array([3, 2, 2, 1.0])) == pytest.approx(-1.0)  # ties


def test_side_file_round_trip_and_stale_model(tmp_path):
    pot = tiny_potential()
    save_potential(pot, tmp_path / "model.pt")
    rng = np.random.default_rng(1)
    p = fit_llpr_fidelity(rng.normal(size=(20, 9)), rng.normal(size=(5, 9)), rng.normal(size=5))
    path = LLPR({"hi": p}, weights_fingerprint(pot)).save(llpr_path(tmp_path / "model.pt"))
    assert path.name == "model.llpr.npz"
    back = LLPR.load(path, load_potential(tmp_path / "model.pt"))
    np.testing.assert_array_equal(back.of("hi").cov, p.cov)
    assert back.of("hi").alpha == p.alpha and back.of("hi").n_train == 20
    with pytest.raises(MultifiError, match="no LLPR calibration for fidelity 'lo'"):
        back.of("lo", "x")
    with torch.no_grad():
        pot.head.mlps[0][-1].bias += 1.0
    with pytest.raises(MultifiError, match="other model weights"):
        LLPR.load(path, pot)


# ---------------------------------------------------------------------------------------------- CLI
@contextlib.contextmanager
def caplog_at_warning():
    """multifi's warnings (messages) while the block runs."""
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, logger = Keep(level=logging.WARNING), logging.getLogger("multifi")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_calibrate_predict_and_evaluate_with_uncertainty(cli_run, tiny_extxyz, tmp_path, capsys):  # noqa: F811
    _, run_dir = cli_run
    mols = [rattled_molecule("CH3OH", 5), rattled_molecule("H2O", 6)]
    src = tmp_path / "in.xyz"
    ase.io.write(src, mols)
    fails(
        ["predict", run_dir / "model.pt", src, "--fidelity", "hi", "--out", tmp_path / "p.extxyz", "--uncertainty"],
        capsys,
        "model.llpr.npz",
        "multifi calibrate",
    )
    import multifi

    with pytest.raises(multifi.MultifiError, match="model.llpr.npz: no LLPR calibration next to the model"):
        multifi.Calculator(run_dir / "model.pt", fidelity="hi", uncertainty=True)
    # evaluate refuses before it evaluates: no error table first, no metrics file
    code, out, err = run(["evaluate", run_dir, tiny_extxyz, "--uncertainty", "--out", tmp_path / "u.json"], capsys)
    assert code == 2 and "no LLPR calibration next to the model" in err and "MAE" not in out
    assert not (tmp_path / "u.json").exists()
    code, out, _ = run(["calibrate", run_dir], capsys)
    assert code == 0 and "hi: alpha" in out and "lo: alpha" in out and (run_dir / "model.llpr.npz").exists()
    pred = tmp_path / "pred.extxyz"
    code, _, _ = run(["predict", run_dir / "model.pt", src, "--fidelity", "hi", "--out", pred, "--uncertainty"], capsys)
    assert code == 0
    frames = ase.io.read(pred, ":")
    assert all(a.info["uncertainty"] == "llpr" and a.info["energy_sigma"] > 0 for a in frames)
    # the calculator's σ (MD with an uncertainty watch) is predict's, at the fidelity it is set to
    calc = multifi.Calculator(run_dir / "model.pt", fidelity="hi", uncertainty=True)
    for atoms, written in zip(mols, frames):
        atoms = atoms.copy()
        atoms.calc = calc
        assert calc.get_property("energy_sigma", atoms) == pytest.approx(written.info["energy_sigma"], rel=1e-5)
        assert atoms.get_potential_energy() == pytest.approx(written.get_potential_energy(), abs=1e-5)
    calc.fidelity = "lo"
    assert calc.get_property("energy_sigma", atoms) != pytest.approx(written.info["energy_sigma"], rel=1e-3)
    with pytest.raises(multifi.MultifiError, match="uncertainty needs the model file"):
        multifi.Calculator(load_potential(run_dir / "model.pt"), fidelity="hi", uncertainty=True)
    plain = multifi.Calculator(run_dir / "model.pt", fidelity="hi")
    with pytest.raises(multifi.MultifiError, match="energy_sigma needs Calculator"):
        plain.get_property("energy_sigma", atoms)
    metrics = tmp_path / "m.json"
    code, out, _ = run(["evaluate", run_dir / "model.pt", tiny_extxyz, "--uncertainty", "--out", metrics], capsys)
    assert code == 0 and "Spearman" in out
    uq = json.loads(metrics.read_text())["uncertainty"]
    assert uq["method"] == "llpr" and set(uq["fidelities"]) == {"lo", "hi"}
    assert all(-1 <= v["spearman"] <= 1 and 0 <= v["miscalibration_area"] <= 0.5 for v in uq["fidelities"].values())
    # a calibration without the fidelity evaluated: refused before the evaluation too
    import shutil

    from multifi.uncertainty import LLPR, llpr_path

    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(run_dir / "model.pt", part / "model.pt")
    full = LLPR.load(llpr_path(run_dir / "model.pt"))
    LLPR({"lo": full.of("lo")}, full.fingerprint).save(llpr_path(part / "model.pt"))
    code, out, err = run(["evaluate", part / "model.pt", tiny_extxyz, "--fidelity", "hi", "--uncertainty"], capsys)
    assert code == 2 and "no LLPR calibration for fidelity 'hi' (calibrated: lo)" in err and "MAE" not in out

    # a deep ensemble: the mean energy and the standard deviation of two models
    other = tiny_potential(seed=5)
    ref = load_potential(run_dir / "model.pt")
    other.head.set_baseline(ref.head.ref.numpy(), ref.head.scale.numpy(), ref.head.fitted.numpy())  # same labels
    save_potential(other, tmp_path / "other.pt")
    ens = tmp_path / "ens.extxyz"
    code, _, _ = run(
        [
            "predict",
            run_dir / "model.pt",
            src,
            "--fidelity",
            "hi",
            "--out",
            ens,
            "--uncertainty",
            "--ensemble",
            tmp_path / "other.pt",
        ],
        capsys,
    )
    assert code == 0
    from multifi.predict import predict_atoms

    e1, _, _ = predict_atoms(ref, mols, "hi")
    e2, _, _ = predict_atoms(other, mols, "hi")
    for a, x, y in zip(ase.io.read(ens, ":"), e1, e2):
        assert a.get_potential_energy() == pytest.approx((x + y) / 2, rel=1e-6)
        assert a.info["energy_sigma"] == pytest.approx(abs(x - y) / np.sqrt(2), rel=1e-5)
        assert a.info["uncertainty"] == "ensemble of 2"
        # every model, as given (runs/s1/model.pt and runs/s2/model.pt stay apart), not the first alone
        assert a.info["predicted_by"].endswith(f": the mean of {run_dir / 'model.pt'} + {tmp_path / 'other.pt'}")
    at_hi = ["evaluate", run_dir / "model.pt", tiny_extxyz, "--fidelity", "hi"]
    import multifi.uncertainty

    def second_pass(*args, **kwargs):
        raise AssertionError("the ensemble's members ran again for the uncertainty statistics")

    with pytest.MonkeyPatch.context() as mp:  # the members' energies of the evaluation are those σ is taken from
        mp.setattr(multifi.uncertainty, "dataset_features", second_pass)
        code, out, _ = run([*at_hi, "--ensemble", tmp_path / "other.pt", "--out", metrics, "--force"], capsys)
    report = json.loads(metrics.read_text())
    uq = report["uncertainty"]
    assert code == 0 and uq["method"] == "ensemble of 2" and set(uq["fidelities"]) == {"hi"}
    # the headline is the ensemble's prediction, the mean of its models (as predict --ensemble writes it): its
    # energy and force errors against the labels, computed here from each model's own predictions
    assert f"the mean of {run_dir / 'model.pt'} + {tmp_path / 'other.pt'} on " in out
    frames = [a for a in ase.io.read(tiny_extxyz, ":") if a.info["fidelity"] == "hi"]
    (e1, f1, _), (e2, f2, _) = (predict_atoms(m, frames, "hi") for m in (ref, other))
    energy_err = (np.asarray(e1) + np.asarray(e2)) / 2 - [a.get_potential_energy() for a in frames]
    force_err = np.concatenate([(a + b) / 2 - t.get_forces() for a, b, t in zip(f1, f2, frames)])
    hi = report["fidelities"]["hi"]
    assert hi[COUNT] == len(frames)
    # σ of each structure: the spread of the two models' own energies (ddof 1)
    sigma = np.abs(np.asarray(e1) - np.asarray(e2)) / np.sqrt(2)
    assert uq["fidelities"]["hi"]["n"] == len(frames)
    assert uq["fidelities"]["hi"]["mean_sigma_meV"] == pytest.approx(1000 * sigma.mean(), rel=1e-5)
    assert uq["fidelities"]["hi"]["rmse_meV"] == pytest.approx(hi[ENERGY_RMSE], rel=1e-6)
    assert hi[ENERGY_RMSE] == pytest.approx(1000 * np.sqrt(np.mean(energy_err**2)), rel=1e-5)
    assert hi[ENERGY_MAE] == pytest.approx(1000 * np.mean(np.abs(energy_err)), rel=1e-5)
    assert hi[FORCES_MAE] == pytest.approx(1000 * np.mean(np.abs(force_err)), rel=1e-5)
    alone = run([*at_hi, "--out", metrics, "--force"], capsys)
    assert alone[0] == 0 and json.loads(metrics.read_text())["fidelities"]["hi"][ENERGY_RMSE] != hi[ENERGY_RMSE]
    assert report["evaluated"] == f"the mean of {run_dir / 'model.pt'} + {tmp_path / 'other.pt'}"
    # labels that are one member's own predictions (its predict output): they differ from the mean, and were not
    # said to be a model's own results; now each member's predictions are compared too

    own = tmp_path / "own.extxyz"
    assert run(["predict", run_dir / "model.pt", tiny_extxyz, "--fidelity", "hi", "--out", own], capsys)[0] == 0
    frames = ase.io.read(own, ":")
    for a in frames:
        a.info["fidelity"] = "hi"
    ase.io.write(own, frames, format="extxyz")
    with caplog_at_warning() as records:
        as_labels = ["--energy-key", "energy", "--forces-key", "forces"]  # predictions taken as labels, on purpose
        code, _, err = run(
            ["evaluate", run_dir / "model.pt", own, *as_labels, "--ensemble", tmp_path / "other.pt"], capsys
        )
    assert code == 0, err
    said = [m for m in records if "equals this model's prediction" in m]
    assert len(said) == 1 and f"(against ensemble member 1, {run_dir / 'model.pt'})" in said[0], records
    # a member that never saw oxygen (or whose references at the evaluated fidelity cover other elements) would
    # add its eV-scale guesses to the mean: refused, naming it, before anything is evaluated or written
    for column, message in (
        (slice(None), "O seen by one only"),
        (1, "the reference energies of O at 'hi' fitted by one only"),
    ):
        refs, fitted = ref.head.ref.numpy().copy(), ref.head.fitted.numpy().copy()
        refs[8, column], fitted[8, column] = 0.0, False
        other.head.set_baseline(refs, ref.head.scale.numpy(), fitted)
        save_potential(other, tmp_path / "other_o.pt")
        fails(
            [*at_hi, "--ensemble", tmp_path / "other_o.pt"],
            capsys,
            f"{tmp_path / 'other_o.pt'}: ensemble member trained on other labels than",
            message,
        )
    # an element the evaluated structures do not hold (iron) known to one member only: no matter
    refs, fitted = ref.head.ref.numpy().copy(), ref.head.fitted.numpy().copy()
    refs[26], fitted[26] = -3.0, True
    other.head.set_baseline(refs, ref.head.scale.numpy(), fitted)
    save_potential(other, tmp_path / "other_fe.pt")
    assert run([*at_hi, "--ensemble", tmp_path / "other_fe.pt"], capsys)[0] == 0


def test_damaged_files_of_a_run_are_one_line_errors(cli_run, tmp_path, capsys):  # noqa: F811
    """A cut or empty LLPR side file (predict --uncertainty) and a cut dataset.npz (calibrate) were zipfile
    tracebacks; now one line naming the file; calibrate replaces an unreadable side file instead of failing on it."""
    import shutil

    _, run_dir = cli_run
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    side = bad / "model.llpr.npz"
    if not side.exists():
        assert run(["calibrate", bad], capsys)[0] == 0
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    argv = ["predict", bad, src, "--fidelity", "hi", "--uncertainty", "--out", tmp_path / "o.extxyz", "--force"]
    for damaged in (side.read_bytes()[: side.stat().st_size // 2], b""):
        side.write_bytes(damaged)
        fails(argv, capsys, f"{side}: not an LLPR calibration file")
    assert run(["calibrate", bad], capsys)[0] == 0  # replaced
    # --fidelity names the fidelity of files without one: with a run directory it would be ignored (every fidelity
    # recalibrated, even an unknown name accepted)
    fails(["calibrate", bad, "--fidelity", "PBE"], capsys, f"{bad}: --fidelity applies to --train/--val files")
    assert run(argv, capsys)[0] == 0
    data = bad / "dataset.npz"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    fails(["calibrate", bad], capsys, f"{data}: not a multifi dataset file")


def test_calibrate_files_hold_out_validation_and_keep_other_fidelities(cli_run, tmp_path, capsys, caplog):  # noqa: F811
    """File mode: validation identical to training is an error, a partial overlap is named; a fidelity without
    validation labels is left uncalibrated (not α = 1); recalibrating one fidelity keeps the others'."""
    import shutil

    from conftest import emt_labelled

    _, run_dir = cli_run
    model = tmp_path / "model.pt"
    shutil.copy(run_dir / "model.pt", model)
    mols = [rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=700 + i) for i in range(40)]
    lo = [emt_labelled(a, "lo") for a in mols]
    hi = [emt_labelled(a, "hi", scale=1.1, per_atom=0.3) for a in mols]
    files = {
        "train": lo[:30] + hi[:30],
        "val": lo[30:] + hi[30:] + lo[:5] + hi[:5],
        "val_lo": lo[30:],
        "train_lo": lo[:30],
        "train_lo_hi": lo[:30] + hi[10:30],
        "val_hi": hi[:10],  # geometries trained at lo only: held-out labels at hi
    }
    for name, frames in files.items():
        ase.io.write(tmp_path / f"{name}.extxyz", frames, format="extxyz")
    args = ["calibrate", model, "--train", tmp_path / "train.extxyz", "--val"]
    fails(["calibrate", tmp_path / "runs" / "gone"], capsys, "gone: no such model file or run directory")
    fails([*args, tmp_path / "train.extxyz"], capsys, "every validation label is also in --train")
    # --fidelity of the model that no structure of the files names: the files and the reason, not "unknown fidelity"
    lo_only = ["calibrate", model, "--train", tmp_path / "train_lo.extxyz", "--val", tmp_path / "val_lo.extxyz"]
    fails(
        [*lo_only, "--fidelity", "hi"], capsys, "train_lo.extxyz", "no labels at 'hi'", "name their own fidelity (lo)"
    )
    fails([*lo_only, "--fidelity", "mid"], capsys, "model.pt", "mid")  # one the model lacks: named by the model file
    assert not (tmp_path / "model.llpr.npz").exists()
    with caplog.at_level("INFO", logger="multifi"):
        code, out, _ = run([*args, tmp_path / "val.extxyz"], capsys)
    assert code == 0 and "10 of 30 validation labels are also in --train" in caplog.text
    assert "model.pt has no run beside it recording what it trained on" in caplog.text  # a copied model file
    assert "hi: alpha" in out and "30 training / 10 validation" in out
    # --train with keys, --val without: its copies of training molecules are found by geometry (rotated too)
    keyed = [a.copy() for a in lo[:30]]
    for i, a in enumerate(keyed):
        a.calc = lo[i].calc
        a.info = {**lo[i].info, "key": f"t{i}"}
    rotated = [a.copy() for a in lo[:5]]
    for a, b in zip(rotated, lo[:5]):
        a.rotate(30, "z")
        a.calc = b.calc
    ase.io.write(tmp_path / "train_keyed.extxyz", keyed, format="extxyz")
    ase.io.write(tmp_path / "val_nokey.extxyz", lo[30:] + rotated, format="extxyz")
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        argv = ["calibrate", model, "--train", tmp_path / "train_keyed.extxyz", "--val", tmp_path / "val_nokey.extxyz"]
        code, out, _ = run([*argv, "--fidelity", "lo"], capsys)
    assert code == 0 and "5 of 15 validation labels are also in --train" in caplog.text
    assert "30 training / 10 validation" in out
    first = LLPR.load(tmp_path / "model.llpr.npz")
    caplog.clear()
    with caplog.at_level("INFO", logger="multifi"):
        code, out, _ = run(
            ["calibrate", model, "--train", tmp_path / "train_lo.extxyz", "--val", tmp_path / "val_lo.extxyz"], capsys
        )
    assert code == 0 and "lo: alpha" in out and "hi: alpha" not in out
    assert (
        "kept the earlier calibration of hi" in caplog.text and "replaced the earlier calibration of lo" in caplog.text
    )
    both = LLPR.load(tmp_path / "model.llpr.npz")
    assert set(both.fidelities) == {"lo", "hi"}
    np.testing.assert_array_equal(both.of("hi").cov, first.of("hi").cov)
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):  # 'hi' has training labels but no validation ones
        code, out, _ = run(
            ["calibrate", model, "--train", tmp_path / "train.extxyz", "--val", tmp_path / "val_lo.extxyz"], capsys
        )
    assert code == 0 and "hi: no validation energy labels: not calibrated" in caplog.text and "hi: alpha" not in out
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):  # the same geometries, another fidelity: held out
        code, out, _ = run(
            ["calibrate", model, "--train", tmp_path / "train_lo_hi.extxyz", "--val", tmp_path / "val_hi.extxyz"],
            capsys,
        )
    assert code == 0 and "hi: alpha" in out and "20 training / " in out  # (some left out: estimated references)
    assert "also in --train" not in caplog.text
    ase.io.write(tmp_path / "val_two.extxyz", lo[30:32], format="extxyz")
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):  # two validation structures: alpha said to be rough
        code, out, _ = run(
            ["calibrate", model, "--train", tmp_path / "train_lo.extxyz", "--val", tmp_path / "val_two.extxyz"], capsys
        )
    assert code == 0 and "lo: alpha is calibrated on 2 validation structure(s): a rough estimate" in caplog.text
    # validation labels of another method (or unit) calibrated α to thousands and replaced the good calibration:
    # an error, the calibration kept
    other = [emt_labelled(a, "lo", per_atom=5.0) for a in mols[30:]]  # 5 eV/atom off: another method's totals
    ase.io.write(tmp_path / "val_ha.extxyz", other, format="extxyz")
    kept = (tmp_path / "model.llpr.npz").read_bytes()
    fails(
        ["calibrate", model, "--train", tmp_path / "train_lo.extxyz", "--val", tmp_path / "val_ha.extxyz"],
        capsys,
        "val_ha.extxyz: the model's energies miss the validation labels at 'lo' by",
        "no calibration written",
    )
    assert (tmp_path / "model.llpr.npz").read_bytes() == kept
    # labels at a fidelity the model does not know (fit_llpr skips them) do not stop the check, nor with --fidelity
    extra = [emt_labelled(a, "xx", per_atom=5.0) for a in mols[30:]]
    ase.io.write(tmp_path / "val_xx.extxyz", lo[30:] + extra, format="extxyz")
    for more in ([], ["--fidelity", "lo"]):
        argv = ["calibrate", model, "--train", tmp_path / "train_lo.extxyz", "--val", tmp_path / "val_xx.extxyz"]
        code, out, err = run([*argv, *more], capsys)
        assert code == 0 and "lo: alpha" in out, err
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):  # hi validation labels, no hi training structures: said
        argv = ["calibrate", model, "--train", tmp_path / "train_lo.extxyz", "--val", tmp_path / "val.extxyz"]
        code, out, _ = run(argv, capsys)
    assert code == 0 and "hi: 15 validation labels but no training structures: not calibrated" in caplog.text


def test_calibrate_leaves_out_validation_labels_the_model_trained_on(cli_run, tmp_path, capsys, caplog):  # noqa: F811
    """--val labels that the model's run trained on (by its record beside the model, whatever --train holds) would
    calibrate α too small: left out and said; all of them: a one-line error, nothing written."""
    import shutil

    from conftest import tiny_frames

    from multifi.data.readers.ase_files import frame_key

    _, run_dir = cli_run
    model = tmp_path / "run" / "model.pt"  # a copy of the run: its own calibration stays as it is
    shutil.copytree(run_dir, model.parent, ignore=shutil.ignore_patterns("*.llpr.npz"))
    splits = json.loads((run_dir / "splits.json").read_text())
    frames = tiny_frames()
    keyed = [(frame_key(a), a) for a in frames]
    trained = [a for k, a in keyed if k in set(splits["train"])]
    held = [a for k, a in keyed if k in set(splits["val"])]
    assert len(trained) > 10 and len(held) >= 5
    ase.io.write(tmp_path / "train.extxyz", trained[5:], format="extxyz")
    ase.io.write(tmp_path / "val.extxyz", held + trained[:5], format="extxyz")
    with caplog.at_level("WARNING", logger="multifi"):
        args = ["calibrate", model, "--train", tmp_path / "train.extxyz", "--val", tmp_path / "val.extxyz"]
        assert run(args, capsys)[0] == 0
    assert f"5 of {len(held) + 5} validation labels are ones the model trained on" in caplog.text
    ase.io.write(tmp_path / "seen.extxyz", trained[:5], format="extxyz")
    (model.parent / "model.llpr.npz").unlink()
    fails(
        ["calibrate", model, "--train", tmp_path / "train.extxyz", "--val", tmp_path / "seen.extxyz"],
        capsys,
        "every validation label is one the model trained on",
    )
    assert not (model.parent / "model.llpr.npz").exists()
    # a run without a copy of its data knows its split's keys only: labels at a fidelity its structures may never
    # have trained at (new hi labels of molecules trained at lo alone) stay validation, said
    from conftest import emt_labelled

    (model.parent / "dataset.npz").unlink()
    only_lo = [
        a
        for a in trained
        if a.info["fidelity"] == "lo"
        and not any(b.info["fidelity"] == "hi" and frame_key(b) == frame_key(a) for b in trained)
    ]
    new_hi = [emt_labelled(a.copy(), "hi", scale=1.1, per_atom=0.3) for a in only_lo[:6]]
    ase.io.write(tmp_path / "new_hi.extxyz", new_hi, format="extxyz")
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        args = ["calibrate", model, "--train", tmp_path / "train.extxyz", "--val", tmp_path / "new_hi.extxyz"]
        code, out, _ = run(args, capsys)
    assert code == 0 and "6 validation label(s) belong to structures in the model's training split" in caplog.text
    assert "has no run beside it" not in caplog.text  # its run records its split
    assert "hi: alpha" in out and "every validation label" not in caplog.text


def test_ensemble_of_identical_models_is_no_uncertainty(cli_run, tmp_path, capsys):  # noqa: F811
    _, run_dir = cli_run
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("CH3OH", 5), rattled_molecule("H2O", 6)])
    model = run_dir / "model.pt"
    args = ["predict", model, src, "--fidelity", "hi", "--out", tmp_path / "p.extxyz", "--uncertainty"]
    fails([*args, "--ensemble", model], capsys, f"{model}: the same weights as {model}")
    assert not (tmp_path / "p.extxyz").exists()
    # a copy among three members: an error in predict as in evaluate (predict only warned)
    other = load_potential(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    save_potential(other, tmp_path / "other.pt")
    fails([*args, "--ensemble", tmp_path / "other.pt", model], capsys, f"{model}: the same weights as {model}")
    # evaluate: refused before any table is printed (a table then an error read like a result)
    labelled = tmp_path / "l.extxyz"
    ase.io.write(labelled, [emt_labelled(rattled_molecule("H2O", k), "hi") for k in range(3)], format="extxyz")
    fails(["evaluate", model, labelled, "--ensemble", model], capsys, f"{model}: the same weights as {model}")
    code, stdout, _ = run(["evaluate", model, labelled, "--ensemble", model], capsys)
    assert code == 2 and "MAE" not in stdout


def test_calibration_leaves_out_validation_structures_with_estimated_references(tmp_path, caplog):
    """A validation structure with an element whose reference energy at the fidelity was estimated errs by
    that reference's error, which σ cannot describe: it is left out of α and λ (said so), as in validation."""
    from conftest import emt_labelled

    from multifi.data.dataset import FidelityDataset
    from multifi.uncertainty import fit_llpr

    torch.manual_seed(0)
    pot = build_potential(TINY_MODEL, ["lo", "hi"])
    ref = np.zeros((119, 2))
    ref[[1, 6, 7], :] = [[-0.5, -0.6], [-3.0, -3.1], [-1.0, -1.2]]
    fitted = ref != 0
    fitted[7, 1] = False  # N at hi: estimated from lo
    pot.head.set_baseline(ref, np.ones(2), fitted)
    frames = [emt_labelled(rattled_molecule(m, i), "hi") for i in range(12) for m in ("CH4", "NH3")]
    ds = FidelityDataset.from_records(
        [
            {"numbers": a.numbers, "positions": a.positions, "labels": {"hi": {"energy": a.get_potential_energy()}}}
            for a in frames
        ]
    )
    k = ds.fidelities.index("hi")
    pairs = lambda idx: np.stack([np.asarray(idx), np.full(len(idx), k)], 1)  # noqa: E731
    ch4 = np.arange(0, len(ds), 2)
    train, val = pairs(ch4[:8]), pairs(np.arange(16, len(ds)))  # validation: 4 CH4, 4 NH3
    with caplog.at_level("WARNING", logger="multifi"):
        llpr = fit_llpr(pot, ds, train, val)
    assert "hi: 4 of 8 validation structures contain elements whose reference energy was estimated" in caplog.text
    alone = fit_llpr(pot, ds, train, pairs(ch4[8:]))  # the same fit as on the 4 CH4 alone
    assert llpr.fidelities["hi"].alpha == pytest.approx(alone.fidelities["hi"].alpha)

    # evaluate --uncertainty's statistics leave them out too (they included them: numbers calibrate never saw)
    from multifi.uncertainty import llpr_path, uncertainty_models, uncertainty_report

    model = save_potential(pot, tmp_path / "model.pt")
    llpr.save(llpr_path(model))
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        report = uncertainty_report(uncertainty_models(model, pot, [], ["hi"]), ds, val)
    assert report["fidelities"]["hi"]["n"] == 4
    assert "hi: 4 of 8 structures contain elements whose reference energy was estimated: left out" in caplog.text


def test_uncertainty_of_one_structure_is_valid_json_and_said_to_mean_little(cli_run, tmp_path, capsys, caplog):  # noqa: F811
    """evaluate --uncertainty on one structure wrote "spearman": NaN (no JSON: strict parsers reject the file), and
    on two a Spearman of 1.000 without a word."""
    import logging

    _, run_dir = cli_run
    if not (run_dir / "model.llpr.npz").exists():
        assert run(["calibrate", run_dir], capsys)[0] == 0
    one = tmp_path / "one.extxyz"
    ase.io.write(one, [emt_labelled(rattled_molecule("CH3OH", 7), "hi")])
    out = tmp_path / "m.json"
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, _, _ = run(["evaluate", run_dir, one, "--uncertainty", "--out", out], capsys)
    assert code == 0 and "NaN" not in out.read_text()
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert report["uncertainty"]["fidelities"]["hi"]["spearman"] is None
    assert "the uncertainty statistics of hi come from only 1 structure(s), too few" in caplog.text
