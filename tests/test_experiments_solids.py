"""The PES learning curve through the experiment runner, on structure files (experiments/solids_tiny.yaml).

A synthetic shared folder in the MatPES schema (periodic cells, forces, PBE stress, r2SCAN on every
second structure) stands in for ../shared/data/solids: sizes as fractions of the r2SCAN training
structures, composition-spanning order, split by structure (test and validation structures carry no
label of any fidelity in any run's training data), per-atom energy and force metrics, learning-curve
figure and data-efficiency factors per metric, resume, report-only, and spec errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_train

import multifi.train.run as train_run
from multifi.data.dataset import FidelityDataset
from multifi.errors import MultifiError
from multifi_experiments.parts import composition_span, cover_first
from multifi_experiments.runner import load_context, plan_parts, run_experiment

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "solids_tiny.yaml"
SMALL = ROOT / "experiments" / "solids_small.yaml"
FULL = ROOT / "experiments" / "solids_full.yaml"
CONVERGED = ROOT / "experiments" / "solids_converged.yaml"
# element pairs of the synthetic prototypes (one element: a pure cell); 40 structures, 2 per prototype
PROTOTYPES = [
    ("Si", None),
    ("C", None),
    ("Si", "C"),
    ("Na", "Cl"),
    ("Mg", "O"),
    ("Li", "F"),
    ("Al", None),
    ("Al", "N"),
    ("Cu", None),
    ("Ga", "As"),
    ("B", "N"),
    ("Na", None),
    ("Li", None),
    ("Mg", None),
    ("Ge", None),
    ("Ag", None),
    ("Al", "P"),
    ("Cu", None),
    ("Si", None),
    ("Mg", "O"),
]
REF = {"PBE": 1.0, "R2SCAN": 1.7}  # eV per atomic number: different per-element offsets per functional


def _record(i: int, functional: str, rng: np.random.Generator) -> dict:
    """Structure i (its geometry the same at every functional, as in MatPES) with rng's labels at `functional`."""
    a, b = PROTOTYPES[i % len(PROTOTYPES)]
    geo = np.random.default_rng(i)
    a0 = geo.uniform(3.0, 3.4)
    cell = np.eye(3) * a0 + geo.normal(0, 0.05, (3, 3))
    frac = [[0, 0, 0]] + ([[0.5, 0.5, 0.5]] if b else [])
    xyz = np.asarray(frac) @ cell + geo.normal(0, 0.05, (len(frac), 3))
    species = [a] + ([b] if b else [])
    from ase.data import atomic_numbers

    z = np.array([atomic_numbers[s] for s in species])
    forces = rng.normal(0, 0.3, (len(z), 3))
    forces -= forces.mean(0)
    return {
        "matpes_id": f"syn-{i}",
        "functional": functional,
        "nsites": len(z),
        "structure": {
            "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True]},
            "sites": [{"species": [{"element": s, "occu": 1}], "xyz": p.tolist()} for s, p in zip(species, xyz)],
        },
        "energy": float(-REF[functional] * z.sum() / 10 + rng.normal(0, 0.05) * len(z)),
        "forces": forces.tolist(),
        "stress": rng.normal(0, 5, 6).tolist() if functional == "PBE" else None,
    }


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Path:
    """40 PBE structures, r2SCAN on every second one (20), as MatPES JSON-lines files."""
    folder = tmp_path / "shared" / "solids"
    folder.mkdir(parents=True)
    for functional, ids in (("PBE", range(40)), ("R2SCAN", range(0, 40, 2))):
        lines = "".join(
            json.dumps(_record(i, functional, np.random.default_rng([i, len(functional)]))) + "\n" for i in ids
        )
        (folder / f"{functional}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    monkeypatch.setenv("MULTIFI_SHARED_DATA", str(tmp_path / "shared"))
    return tmp_path / "shared"


@pytest.fixture
def fake(monkeypatch):
    """The runner's trainer replaced by conftest.fake_train, writing test errors only (no validation errors)."""
    calls: list = []
    monkeypatch.setattr(train_run, "train", fake_train(calls, validation=False))
    return calls


def _keys(path: Path) -> set[str]:
    return set(path.read_text().split())


# ---------------------------------------------------------------------------------------------- runner
def test_solids_spec_artefacts_metrics_and_resume(shared, fake, tmp_path):
    out = tmp_path / "out"
    run_experiment(SPEC, overrides=[f"output={out}"])
    ctx = load_context(SPEC, [f"output={out}"])
    parts = plan_parts(ctx)
    plans = parts["learning_curve"].plans
    assert len(fake) == len(plans) == len(list((out / "runs").rglob("*.json")))
    # 20 r2SCAN structures: 4 test + 2 validation → 14 for training; fractions ¼, ½, 1 → n = 4, 7, 14
    info = parts["learning_curve"].info
    assert info["ns"] == [4, 7, 14] and info["high_pool"] == 14 and info["n_low"] == 40 - 6
    summary = json.loads((out / "summary.json").read_text())
    lc = summary["learning_curve"]
    assert set(lc) == {"single", "joint_readout", "joint_both", "finetune"}
    assert set(lc["single"]) == {"4", "7", "14"}
    assert set(lc["single"]["4"]) == {
        "mae_meV_per_atom_mean",
        "mae_meV_per_atom_std",
        "forces_mae_meV_per_A_mean",
        "forces_mae_meV_per_A_std",
        "seeds",
    }
    assert lc["single"]["4"]["seeds"] == 1 and lc["single"]["14"]["forces_mae_meV_per_A_mean"] > 0
    assert set(summary["data_efficiency"]) >= {"n4", "n7", "best_variant", "extrapolated"}
    assert set(summary["data_efficiency_by_metric"]) == {"energy_per_atom", "forces"}
    result = json.loads((out / "runs/learning_curve/joint_readout/n7_s0.json").read_text())
    assert set(result["test"]) == {"R2SCAN"}  # tested at r2SCAN only
    # the 4 test structures: those it can predict, plus those with an element no training label had
    assert result["test"]["R2SCAN"]["n"] + result["test"]["R2SCAN"].get("unseen", 0) == 4
    assert {"mae_meV_per_atom", "forces_mae_meV_per_A"} <= set(result["test"]["R2SCAN"])
    assert "stress_mae_GPa" not in result["test"]["R2SCAN"]  # r2SCAN has no stress labels
    assert (out / "learning_curve.png").stat().st_size > 1000
    readme = (out / "README.md").read_text()
    assert f"`multifi experiment run experiments/solids_tiny.yaml --set output={out}`" in readme
    assert "meV/atom" in readme and "meV/Å" in readme and "n=4: 1/4" in readme
    assert "in no training or validation set, at any fidelity" in readme
    # resumable: a second invocation trains nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    fake.clear()
    run_experiment(SPEC, overrides=[f"output={out}"])
    assert fake == [] and before == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    # report-only rebuilds the report from the results alone
    (out / "README.md").unlink()
    run_experiment(SPEC, overrides=[f"output={out}"], report_only=True)
    assert fake == [] and "meV/Å" in (out / "README.md").read_text()


def test_status_on_structure_files_writes_nothing(shared, tmp_path, capsys):
    """experiment status reads the spec's structure files without writing their cache (nor anything else)."""
    from multifi.cli.main import main

    out = tmp_path / "out"
    assert main(["experiment", "status", str(SPEC), "--set", f"output={out}"]) == 0
    assert "to do" in capsys.readouterr().out
    assert not out.exists()


def test_runs_train_on_exactly_their_labels_and_test_structures_stay_out(shared, fake, tmp_path):
    """Split by structure: test and validation structures carry no label of any fidelity in training;
    PBE on every training structure; r2SCAN on the first n of a seed's order (nested across n)."""
    out = tmp_path / "out"
    run_experiment(SPEC, overrides=[f"output={out}"])
    splits = json.loads((out / "splits/learning_curve.json").read_text())
    test, val, low_pool = set(splits["test"]), set(splits["val"]), set(splits["low_pool"])
    assert len(test) == 4 and len(val) == 2 and not (test | val) & low_pool
    order = splits["high_train_order"]["s0"]
    for variant in ("single", "joint_readout", "joint_both", "finetune"):
        previous: set = set()
        for n in (4, 7, 14):
            work = out / f"work/learning_curve/{variant}/n{n}_s0"
            ds = FidelityDataset.load(work / "inputs/data.npz")
            keys = ds.keys.astype(str)
            train = _keys(work / "inputs/train.keys")
            assert _keys(work / "inputs/test.keys") == test and _keys(work / "inputs/val.keys") == val
            assert not train & (test | val)
            names = list(ds.fidelities.names)
            high = set(keys[ds.energy_mask[:, names.index("R2SCAN")]])
            assert high - test - val == set(order[:n]) and previous <= high  # nested across n
            previous = high
            assert set(keys[ds.has_forces()[:, names.index("R2SCAN")]]) == high
            if variant.startswith("joint"):
                low = set(keys[ds.energy_mask[:, names.index("PBE")]])
                assert low == low_pool == train  # PBE on all training structures, never on test or validation
                assert set(keys[ds.has_stress()[:, names.index("PBE")]]) == low
            else:
                assert names == ["R2SCAN"] and train == set(order[:n])
    pre = FidelityDataset.load(out / "work/learning_curve/finetune/pretrain_s0/inputs/data.npz")
    assert list(pre.fidelities.names) == ["PBE"]
    assert not set(pre.keys.astype(str)) & test


def test_real_training_on_structure_files(shared, tmp_path):
    """The real trainer (Lightning) through the runner: forces and stress, joint and single, two epochs."""
    out = tmp_path / "out"
    run_experiment(
        SPEC,
        overrides=[f"output={out}", "learning_curve.difference=true"],
        only=["learning_curve/single/n4_s0", "learning_curve/joint_readout/n4_s0"],
    )
    for rid in ("single/n4_s0", "joint_readout/n4_s0"):
        r = json.loads((out / f"runs/learning_curve/{rid}.json").read_text())
        assert r["how"] == "trained" and r["steps"] > 0
        assert np.isfinite(r["test"]["R2SCAN"]["forces_mae_meV_per_A"])
    joint = json.loads((out / "runs/learning_curve/joint_readout/n4_s0.json").read_text())
    assert joint["n_train"] == {"PBE": 34, "R2SCAN": 4}
    # the difference the second fidelity adds: label sizes from the files, the joint model's own errors
    test = json.loads((out / "splits/learning_curve.json").read_text())["test"]
    records = {
        f: {r["matpes_id"]: r for r in map(json.loads, gzip.open(shared / f"solids/{f}.jsonl.gz", "rt"))}
        for f in ("PBE", "R2SCAN")
    }
    ids = [k.split(":", 1)[1] for k in test]
    diff = np.concatenate([np.subtract(records["R2SCAN"][i]["forces"], records["PBE"][i]["forces"]) for i in ids])
    single = json.loads((out / "runs/learning_curve/single/n4_s0.json").read_text())
    assert set(single["difference"]) == {
        "n",
        "label_energy_difference_std_meV_per_atom",
        "label_forces_difference_mae_meV_per_A",
    }
    d = joint["difference"]
    assert d["n"] == len(test) and d["label_forces_difference_mae_meV_per_A"] == pytest.approx(
        single["difference"]["label_forces_difference_mae_meV_per_A"]
    )
    assert d["label_forces_difference_mae_meV_per_A"] == pytest.approx(1000 * np.abs(diff).mean(), rel=1e-5)
    assert 0 < d["energy_difference_mae_meV_per_atom"] and 0 < d["forces_difference_mae_meV_per_A"]
    readme = (out / "README.md").read_text()
    assert "What the second fidelity adds" in readme


def test_shared_energy_scale_keeps_references_per_fidelity(shared):
    """A fidelity with a handful of labels gets the scale of all residuals pooled, not of its own near-exact fit."""
    from multifi.data.sources import read_sources
    from multifi.data.split import labelled_pairs
    from multifi.data.stats import fit_baseline

    ds = read_sources([str(shared / "solids/PBE.jsonl.gz"), str(shared / "solids/R2SCAN.jsonl.gz")])
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    high = ds.fidelities.index("R2SCAN")
    few = np.concatenate([pairs[pairs[:, 1] != high], pairs[pairs[:, 1] == high][:3]])  # 3 r2SCAN labels
    ref, scale = fit_baseline(ds, few)
    ref_shared, scale_shared = fit_baseline(ds, few, shared_scale=True)
    np.testing.assert_array_equal(ref, ref_shared)
    assert scale_shared[0] == scale_shared[1] and abs(scale_shared[0] - scale[1 - high]) < 0.5 * scale[1 - high]
    assert scale[high] == scale[1 - high]  # 3 labels determine no scale of their own: PBE's (the median of the rest)


# ---------------------------------------------------------------------------------------------- sizes and order
def test_cover_first_spans_compositions_first():
    # Si, C, SiC, Si, NaCl, Na, Cl-free duplicates: rank 4 (Si, C, Na, Cl); SiC adds nothing after Si and C
    comp = np.zeros((7, 119), int)
    for row, counts in enumerate([{14: 2}, {6: 2}, {14: 1, 6: 1}, {14: 1}, {11: 1, 17: 1}, {11: 2}, {6: 1}]):
        for z, c in counts.items():
            comp[row, z] = c
    order = np.arange(7) * 10
    out = cover_first(order, comp)
    assert out.tolist() == [0, 10, 40, 50, 20, 30, 60]
    assert sorted(out.tolist()) == order.tolist()


def test_composition_span_counts_undetermined_test_structures(shared, tmp_path):
    ctx = load_context(SPEC, [f"output={tmp_path / 'out'}"])
    cat = ctx.catalog
    ids = cat.labelled("R2SCAN")

    class One:
        def for_n(self, n):
            return [0]

    pure_si = [i for i in ids if set(np.flatnonzero(cat.composition([i])[0])) == {14}]
    test = np.array([i for i in ids if set(np.flatnonzero(cat.composition([i])[0])) == {6, 14}])
    assert len(pure_si) and len(test)
    span = composition_span(cat, {0: np.array(pure_si)}, [1], One(), test)
    assert span == {"1": {"s0": len(test)}}  # Si alone does not determine C's reference energy


# ---------------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    "override, needle",
    [
        ("learning_curve.ns=[2, 4]", "either ns or fractions"),
        ("learning_curve.fractions=[0, 0.5]", "fractions must lie in (0, 1]"),
        ("learning_curve.efficiency.at=[0.3]", "efficiency.at: [0.3] not among the part's fractions"),
        ("learning_curve.variants.d={kind: delta}", "delta variants are implemented for the QM9 label tables only"),
        ("learning_curve.metrics=[forces, forcez]", "learning_curve.metrics.1"),
        ("learning_curve.high=R2SCANN", "R2SCAN"),
        ("learning_curve.test=19", "needs 21 structures but only 20 are labelled"),
        ("data.sources.0.path=nowhere.jsonl.gz", "nowhere.jsonl.gz: no such file"),
    ],
)
def test_spec_errors_are_one_line(shared, tmp_path, override, needle):
    with pytest.raises(MultifiError) as exc:
        plan_parts(load_context(SPEC, [f"output={tmp_path / 'out'}", override]))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("spec", [SMALL, FULL, CONVERGED])
