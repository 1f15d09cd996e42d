"""Model contracts: fidelity conditioning, training signal, masked labels, batches, save/load."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import physics
import pytest
import torch
from conftest import TINY_MODEL

from multifi.data.batch import graph_from_atoms
from multifi.data.split import labelled_pairs
from multifi.data.stats import fit_baseline
from multifi.errors import MultifiError
from multifi.models.registry import build_potential, load_potential, save_potential
from multifi.nn.fidelity import MODES, FidelityConditioning
from multifi.predict import predict_atoms


def make_painn(fidelities, inject: str = "both", onehot_at: str = "both", **model):
    cfg = copy.deepcopy(TINY_MODEL)
    cfg.update(model)
    cfg["fidelity_embedding"] = {"dim": 4, "inject": inject, "onehot_at": onehot_at}
    return build_potential(cfg, fidelities)


@pytest.mark.parametrize("mode", MODES)
def test_fidelity_changes_prediction_except_single(mode, molecules, periodic):
    physics.check_fidelity_dependence(
        partial(make_painn, inject=mode), molecules + [periodic], expect_change=mode != "single"
    )


@pytest.mark.parametrize("onehot_at", ["input", "readout"])
def test_onehot_at_one_place_changes_prediction(onehot_at, molecules):
    physics.check_fidelity_dependence(partial(make_painn, inject="onehot", onehot_at=onehot_at), molecules, True)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains(mode, molecules):
    physics.check_loss_decreases(partial(make_painn, inject=mode), molecules)


@pytest.mark.parametrize("mode", ["both", "heads"])
def test_missing_label_adds_no_loss_and_no_gradient(mode, molecules):
    physics.check_missing_labels(partial(make_painn, inject=mode), molecules)


def test_conditioning_placement():
    for mode, at_input, at_readout in [
        ("input", True, False),
        ("readout", False, True),
        ("both", True, True),
        ("heads", False, False),
        ("single", False, False),
    ]:
        c = FidelityConditioning(3, 4, mode, 16)
        assert (c.at_input, c.at_readout) == (at_input, at_readout), mode
        fid = torch.tensor([0, 2])
        assert (c.input_condition(fid) is None) != at_input
        assert (c.readout_condition(fid) is None) != at_readout
    oh = FidelityConditioning(3, 4, "onehot", 16, onehot_at="readout")
    assert (
        oh.readout_condition(torch.tensor([1])).tolist() == [[0.0, 1.0, 0.0]]
        and oh.input_condition(torch.tensor([1])) is None
    )
    with pytest.raises(ValueError, match="unknown fidelity conditioning mode"):
        FidelityConditioning(2, 4, "sideways", 16)


def test_heads_mode_has_one_readout_per_fidelity():
    pot = make_painn(["a", "b", "c"], inject="heads")
    assert len(pot.head.mlps) == 3
    assert len(make_painn(["a", "b", "c"], inject="both").head.mlps) == 1


def test_unknown_backbone_and_fidelity_names():
    cfg = copy.deepcopy(TINY_MODEL)
    cfg["backbone"] = "schnet"
    with pytest.raises(MultifiError, match=r"model: backbone: Input should be 'painn' or 'm3gnet' \(got 'schnet'\)"):
        build_potential(cfg, ["a"])
    pot = make_painn(["PBE", "B3LYP"])
    assert pot.fidelity_index("B3LYP") == 1
    with pytest.raises(MultifiError, match=r"unknown fidelity 'PBE0'.*did you mean 'PBE'.*known: PBE, B3LYP"):
        pot.fidelity_index("PBE0")


def test_outputs_units_shapes_and_dtypes(molecules, periodic):
    pot = make_painn(["a", "b"]).eval()
    g = graph_from_atoms(molecules, pot.cutoff, 0)
    out = pot(g)
    assert set(out) == {"energy"} and out["energy"].dtype == torch.float64 and out["energy"].shape == (3,)
    out = pot(g, forces=True, stress=True)  # molecules only: no stress
    assert set(out) == {"energy", "forces"} and out["forces"].shape == (g.positions.shape[0], 3)
    out = pot(graph_from_atoms([periodic], pot.cutoff, 1), forces=True, stress=True)
    assert set(out) == {"energy", "forces", "stress"} and out["stress"].shape == (1, 3, 3)
    assert not any(v.requires_grad for v in out.values())
    # the training path (create_graph) gives the same numbers and stays differentiable
    g = graph_from_atoms([periodic], pot.cutoff, 1)
    train_out = pot(g, forces=True, stress=True, create_graph=True)
    assert train_out["forces"].requires_grad
    for k in out:
        torch.testing.assert_close(train_out[k].detach(), out[k])


def test_forces_sum_to_zero(molecules, periodic):
    pot = physics.prepared(make_painn)
    out = physics.predict(pot, molecules + [periodic])
    np.testing.assert_allclose(out["forces"].sum(0), 0, atol=1e-10)  # translation invariance, Newton's third law


def test_collator_batches_match_atoms_batches(molecules, periodic):
    """The training path (dataset → neighbour cache → GraphCollator) equals the prediction path (graph_from_atoms)."""
    atoms_list = molecules + [periodic]
    records = [
        {
            "numbers": a.numbers,
            "positions": a.positions,
            "cell": a.cell.array if a.pbc.any() else None,
            "pbc": a.pbc,
            "labels": {"lo": {"energy": -1.0}, "hi": {"energy": -2.0}},
        }
        for a in atoms_list
    ]
    from multifi.data.dataset import FidelityDataset

    ds = FidelityDataset.from_records(records)
    pot = physics.prepared(make_painn, ds.fidelities.names)
    pairs = np.array([[3, 1], [0, 0], [2, 1], [1, 0]])
    g = physics.collate(ds, pairs, pot.cutoff)
    out = pot(g, forces=True, stress=True)
    ref = physics.predict(pot, [atoms_list[i] for i in pairs[:, 0]], pairs[:, 1].tolist(), stress=True)
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"], rtol=1e-6)  # collator positions are float32
    np.testing.assert_allclose(out["forces"].numpy(), ref["forces"], atol=1e-5)
    np.testing.assert_allclose(out["stress"].numpy(), ref["stress"], atol=1e-5)
    assert g.energy.tolist() == [-2.0, -1.0, -2.0, -1.0] and g.energy_mask.all()
    assert g.structure.tolist() == [3, 0, 2, 1] and g.fidelity.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("far", [0.0, 1e4])
def test_a_structure_far_from_the_origin_keeps_its_geometry_in_training_graphs(molecules, periodic, far):
    """Stored 10⁴ Å from the origin (unwrapped MD frames, a molecule in a big box), a structure's training graph has
    the edge lengths of its geometry to float32 precision near the origin (was 7e-4 Å off: positions rounded to
    float32 where they lie), and the training path predicts what prediction does."""
    from multifi.data.dataset import FidelityDataset

    atoms_list = [molecules[0].copy(), periodic.copy()]
    for a in atoms_list:
        a.positions += far
    records = [
        {"numbers": a.numbers, "positions": a.positions, "cell": a.cell.array if a.pbc.any() else None, "pbc": a.pbc}
        | {"labels": {"lo": {"energy": -1.0}}}
        for a in atoms_list
    ]
    ds = FidelityDataset.from_records(records)
    pot = physics.prepared(make_painn, ds.fidelities.names)
    g = physics.collate(ds, np.array([[0, 0], [1, 0]]), pot.cutoff)
    i, j = g.edge_index.numpy()
    cell = g.cell.double().numpy()[g.batch.numpy()[i]]
    got = (
        g.positions.double().numpy()[j]
        - g.positions.double().numpy()[i]
        + np.einsum("ea,eab->eb", g.shifts.double().numpy(), cell)
    )
    exact = ds.positions[j] - ds.positions[i] + np.einsum("ea,eab->eb", g.shifts.double().numpy(), cell)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(exact, axis=1), atol=2e-6)
    out = pot(g, forces=True)
    ref = physics.predict(pot, atoms_list, [0, 0])
    np.testing.assert_allclose(out["energy"].detach().numpy(), ref["energy"], rtol=1e-6)
    np.testing.assert_allclose(out["forces"].detach().numpy(), ref["forces"], atol=1e-5)


def test_graph_to_keeps_float64_energy_labels(molecules):
    g = graph_from_atoms(molecules, 4.0, 0, dtype=torch.float64)
    g32 = g.to("cpu", torch.float32)
    assert g32.positions.dtype == torch.float32 and g32.energy.dtype == torch.float64
    assert g32.numbers.dtype == torch.long and g32.edge_index.dtype == torch.long


def test_baseline_fitted_and_elements(molecules):
    ds = physics.labelled_dataset(molecules, ("lo", "hi"))
    pot = make_painn(list(ds.fidelities.names))
    assert pot.elements == []
    pot.head.set_baseline(*fit_baseline(ds, labelled_pairs(ds, np.arange(len(ds)))))
    assert pot.elements == sorted({1, 6, 7, 8})


def test_save_load_roundtrip(tmp_path, molecules, periodic):
    torch.manual_seed(3)
    pot = make_painn(["lo", "hi"], inject="heads")
    ds = physics.labelled_dataset(molecules, ("lo", "hi"))
    pot.head.set_baseline(*fit_baseline(ds, labelled_pairs(ds, np.arange(len(ds)))))
    path = save_potential(pot, tmp_path / "model.pt")
    loaded = load_potential(path)
    assert loaded.spec == pot.spec and loaded.fidelities.names == ("lo", "hi")
    for name in ("lo", "hi"):
        e1, f1, _ = predict_atoms(pot.eval(), molecules, name)
        e2, f2, _ = predict_atoms(loaded, molecules, name)
        np.testing.assert_array_equal(e1, e2)
        for a, b in zip(f1, f2):
            np.testing.assert_array_equal(a, b)


def test_load_potential_errors(tmp_path):
    with pytest.raises(MultifiError, match="no such checkpoint"):
        load_potential(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(MultifiError, match="bad.pt: not a readable checkpoint"):
        load_potential(bad)
    whole = tmp_path / "whole.pt"  # a model file cut short (a copy that stopped): said so
    save_potential(make_painn(["lo", "hi"]), whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(MultifiError, match=r"cut.pt: not a readable checkpoint \(cut short or damaged: \d+ bytes"):
        load_potential(cut)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(MultifiError, match="other.pt: not a multifi checkpoint"):
        load_potential(other)
    for name, kind in (("model.llpr.npz", "an uncertainty calibration"), ("pairs.npz", "an extension run's split")):
        np.savez(tmp_path / name, x=np.zeros(2))  # a run's side files were "not a readable checkpoint"
        with pytest.raises(MultifiError, match=f"{name}: {kind}.*, not a model; give the model.pt"):
            load_potential(tmp_path / name)


def test_predict_atoms_rejects_unseen_elements(molecules):
    pot = make_painn(["lo"])
    ds = physics.labelled_dataset(molecules[:1], ("lo",))  # H2O: H and O only
    pot.head.set_baseline(*fit_baseline(ds, labelled_pairs(ds, np.arange(1))))
    with pytest.raises(MultifiError, match=r"structure 1: element C was not seen in training \(model knows H, O\)"):
        predict_atoms(pot, molecules[:2], "lo")
    with pytest.raises(MultifiError, match="unknown fidelity 'hi'"):
        predict_atoms(pot, molecules[:1], "hi")


def test_metrics_per_fidelity_exact_values(molecules):
    from multifi.train.metrics import FidelityMetrics

    g = graph_from_atoms(molecules, 4.0, [0, 1, 0], dtype=torch.float64)  # 3, 6 and 4 atoms
    g.energy = torch.tensor([-10.0, -20.0, -30.0], dtype=torch.float64)
    g.energy_mask = torch.tensor([True, True, False])
    g.forces = torch.zeros_like(g.positions)
    g.forces_mask = torch.tensor([True, False, True])
    out = {
        "energy": torch.tensor([-10.3, -19.0, 999.0], dtype=torch.float64),
        "forces": torch.full_like(g.positions, 0.002),
    }
    m = FidelityMetrics(["a", "b", "unused"])
    m.update(out, g)
    m.update(out, g)  # accumulates: same averages, double counts
    res = m.compute()
    assert set(res) == {"a", "b"}  # fidelities without labels are left out
    a, b = res["a"], res["b"]
    assert a["n"] == 2 and b["n"] == 2
    assert a["energy_mae_meV"] == pytest.approx(300.0) and a["energy_rmse_meV"] == pytest.approx(300.0)
    assert a["energy_mae_meV_per_atom"] == pytest.approx(100.0)
    assert a["forces_mae_meV_per_A"] == pytest.approx(2.0) and b["forces_mae_meV_per_A"] is None
    assert a["n_forces"] == 4 and "n_forces" not in b  # a: structures 0 and 2 twice; b: no force label
    assert b["energy_mae_meV"] == pytest.approx(1000.0) and b["energy_mae_meV_per_atom"] == pytest.approx(1000.0 / 6)
    assert a["stress_mae_GPa"] is None
    # RMSEs (MACE's RMSE_E_per_atom, RMSE_F): per-atom energy errors 0.1 eV (a), 1/6 eV (b); force errors of
    # 2 meV/Å on every component of one structure, 0.002 + 0 ... on the other: a's forces err by 2 meV/Å everywhere
    assert a["energy_rmse_meV_per_atom"] == pytest.approx(100.0) and b["energy_rmse_meV_per_atom"] == pytest.approx(
        1000 / 6
    )
    assert a["forces_rmse_meV_per_A"] == pytest.approx(2.0) and b["forces_rmse_meV_per_A"] is None
    out["forces"] = torch.zeros_like(g.positions)
    out["forces"][0] = torch.tensor([0.003, -0.004, 0.0], dtype=torch.float64)  # one atom of structure 0 (3 atoms)
    m = FidelityMetrics(["a", "b", "unused"])
    m.update(out, g)
    a = m.compute()["a"]  # structures 0 and 2 (3 + 4 atoms, 21 components): √(25e-6 / 21) eV/Å, MAE 7e-3 / 21
    assert a["forces_rmse_meV_per_A"] == pytest.approx(1000 * np.sqrt(25e-6 / 21)) and a[
        "forces_mae_meV_per_A"
    ] == pytest.approx(7 / 21)


def test_loss_fidelity_weights(molecules):
    """A weight multiplies its samples' terms in every batch (also a batch of that fidelity alone); only the
    ratios matter; weight 0 removes a fidelity's samples from the sums (means stay over all labelled samples)."""
    from multifi.train.loss import MultiFidelityLoss

    ds = physics.labelled_dataset(molecules, ("lo", "hi"))
    pot = physics.prepared(make_painn, ds.fidelities.names)
    pairs = np.array([[0, 0], [1, 1], [2, 0], [0, 1]])
    g = physics.collate(ds, pairs, pot.cutoff)
    out = pot(g, forces=True)
    only_lo = physics.collate(ds, pairs[pairs[:, 1] == 0], pot.cutoff)
    out_lo = pot(only_lo, forces=True)

    def loss(weights, out, graph):
        return MultiFidelityLoss(fidelity_weights=torch.tensor(weights, dtype=torch.float64))(out, graph)

    loss0, t0 = loss([1.0, 0.0], out, g)
    _, ref = MultiFidelityLoss()(out_lo, only_lo)
    atoms_lo, atoms_all = int(only_lo.n_atoms.sum()), int(g.n_atoms.sum())
    assert float(t0["energy"]) == pytest.approx(float(ref["energy"]) * 2 / 4, rel=1e-6)
    assert float(t0["forces"]) == pytest.approx(float(ref["forces"]) * atoms_lo / atoms_all, rel=1e-6)
    l1, _ = loss([1.0, 3.0], out, g)
    l2, _ = loss([2.0, 6.0], out, g)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6) and float(l1) != pytest.approx(float(loss0), rel=1e-3)
    alone, _ = loss([1.0, 3.0], out_lo, only_lo)  # lo weighs a third of hi, also in a batch of lo alone
    assert float(alone) == pytest.approx(float(MultiFidelityLoss()(out_lo, only_lo)[0]) / 3, rel=1e-6)
    zero, _ = loss([0.0, 1.0], out_lo, only_lo)  # a batch of weight-0 samples adds 0, not 0/0
    assert float(zero) == 0.0
    with pytest.raises(ValueError, match="every weight is 0"):
        MultiFidelityLoss(fidelity_weights=torch.zeros(2))