def test_shipped_solids_specs_validate(spec, tmp_path):
    from multifi_experiments.spec import load_spec

    s, _ = load_spec(spec, [f"output={tmp_path / 'out'}"])
    assert s.learning_curve.high == "R2SCAN" and s.learning_curve.low == "PBE"
    assert s.learning_curve.metrics[:2] == ["energy_per_atom", "forces"]
    assert s.learning_curve.variants["joint_readout"].inject == "readout"


@pytest.mark.skipif(not (ROOT.parent / "shared/data/solids/R2SCAN.jsonl.gz").exists(), reason="no shared solids")
def test_small_spec_plan_on_the_shared_solids(tmp_path, monkeypatch):
    monkeypatch.delenv("MULTIFI_SHARED_DATA", raising=False)
    ctx = load_context(SMALL, [f"output={tmp_path / 'out'}", f"work_dir={tmp_path / 'work'}"])
    lc = plan_parts(ctx)["learning_curve"]
    r2scan = len(ctx.catalog.labelled("R2SCAN"))
    spec = ctx.spec.learning_curve
    assert lc.info["high_pool"] == r2scan - spec.test - spec.val
    assert lc.info["ns"] == [max(1, round(f * lc.info["high_pool"])) for f in spec.fractions]
    # from the smallest n on, the training compositions determine every test structure's reference energies
    # only where the spec's order spans them; the info says where
    assert set(lc.info["span"]) == {str(n) for n in lc.info["ns"]}


def test_the_data_fingerprint_of_matpes_files_read_in_vasps_order_is_the_one_before_stress_order():
    """Experiments planned before sources had a stress_order read MatPES files in VASP's order: those settings keep
    their fingerprint (their runs and caches stay valid); MatPES's own order is other data, another fingerprint; an
    extxyz ignores the setting."""
    from multifi_experiments.catalog import _fingerprinted

    base = {"path": "/d/PBE.jsonl.gz", "fidelity": None, "format": "auto", "index": ":"}
    assert _fingerprinted({**base, "stress_order": "vasp"}) == {k: v for k, v in base.items() if k != "path"}
    assert _fingerprinted({**base, "stress_order": "voigt"})["stress_order"] == "voigt"
    xyz = {**base, "path": "/d/a.extxyz", "stress_order": "voigt"}
    assert "stress_order" not in _fingerprinted(xyz)
