"""Experiment runner on experiments/tiny.yaml with a synthetic shared-data folder (199 QM9 molecules):
artefacts, resume without redoing finished runs, kill → resume, split hygiene, report-only, spec errors,
and the data-efficiency interpolation on synthetic power-law learning curves."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import multifi.train.trainer as trainer_mod
from multifi.data.readers import qm9
from multifi.errors import MultifiError
from multifi_experiments import catalog as catalog_mod
from multifi_experiments import runner as runner_mod
from multifi_experiments.context import lock_path, process_identity
from multifi_experiments.efficiency import efficiency_factor, n_for_error
from multifi_experiments.plan import RunPlan
from multifi_experiments.runner import load_context, plan_parts, run_experiment, select
from multifi_experiments.status import experiment_status, status_table

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
SUMMARY_KEYS = {"transfer", "learning_curve", "data_efficiency", "ten_methods", "ten_methods_ratio_mean"}


# ---------------------------------------------------------------------------------------------- fixtures
def _labels(path: Path, index: np.ndarray, energy: np.ndarray) -> str:
    text = "index,energy_eV\n" + "".join(f"{i},{e:.6f}\n" for i, e in zip(index, energy))
    path.write_bytes(gzip.compress(text.encode()))
    return path.name


@pytest.fixture
def shared(monkeypatch, small_qm9, tmp_path) -> Path:
    """QM9 reduced to 199 molecules and a shared-data folder with synthetic labels and five 30-molecule blocks."""
    catalog_mod._read_table.cache_clear()
    catalog_mod._merged_tables.cache_clear()
    geo = qm9.load_qm9_geometries()
    n_atoms = np.diff(geo.offsets)
    folder = tmp_path / "shared" / "qm9mf"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    methods = ["B3LYP/6-31G(2df,p)", "GFN2-xTB", "GFN1-xTB", "HF/STO-3G", "PBE/3-21G"]
    perm = rng.permutation(geo.index)
    blocks = {m: sorted(int(i) for i in perm[30 * j : 30 * (j + 1)]) for j, m in enumerate(methods)}
    files = [
        {
            "file": _labels(
                folder / "GFN2-xTB.csv.gz", geo.index, 0.9 * geo.energy + 0.3 * n_atoms + rng.normal(0, 0.05, len(geo))
            ),
            "fidelity": "GFN2-xTB",
        },
        {
            "file": _labels(folder / "GFN1-xTB.csv.gz", geo.index, 0.8 * geo.energy - 0.2 * n_atoms),
            "fidelity": "GFN1-xTB",
        },
        {
            "file": _labels(
                folder / "HF_STO-3G.csv.gz",
                np.array(blocks["HF/STO-3G"][:15]),  # half its block
                np.zeros(15) - 100.0,
            ),
            "fidelity": "HF/STO-3G",
        },
        {"file": "PBE_3-21G.csv.gz", "fidelity": "PBE/3-21G"},  # listed, not computed yet
    ]
    (folder / "manifest.json").write_text(json.dumps({"files": files}))
    (folder / "blocks.json").write_text(json.dumps({"seed": 0, "block_size": 30, "methods": methods, "blocks": blocks}))
    monkeypatch.setenv("MULTIFI_SHARED_DATA", str(tmp_path / "shared"))
    yield tmp_path / "shared"
    catalog_mod._read_table.cache_clear()
    catalog_mod._merged_tables.cache_clear()


def tiny(out: Path, *more: str) -> list[str]:
    return [f"output={out}", *more]


def result_files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}


# ---------------------------------------------------------------------------------------------- runner
def test_tiny_spec_artefacts_and_resume(shared, fake, tmp_path):
    out = tmp_path / "out"
    run_experiment(TINY, overrides=tiny(out))
    n_runs = len(fake)
    ctx = load_context(TINY, tiny(out))
    plans = [p for pp in plan_parts(ctx).values() for p in pp.plans]
    assert n_runs == len(plans) == len(result_files(out))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS | {"data_efficiency_more"}
    (more,) = summary["data_efficiency_more"]
    assert more["best_variant"] == "heads" and more["reference"] == "single" and set(more) >= {"n10", "extrapolated"}
    assert set(summary["transfer"]) == {"8", "16"}
    assert set(summary["transfer"]["8"]["GFN2-xTB"]) == {"joint_mae_meV", "separate_mae_meV"}
    lc = summary["learning_curve"]
    assert set(lc) == {"single", "joint_input", "joint_readout", "joint_both", "onehot", "heads", "delta", "finetune"}
    assert lc["single"]["10"]["seeds"] == 2 and lc["single"]["20"]["seeds"] == 1
    assert lc["single"]["20"]["mae_meV_std"] is None and lc["single"]["10"]["mae_meV_std"] >= 0
    eff = summary["data_efficiency"]
    assert set(eff) >= {"n10", "n20", "best_variant", "extrapolated"}
    assert eff["best_variant"] in lc and set(eff["extrapolated_at"]) == {"n10", "n20"}
    # the best variant is chosen on validation errors, never on test errors
    details = json.loads((out / "details.json").read_text())
    lcd, de = details["learning_curve"]["variants"], details["data_efficiency"]
    val_score = {
        v: np.mean([np.log(lcd[v]["val_curves"]["energy"][n]["mean"]) for n in ("10", "20")]) for v in de["candidates"]
    }
    assert eff["chosen_on"] == "validation" and eff["best_variant"] == min(val_score, key=val_score.get)
    for k in ("n10", "n20"):
        assert len(eff["seeds"][k]["values"]) == lc[eff["best_variant"]][k[1:]]["seeds"]
    # ten methods: every labelled block (HF/STO-3G half labelled), not the one without labels
    assert set(summary["ten_methods"]) == {"B3LYP/6-31G(2df,p)", "GFN2-xTB", "GFN1-xTB", "HF/STO-3G"}
    assert summary["ten_methods_ratio_mean"] > 0
    for png in ("learning_curve", "transfer", "ten_methods", "embedding_similarity", "embedding_pca"):
        assert (out / f"{png}.png").stat().st_size > 1000
    readme = (out / "README.md").read_text()
    assert f"`multifi experiment run experiments/tiny.yaml --set output={out}`" in readme
    assert "### Data-efficiency factor — heads against single (a second factor)" in readme
    assert "needs GFN2-xTB" in readme and "kcal/mol" in readme and "15 of 30" in readme and "PBE/3-21G" in readme
    details = json.loads((out / "details.json").read_text())
    assert details["ten_methods"]["coverage"]["HF/STO-3G"] == {
        "block": 30,
        "labelled": 15,
        "used": 12,
        "train": 10,
        "val": 1,
        "test": 1,
    }
    delta = json.loads((out / "runs/learning_curve/delta/n10_s0.json").read_text())
    assert delta["test"]["B3LYP/6-31G(2df,p)"]["needs_at_prediction"] == "GFN2-xTB"
    # Δ evaluation adds the GFN2-xTB label back: the same error as on the Δ labels themselves
    (d,) = delta["test_delta_labels"].values()
    assert delta["test"]["B3LYP/6-31G(2df,p)"]["mae_meV"] == pytest.approx(d["mae_meV"], rel=1e-5)
    # over the same molecules: those with an element no Δ training label held left out alike (they erred by eV)
    assert delta["test"]["B3LYP/6-31G(2df,p)"]["n"] == d["n"]
    assert delta["test"]["B3LYP/6-31G(2df,p)"].get("unseen") == d.get("unseen")

    # a second invocation trains nothing and rewrites no result
    before = result_files(out)
    run_experiment(TINY, overrides=tiny(out))
    assert len(fake) == n_runs and result_files(out) == before

    # a lost result is re-evaluated from its run directory; lost with its run directory, retrained alone
    (out / "runs/transfer/n8_s1/joint.json").unlink()
    run_experiment(TINY, overrides=tiny(out))
    assert len(fake) == n_runs and (out / "runs/transfer/n8_s1/joint.json").exists()
    (out / "runs/transfer/n8_s1/joint.json").unlink()
    shutil.rmtree(out / "work/transfer/n8_s1/joint")
    run_experiment(TINY, overrides=tiny(out))
    assert [str(c[0].relative_to(out / "work")) for c in fake[n_runs:]] == ["transfer/n8_s1/joint/run"]
    # a changed variant redoes that variant only
    n_single = sum(p.meta.get("variant") == "single" and p.part == "learning_curve" for p in plans)
    fake.clear()
    run_experiment(TINY, overrides=tiny(out, "learning_curve.variants.single.config.train.lr=0.001"), redo_stale=True)
    assert len(fake) == n_single and all("/single/" in str(c[0]) for c in fake)


def test_killed_run_resumes_or_restarts(shared, fake, tmp_path):
    out = tmp_path / "out"
    only = ["learning_curve/single"]
    run_experiment(TINY, overrides=tiny(out), only=only)
    work = out / "work/learning_curve/single"
    # killed after a checkpoint: resumed; killed before one: started afresh
    for name, with_ckpt in (("n10_s0", True), ("n10_s1", False)):
        (out / f"runs/learning_curve/single/{name}.json").unlink()
        for f in ("metrics.json", "model.pt"):
            (work / name / "run" / f).unlink()
        if with_ckpt:
            (work / name / "run/checkpoints").mkdir()
            torch.save({"epoch": 0, "global_step": 3}, work / name / "run/checkpoints/last.ckpt")
    fake.clear()
    run_experiment(TINY, overrides=tiny(out), only=only)
    assert sorted((c[0].parent.name, c[1]) for c in fake) == [("n10_s0", True), ("n10_s1", False)]
    # trained but not yet evaluated: only evaluated
    (out / "runs/learning_curve/single/n20_s0.json").unlink()
    fake.clear()
    run_experiment(TINY, overrides=tiny(out), only=only)
    assert fake == [] and (out / "runs/learning_curve/single/n20_s0.json").exists()


def test_status_reads_states_and_estimates_what_is_left_without_writing(shared, fake, tmp_path):
    out = tmp_path / "out"
    ctx = load_context(TINY, tiny(out, CONVERGE))
    before = experiment_status(ctx)
    assert {r.state for r in before} == {"to do"} and all(r.left_cpu_seconds is None for r in before)
    assert not out.exists()  # status writes nothing, not even the splits
    run_experiment(TINY, overrides=tiny(out, CONVERGE), only=["learning_curve/single"])
    for result in (out / "runs/learning_curve/single").glob("*.json"):  # known costs and steps
        r = json.loads(result.read_text())
        result.write_text(json.dumps({**r, "cpu_seconds": 100.0 if "n10" in result.name else 200.0, "steps": 50}))
    stale = out / "work/learning_curve/joint_both/n10_s0"
    stale.mkdir(parents=True)
    (stale / "signature").write_text("another plan")
    rows = {r.id: r for r in experiment_status(load_context(TINY, tiny(out, CONVERGE)))}
    single = [r for i, r in rows.items() if i.startswith("learning_curve/single/")]
    assert single and all(r.state == "done" and r.left_cpu_seconds == 0 for r in single)
    assert rows["learning_curve/joint_both/n10_s0"].state == "stale"
    # no finished run of its variant: an upper bound, the step cap × CPU seconds per step of the finished runs
    per_step = sum(r.cpu_seconds for r in single) / sum(r.steps for r in single)
    joint = rows["learning_curve/joint_both/n20_s0"]
    assert joint.state == "to do" and joint.bound
    assert joint.left_cpu_seconds == pytest.approx(joint.cap_steps * per_step)
    text = status_table("tiny", list(rows.values()))
    assert f"{len(single)} done" in text and "1 stale" in text and "≤" in text
    # runs of minutes: 100 s is 0.028 h, not 0.00
    assert all(line.split()[4] in ("0.028", "0.056") for line in text.splitlines() if "/single/" in line)
    only = experiment_status(load_context(TINY, tiny(out, CONVERGE)), ["learning_curve/joint_both/n20"])
    assert [r.id for r in only] == ["learning_curve/joint_both/n20_s0"] and only[0].bound


def test_variant_seeds_override_the_part_seeds(shared, tmp_path):
    """A variant's own seeds (e.g. more seeds for an ablation at large n) change only that variant's runs;
    the other variants keep their runs and the seeds share one nested training order."""

    def seeds_by_variant(*more):
        plans = plan_parts(load_context(TINY, tiny(tmp_path / "out", *more)))["learning_curve"].plans
        return {
            v: sorted(
                (p.meta["n"], p.meta["seed"]) for p in plans if p.meta.get("variant") == v and "pretrain" not in p.id
            )
            for v in ("single", "joint_both")
        }

    base = seeds_by_variant()
    assert base["single"] == [(10, 0), (10, 1), (20, 0)]
    more = seeds_by_variant("learning_curve.variants.single.seeds={count: 3, above_n: null}")
    assert more["single"] == [(10, 0), (10, 1), (10, 2), (20, 0), (20, 1), (20, 2)]
    assert more["joint_both"] == base["joint_both"]


def test_only_pulls_in_pretraining_and_report_only_trains_nothing(shared, fake, tmp_path):
    out = tmp_path / "out"
    run_experiment(TINY, overrides=tiny(out), only=["learning_curve/finetune/n20"])
    assert sorted(c[0].parent.name for c in fake) == ["n20_s0", "pretrain_s0"]
    fine = json.loads((out / "runs/learning_curve/finetune/n20_s0.json").read_text())
    assert fine["meta"]["pretrained_on"] == "GFN2-xTB"
    (out / "README.md").unlink()
    fake.clear()
    run_experiment(TINY, overrides=tiny(out), report_only=True)
    assert fake == [] and "not run yet" in (out / "README.md").read_text()
    # a rebuild with settings no finished run had would publish an empty report and another split: refused
    splits = (out / "splits" / "learning_curve.json").read_text()
    readme = (out / "README.md").read_text()
    with pytest.raises(MultifiError, match="was run with these settings .* the rebuilt report would be empty"):
        run_experiment(TINY, overrides=tiny(out, "split_seed=9"), only=["learning_curve/finetune"], report_only=True)
    assert (out / "splits" / "learning_curve.json").read_text() == splits and (out / "README.md").read_text() == readme
    parts = r"parts: transfer, learning_curve, ten_methods, embedding_map; or a run id prefix"
    with pytest.raises(MultifiError, match=f"matches no run \\({parts}"):
        run_experiment(TINY, overrides=tiny(out), only=["learning_curves"])
    few_shot = [RunPlan("few_shot/base", "few_shot", {}, {}, {})]
    with pytest.raises(MultifiError, match=r"'few_shot/nothing' matches no run \(parts: few_shot; or a run id prefix"):
        select(few_shot, ["few_shot/nothing"])


def test_runs_on_labels_changed_since_are_stale_and_other_labels_change_nothing(shared, fake, tmp_path):
    """A result records a hash of the labels its run read: the same table with other values for its molecules
    makes it stale (it was kept, and averaged with runs on the new labels); labels it did not read change nothing."""
    from multifi_experiments.context import _qm9_indices_of, run_state
    from multifi_experiments.runner import load_context

    out = tmp_path / "out"
    only = ["learning_curve/joint_both/n10_s0"]
    run_experiment(TINY, overrides=tiny(out), only=only)
    result = json.loads((out / f"runs/{only[0]}.json").read_text())
    assert len(result["labels"]) == 16

    def state() -> str:
        catalog_mod._read_table.cache_clear()
        catalog_mod._merged_tables.cache_clear()
        ctx = load_context(TINY, tiny(out))
        (plan,) = [p for pp in plan_parts(ctx).values() for p in pp.plans if p.id == only[0]]
        used.update(_qm9_indices_of(plan).tolist())
        return run_state(ctx, plan, result)

    used: set[int] = set()
    other = shared / "qm9mf" / "GFN1-xTB.csv.gz"  # a method this run does not read
    idx, energy = catalog_mod._read_table(str(other), "GFN1-xTB")
    _labels(other, idx, energy + 0.5)
    assert state() == "done"
    table = shared / "qm9mf" / "GFN2-xTB.csv.gz"
    original = table.read_bytes()
    idx, energy = catalog_mod._read_table(str(table), "GFN2-xTB")
    _labels(table, idx, energy + 0.5 * np.isin(idx, list(used)))  # the labels of the molecules it read
    assert state() == "other"
    table.write_bytes(original)
    assert state() == "done"


def test_a_set_that_changes_finished_runs_deletes_nothing_without_redo_stale(shared, fake, tmp_path, caplog):
    """`--set` for one invocation that gives finished runs other settings would delete their results and train them
    again (a user's hours): refused, naming them, nothing touched; --redo-stale does it."""
    out = tmp_path / "out"
    only = ["learning_curve/single/n10_s0"]
    run_experiment(TINY, overrides=tiny(out), only=only)
    before = result_files(out)
    fake.clear()
    changed = tiny(out, "learning_curve.variants.single.config.train={lr: 0.002}")
    with pytest.raises(
        MultifiError, match=r"gives 1 finished run\(s\) other settings \(learning_curve/single/n10_s0\)"
    ):
        run_experiment(TINY, overrides=changed, only=only)
    assert fake == [] and result_files(out) == before
    with caplog.at_level("INFO", logger="multifi"):
        run_experiment(TINY, overrides=changed, only=only, redo_stale=True)
    assert len(fake) == 1 and result_files(out) != before
    assert "1 to do, 1 of them finished with other settings or labels (trained afresh)" in caplog.text


def test_splits_keep_test_molecules_out_of_training_and_selection(shared, tmp_path):
    ctx = load_context(TINY, tiny(tmp_path / "out"))
    parts = plan_parts(ctx)
    for plan in (p for pp in parts.values() for p in pp.plans):
        train, val, test = (set(plan.files[f"{s}.keys"]) for s in ("train", "val", "test"))
        assert not (test & train) and not (test & val) and not (train & val), plan.id
        if plan.meta.get("role") == "pretrain":
            assert not (set(plan.files["source0.idx"]) & set(parts["learning_curve"].splits["test"]))
    lc = json.loads((tmp_path / "out/splits/learning_curve.json").read_text())
    order = lc["high_train_order"]["s0"]
    assert set(order) <= set(lc["low_pool"]) and not set(lc["test"]) & set(lc["low_pool"])
    tr = json.loads((tmp_path / "out/splits/transfer.json").read_text())["train"]["n16_s0"]
    a, b = tr.values()
    assert len(a) == len(b) == 16 and not set(a) & set(b)
    assert set(json.loads((tmp_path / "out/splits/transfer.json").read_text())["train"]["n8_s0"]["GFN2-xTB"]) <= set(
        b
    )  # nested across n


def test_limits_keep_the_row_of_a_run_that_stopped_before_a_raised_cap(shared, fake, tmp_path, monkeypatch):
    """A run that stopped early stays done when the cap is raised, and so does its cached row of limits (also
    once its model is gone)."""
    from multifi_experiments import limits

    monkeypatch.setattr(limits, "measure", lambda ctx, plan, model, high, low: {"test_molecules": 1})
    monkeypatch.setattr(limits, "render", lambda ctx, out: "")
    plateau = "base.train={epochs: 2, batch_size: 8, lr: 0.005, warmup_steps: 0, schedule: plateau}"
    out, rid = tmp_path / "out", "learning_curve/joint_both/n10_s0"
    run_experiment(TINY, overrides=tiny(out, CONVERGE, plateau), only=[rid])
    ctx = load_context(TINY, tiny(out, CONVERGE, plateau))
    assert [r["run"] for r in limits.run_limits(ctx, plan_parts(ctx))["runs"]] == [rid]
    shutil.rmtree(out / "work")
    raised = load_context(TINY, tiny(out, CONVERGE, plateau, "convergence.max_steps=60"))
    assert [r["run"] for r in limits.run_limits(raised, plan_parts(raised))["runs"]] == [rid]


@pytest.mark.slow
def test_real_training_finetune_and_delta(shared, tmp_path):
    """The real trainer through the runner: pre-training → fine-tuning via train.init_from, and Δ-learning."""
    out = tmp_path / "out"
    run_experiment(TINY, overrides=tiny(out), only=["learning_curve/finetune/n10_s0", "learning_curve/delta/n10_s0"])
    for rid in ("finetune/pretrain_s0", "finetune/n10_s0", "delta/n10_s0"):
        r = json.loads((out / f"runs/learning_curve/{rid}.json").read_text())
        assert r["how"] == "trained" and r["steps"] > 0
    log = (out / "work/learning_curve/finetune/n10_s0/log.txt").read_text()
    assert "initialised" in log and "B3LYP/6-31G(2df,p) ← GFN2-xTB" in log
    # Δ: the error of E_high over the molecules the Δ labels' own errors cover (an element no Δ training label
    # held: left out and counted alike, not tens of eV in the mean)
    delta = json.loads((out / "runs/learning_curve/delta/n10_s0.json").read_text())
    (d,) = delta["test_delta_labels"].values()
    high = delta["test"]["B3LYP/6-31G(2df,p)"]
    assert (high["n"], high.get("unseen")) == (d["n"], d.get("unseen"))
    assert high["mae_meV"] == pytest.approx(d["mae_meV"], rel=1e-5)


@pytest.mark.slow
def test_limits_measure_both_fidelities_and_the_vectors_movement(shared, tmp_path):
    """`experiment limits` on real tiny trainings: the top-fidelity MAE equals the run's own test MAE; the
    initial fidelity vectors are reconstructed exactly (a run with lr 1e-12 did not move them, a trained one did not)."""
    from multifi_experiments.limits import run_limits

    only = ["learning_curve/joint_both/n10_s0", "learning_curve/joint_readout/n10_s0", "learning_curve/single/n10_s0"]
    out = tmp_path / "out"
    frozen = "learning_curve.variants.joint_readout.config.train={lr: 1.0e-12, ema_decay: 0.0}"
    run_experiment(TINY, overrides=tiny(out, frozen), only=only)
    ctx = load_context(TINY, tiny(out, frozen))
    rows = {r["run"]: r for r in run_limits(ctx, plan_parts(ctx))["runs"]}
    assert set(rows) == set(only[:2])  # the single-fidelity model has no low fidelity to measure
    for rid, r in rows.items():
        result = json.loads((out / f"runs/{rid}.json").read_text())
        assert r["high_mae_meV"] == pytest.approx(result["test"]["B3LYP/6-31G(2df,p)"]["mae_meV"], rel=1e-4)
        assert r["low_mae_meV"] > 0 and r["difference_mae_meV"] > 0 and r["test_molecules"] == 10
        assert r["both_labelled"] == 10 and r["high_mae_both_meV"] == pytest.approx(r["high_mae_meV"])
    assert max(rows[only[1]]["moved_from_init"].values()) < 1e-6  # lr 1e-12: the initial vectors, rebuilt
    assert min(rows[only[0]]["moved_from_init"].values()) > 1e-4
    assert "| learning_curve/joint_both/n10_s0 |" in (out / "LIMITS.md").read_text()
    again = run_limits(ctx, plan_parts(ctx))["runs"]  # cached per model file
    assert {r["run"]: r for r in again} == rows


def test_limits_measure_only_runs_of_the_current_plan_and_cache_by_plan(shared, fake, tmp_path, monkeypatch):
    """A model trained under another plan (here another split_seed: other test molecules) is not measured, and
    a cached row of another plan is never returned; a spec with a `data` section is a one-line error."""
    from multifi_experiments import limits
    from multifi_experiments.spec import DataSection, DataSource

    measured = []

    def measure(ctx, plan, model, high, low):  # the row names the test molecules it was measured on
        measured.append(plan.id)
        return {"test_molecules": sum(plan.files["test.keys"]), "both_labelled": 0}

    monkeypatch.setattr(limits, "measure", measure)
    monkeypatch.setattr(limits, "render", lambda ctx, out: "")
    out, rid = tmp_path / "out", "learning_curve/joint_both/n10_s0"
    run_experiment(TINY, overrides=tiny(out), only=[rid])
    ctx = load_context(TINY, tiny(out))
    test_sum = sum(plan_parts(ctx)["learning_curve"].splits["test"])
    assert [r["test_molecules"] for r in limits.run_limits(ctx, plan_parts(ctx))["runs"]] == [test_sum]
    other = load_context(TINY, tiny(out, "split_seed=8"))
    assert limits.run_limits(other, plan_parts(other))["runs"] == []  # the model of split_seed 7 is not this plan's
    run_experiment(TINY, overrides=tiny(out, "split_seed=8"), only=[rid], redo_stale=True)
    rows = limits.run_limits(other, plan_parts(other))["runs"]
    other_sum = sum(plan_parts(other)["learning_curve"].splits["test"])
    assert other_sum != test_sum and [r["test_molecules"] for r in rows] == [other_sum]
    assert measured == [rid, rid]
    # work folders are not results (a fresh clone has none): a finished run keeps the row its own plan cached
    shutil.rmtree(out / "work")
    assert [r["test_molecules"] for r in limits.run_limits(other, plan_parts(other))["runs"]] == [other_sum]
    assert limits.run_limits(ctx, plan_parts(ctx))["runs"] == []  # the cached row is split_seed 8's
    assert measured == [rid, rid]
    ctx.spec.data = DataSection(sources=[DataSource(path="x.jsonl")])
    with pytest.raises(MultifiError, match="limits measures QM9 learning curves only") as exc:
        limits.run_limits(ctx, {"learning_curve": None})
    assert "\n" not in str(exc.value)


def test_limits_curve_mae_counts_every_test_molecule_when_the_low_fidelity_labels_fewer(shared, tmp_path, monkeypatch):
    """With split_methods the low fidelity may label only some test molecules: the top-fidelity MAE stays the
    curve's number (every test molecule), the two-fidelity quantities use the molecules labelled at both."""
    from types import SimpleNamespace

    import multifi.models.registry as registry
    from multifi_experiments import limits

    ctx = load_context(TINY, tiny(tmp_path / "out"))
    plan = next(p for p in plan_parts(ctx)["learning_curve"].plans if p.id == "learning_curve/joint_both/n10_s0")
    high, low = ctx.spec.learning_curve.high, ctx.spec.learning_curve.low
    idx = np.asarray(plan.files["test.keys"], dtype=np.int64)
    both, real = np.isin(idx, idx[:4]), ctx.catalog.energies
    monkeypatch.setattr(ctx.catalog, "energies", lambda m, ids: np.where(both | (m == high), real(m, ids), np.nan))
    wiggle = 1 + 0.1 * (-1) ** np.arange(len(idx))  # mean 1 on the four molecules labelled at both
    errors = {high: np.where(both, 0.001 * wiggle, 0.003), low: 0.002 * wiggle}  # eV
    monkeypatch.setattr(limits, "predict_energies", lambda pot, ids, f: real(f, ids) + errors[f])
    monkeypatch.setattr(
        registry, "load_potential", lambda path: SimpleNamespace(fidelities=SimpleNamespace(names=[high, low]))
    )
    monkeypatch.setattr(limits, "embedding_movement", lambda *a: {})
    row = limits.measure(ctx, plan, tmp_path / "model.pt", high, low)
    assert (row["test_molecules"], row["both_labelled"]) == (10, 4)
    assert row["high_mae_meV"] == pytest.approx((4 * 1 + 6 * 3) / 10, rel=1e-6)
    assert row["high_mae_both_meV"] == pytest.approx(1.0, rel=1e-6)
    assert row["low_mae_meV"] == pytest.approx(2.0, rel=1e-6) and row["difference_mae_meV"] == pytest.approx(
        1.0, rel=1e-6
    )


# ---------------------------------------------------------------------------------------------- spec errors
@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "learning_curve.variants.single.kindd=single",
            "unknown key 'learning_curve.variants.single.kindd'; did you mean 'kind'",
        ),
        ("transfer.nss=[1]", "did you mean 'ns'"),
        ("learning_curve.efficiency.reference=singel", "did you mean 'single'"),
        ("learning_curve.efficiency_more=[{at: [10], reference: singel}]", "did you mean 'single'"),
        ("learning_curve.efficiency_more=[{at: [15]}]", "efficiency_more[0].at: [15] not among"),
        ("learning_curve.variants.bad={kind: joint}", "joint variant needs inject"),
        ("base.model.featurs=8", "unknown key 'model.featurs'; did you mean 'features'"),
        ("learning_curve.ns=[10, 50]", "n=50 is larger"),
        ("learning_curve.low=B3LYP/6-31G(2df,p)", "high and low are the same fidelity"),
        ("learning_curve.ns=[10, 20, 10]", "ns lists a size more than once: [10, 20, 10]"),
    ],
)
def test_spec_errors_are_one_line(shared, tmp_path, override, needle):
    with pytest.raises(MultifiError) as exc:
        ctx = load_context(TINY, tiny(tmp_path / "out", override))
        plan_parts(ctx)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_an_output_folder_of_another_experiment_is_not_taken_over(shared, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# other_experiment: something else\n")
    with pytest.raises(MultifiError, match="holds the results of experiment 'other_experiment'.*not 'tiny'"):
        load_context(TINY, tiny(out))
    (out / "README.md").write_text("# tiny: the same spec's earlier report\n")
    load_context(TINY, tiny(out))


def test_a_method_listed_without_its_table_is_named_as_such(shared, tmp_path):
    """PBE/3-21G is in the manifest, its labels are not computed yet: said so, not "did you mean HF/3-21G"."""
    with pytest.raises(MultifiError, match=r"method 'PBE/3-21G' is listed in the manifest but its label table is not"):
        run_experiment(TINY, overrides=tiny(tmp_path / "out", "learning_curve.low=PBE/3-21G"), report_only=True)


def test_unknown_variant_kind_is_one_line_at_spec_load_naming_file_and_known_kinds(tmp_path, capsys):
    """Before any planning or data access: the spec file, the key, a suggestion and every registered kind."""
    from test_cli import fails

    from multifi_experiments.kinds import KINDS

    spec = tmp_path / "bad.yaml"
    spec.write_text(TINY.read_text().replace("kind: joint", "kind: joinnt", 1))
    assert "kind: joinnt" in spec.read_text()
    line = fails(
        ["experiment", "run", spec, "--set", f"output={tmp_path / 'out'}", "--report-only"],
        capsys,
        str(spec),
        "kind: unknown kind 'joinnt'; did you mean 'joint'?",
        f"(known: {', '.join(KINDS)})",
    )
    assert set(KINDS) == {"single", "joint", "delta", "finetune", "pretrain_joint"}, line
    assert not (tmp_path / "out").exists()


def _hf_pool(shared: Path, block: list[int], pool: list[int]) -> None:
    """HF/3-21G labels on `block` (listed in qm9mf) and on `pool` (listed in qm9mf/pool)."""
    for folder, ids in ((shared / "qm9mf", block), (shared / "qm9mf" / "pool", pool)):
        folder.mkdir(exist_ok=True)
        manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else {}
        name = _labels(folder / "HF_3-21G.csv.gz", np.array(ids), -10.0 * np.ones(len(ids)))
        files = [*manifest.get("files", []), {"file": name, "fidelity": "HF/3-21G"}]
        (folder / "manifest.json").write_text(json.dumps({**manifest, "files": files}))


def test_low_fidelity_from_several_label_folders_keeps_the_test_set(shared, tmp_path):
    """label_folders adds qm9mf/pool: a method's labels are the union of its tables, each run source reads the
    molecules of its own table; split_methods keeps the test/validation molecules of a GFN2-xTB curve."""
    geo_index = np.sort(catalog_mod.LabelCatalog(shared).labelled("GFN2-xTB"))
    _hf_pool(shared, block=geo_index[:20].tolist(), pool=geo_index[100:170].tolist())
    keep = ["ten_methods=null", "embedding_map=null", "transfer=null"]
    gfn2 = plan_parts(load_context(TINY, tiny(tmp_path / "a", *keep)))["learning_curve"]
    more = [*keep, "label_folders=[qm9mf, qm9mf/pool]", "learning_curve.low=HF/3-21G"]
    more += ["learning_curve.split_methods=[GFN2-xTB]", "learning_curve.n_low=null"]
    with pytest.raises(MultifiError, match=r"variants.delta: a delta variant predicts with a HF/3-21G label, wh"):
        plan_parts(load_context(TINY, tiny(tmp_path / "b", *more)))  # the test molecules lack HF/3-21G labels
    more += ["learning_curve.variants={single: {kind: single}, joint_both: {kind: joint, inject: both}}"]
    more += ["learning_curve.efficiency_more=[]"]
    ctx = load_context(TINY, tiny(tmp_path / "b", *more))
    hf = plan_parts(ctx)["learning_curve"]
    assert hf.splits["test"] == gfn2.splits["test"] and hf.splits["val"] == gfn2.splits["val"]
    labelled = set(geo_index[:20].tolist()) | set(geo_index[100:170].tolist())
    held_out = set(hf.splits["test"]) | set(hf.splits["val"])
    assert set(hf.splits["low_pool"]) == labelled - held_out
    joint = next(p for p in hf.plans if p.id == "learning_curve/joint_both/n20_s0")
    hf_sources = [s["qm9"] for s in joint.config["data"]["sources"] if s["qm9"]["fidelity"] == "HF/3-21G"]
    assert sorted(s["labels"] for s in hf_sources) == [
        "{shared}/qm9mf/HF_3-21G.csv.gz",
        "{shared}/qm9mf/pool/HF_3-21G.csv.gz",
    ]
    read = {s["labels"]: set(joint.files[s["indices"].split("/")[-1]]) for s in hf_sources}
    assert read["{shared}/qm9mf/HF_3-21G.csv.gz"] <= set(geo_index[:20].tolist())
    assert read["{shared}/qm9mf/pool/HF_3-21G.csv.gz"] <= set(geo_index[100:170].tolist())
    assert set().union(*read.values()) == set(hf.splits["low_pool"])
    with pytest.raises(MultifiError, match=r"tiny.yaml: ten_methods keeps its blocks disjoint"):  # no ': : '
        load_context(TINY, tiny(tmp_path / "c", "label_folders=[qm9mf, qm9mf/pool]"))
    assert load_context(TINY, tiny(tmp_path / "c", "label_folders=[qm9mf/]")).spec.label_folders == ["qm9mf"]
    with pytest.raises(MultifiError, match=r"label_folders: qm9mf/pool is listed more than once"):
        load_context(TINY, tiny(tmp_path / "c", *more, "label_folders=[qm9mf, qm9mf/pool, qm9mf/pool/]"))


def test_reference_curves_from_another_results_folder_give_the_factor(shared, fake, tmp_path):
    """A curve with HF/3-21G as the low fidelity borrows the single-fidelity curve of the GFN2-xTB spec (same
    test set, checked) for its data-efficiency factor; a different test set is refused."""
    geo_index = np.sort(catalog_mod.LabelCatalog(shared).labelled("GFN2-xTB"))
    _hf_pool(shared, block=geo_index[:20].tolist(), pool=geo_index[100:170].tolist())
    keep = ["ten_methods=null", "embedding_map=null", "transfer=null", "learning_curve.efficiency_more=[]"]
    first = tmp_path / "gfn2"
    run_experiment(TINY, overrides=tiny(first, *keep), only=["learning_curve/single"])
    hf = [*keep, "label_folders=[qm9mf, qm9mf/pool]", "learning_curve.low=HF/3-21G", "learning_curve.n_low=null"]
    hf += ["learning_curve.variants={joint_both: {kind: joint, inject: both}}", "learning_curve.efficiency.at=[10]"]
    hf += [f"learning_curve.reference_curves={{results: {first}, variants: [single]}}"]
    out = tmp_path / "hf"
    run_experiment(TINY, overrides=tiny(out, *hf, "learning_curve.split_methods=[GFN2-xTB]"))
    summary = json.loads((out / "summary.json").read_text())
    borrowed = json.loads((first / "summary.json").read_text())["learning_curve"]["single"]
    assert summary["learning_curve"]["single"] == borrowed
    assert summary["data_efficiency"]["best_variant"] == "joint_both" and summary["data_efficiency"]["n10"] > 0
    assert f"({first})" in (out / "README.md").read_text()
    with pytest.raises(MultifiError, match="its test set is not this spec's"):
        run_experiment(TINY, overrides=tiny(tmp_path / "hf2", *hf), report_only=True)
    # planning the reference folder's spec with another split rewrites its splits file, not its curves:
    # the curves' own test set decides
    plan_parts(load_context(TINY, tiny(first, *keep, "split_seed=8")))
    with pytest.raises(MultifiError, match="its test set is not this spec's"):
        run_experiment(
            TINY, overrides=tiny(tmp_path / "hf3", *hf, "learning_curve.split_methods=[GFN2-xTB]", "split_seed=8")
        )
    run_experiment(TINY, overrides=tiny(out, *hf, "learning_curve.split_methods=[GFN2-xTB]"), report_only=True)


def test_pretraining_validates_only_on_molecules_its_fidelity_labels(shared, tmp_path):
    """With split_methods the validation molecules may lack the low fidelity: a pre-training validates on those
    that have it, and none is a one-line error."""
    geo_index = np.sort(catalog_mod.LabelCatalog(shared).labelled("GFN2-xTB"))
    keep = ["ten_methods=null", "embedding_map=null", "transfer=null", "learning_curve.efficiency_more=[]"]
    keep += [
        "label_folders=[qm9mf, qm9mf/pool]",
        "learning_curve.low=HF/3-21G",
        "learning_curve.split_methods=[GFN2-xTB]",
    ]
    keep += ["learning_curve.n_low=null", "learning_curve.variants={finetune: {kind: finetune}}"]
    keep += ["learning_curve.efficiency.candidates=[finetune]", "learning_curve.efficiency.reference=finetune"]
    gfn2 = plan_parts(load_context(TINY, tiny(tmp_path / "a", "ten_methods=null", "embedding_map=null")))
    val = gfn2["learning_curve"].splits["val"]
    block = [int(i) for i in geo_index[:20] if i not in val]
    _hf_pool(shared, block=block, pool=[int(i) for i in geo_index[100:170] if i not in val])
    with pytest.raises(MultifiError, match="has no validation molecule labelled at it") as exc:
        plan_parts(load_context(TINY, tiny(tmp_path / "b", *keep)))
    assert "\n" not in str(exc.value)
    with_val = sorted([*block, *val[:2]])  # the block table now labels two validation molecules too
    _labels(shared / "qm9mf" / "HF_3-21G.csv.gz", np.array(with_val), -10.0 * np.ones(len(with_val)))
    catalog_mod._read_table.cache_clear()
    catalog_mod._merged_tables.cache_clear()
    parts = plan_parts(load_context(TINY, tiny(tmp_path / "c", *keep)))["learning_curve"]
    (pre,) = [p for p in parts.plans if p.id.endswith("pretrain_s0")]
    assert sorted(pre.files["val.keys"]) == sorted(val[:2])


def test_a_molecule_labelled_in_two_tables_is_an_error(shared):
    _hf_pool(shared, block=[1, 2, 3], pool=[3, 4])
    cat = catalog_mod.LabelCatalog(shared, ["qm9mf", "qm9mf/pool"])
    with pytest.raises(MultifiError, match="molecule 3 is labelled in more than one"):
        cat.labelled("HF/3-21G")
    with pytest.raises(MultifiError, match="no such file"):
        catalog_mod.LabelCatalog(shared, ["qm9mf", "qm9mf/elsewhere"])


def test_shared_data_path_env_overrides_spec(tmp_path, monkeypatch):
    monkeypatch.delenv("MULTIFI_SHARED_DATA", raising=False)
    ctx = load_context(TINY, ["shared_data=/somewhere/else"])
    assert ctx.paths.shared == Path("/somewhere/else")
    assert load_context(TINY).paths.shared == (ROOT.parent / "shared" / "data").resolve()
    monkeypatch.setenv("MULTIFI_SHARED_DATA", str(tmp_path))
    assert load_context(TINY, ["shared_data=/somewhere/else"]).paths.shared == tmp_path
    monkeypatch.delenv("MULTIFI_SHARED_DATA")  # a folder that is not there: one error naming it, not "unknown method"
    with pytest.raises(MultifiError, match=r"^/somewhere/else: no such shared data folder"):
        plan_parts(load_context(TINY, ["shared_data=/somewhere/else", f"output={tmp_path / 'out'}"]), write=False)


# ---------------------------------------------------------------------------------------------- data efficiency
NS = [100, 250, 500, 1000, 2000, 4000]


def power_law(n, a=3000.0, b=0.45):
    return a * np.asarray(n, dtype=float) ** -b


@pytest.mark.parametrize("k", [1.0, 2.5, 4.0, 7.3])
def test_efficiency_recovers_factor_of_power_law_inside_range(k):
    ref = power_law(NS)
    for n in (500, 1000):
        e = efficiency_factor(NS, ref, n, float(power_law(k * n)))  # the joint curve is the reference at k·n
        if k * n <= max(NS):
            assert e.factor == pytest.approx(k, rel=1e-9) and not e.extrapolated


def test_readme_states_the_reference_slopes_it_extrapolates_with():
    from multifi_experiments.readme import _slopes

    eff = {"reference_ns": [100, 200, 400], "reference_maes": [400.0, 200.0, 141.4213562]}
    assert _slopes(eff) == " (-0.50; the segment before: -1.00)"
    assert _slopes({"reference_ns": [100], "reference_maes": [1.0]}) == ""


def test_efficiency_flags_extrapolation_and_stays_exact_on_power_law():
    ref = power_law(NS)
    e = efficiency_factor(NS, ref, 1000, float(power_law(10 * 1000)))  # needs 10 000 > 4 000 measured
    assert e.extrapolated and e.factor == pytest.approx(10.0, rel=1e-9) and "beyond the largest" in e.note
    e = efficiency_factor(NS, ref, 500, float(power_law(0.1 * 500)))  # worse than the smallest n measured
    assert e.extrapolated and e.factor == pytest.approx(0.1, rel=1e-9) and "below the smallest" in e.note


def test_efficiency_interpolates_between_points_of_a_kinked_curve():
    ns, maes = [100, 1000, 10000], [100.0, 10.0, 5.0]  # slope −1 then −0.301 in log-log
    n, extrapolated, _ = n_for_error(ns, maes, 20.0)
    assert not extrapolated and n == pytest.approx(500.0)
    n, extrapolated, _ = n_for_error(ns, maes, 10.0 * 2**-0.5)  # halfway (log) along the second segment
    assert n == pytest.approx(10**3.5) and not extrapolated


def test_efficiency_without_a_decreasing_end_is_undefined_but_flagged():
    e = efficiency_factor([100, 1000], [10.0, 12.0], 500, 5.0)
    assert e.factor is None and e.extrapolated and "does not decrease" in e.note
    assert efficiency_factor([100], [10.0], 100, 5.0).factor is None
    assert math.isclose(efficiency_factor([100, 1000], [10.0, 10.0], 100, 10.0).factor, 1.0)
    # an almost flat end segment extrapolates beyond any data set (was an OverflowError): undefined, flagged
    e = efficiency_factor([4, 7, 10], [158.03, 158.02, 158.01], 7, 150.0)
    assert e.factor is None and e.extrapolated and "almost flat" in e.note
    # a nearly flat end reaching the target 9 decades on (1127.2 → 1127.0 meV, "power law: 4.5e+09"): undefined
    e = efficiency_factor([50, 100, 200], [1200.0, 1127.2, 1127.0], 50, 1100.0)
    assert e.factor is None and "more than 100× beyond the measured n" in e.note
    e = efficiency_factor([50, 100, 200], [1200.0, 1000.0, 800.0], 50, 700.0)  # 1.9× beyond: reported
    assert e.extrapolated and e.factor == pytest.approx(200 * (700 / 800) ** (math.log(2) / math.log(800 / 1000)) / 50)


# ---------------------------------------------------------------------------------------------- convergence
CONVERGE = "convergence={val_every_n_steps: 2, patience_steps: 4, max_steps: 30}"


def test_convergence_rule_monitors_each_runs_target_fidelity(shared, tmp_path):
    """The same rule for every variant; each run watches its own target: the top fidelity (single, joint,
    finetune, pretrain_joint), its Δ label (delta), the low fidelity (pre-training), all methods (transfer)."""
    more = ["learning_curve.variants.pj={kind: pretrain_joint, inject: both}"]
    parts = plan_parts(load_context(TINY, tiny(tmp_path / "out", CONVERGE, *more)))
    high, low = "B3LYP/6-31G(2df,p)", "GFN2-xTB"
    for plan in (p for pp in parts.values() for p in pp.plans):
        t = plan.config["train"]
        assert (t["max_steps"], t["val_every_n_steps"], t["early_stopping_steps"]) == (30, 2, 4), plan.id
        want = {"pretrain": low, "delta": f"delta({high} - {low})"}
        role = "pretrain" if "pretrain_s" in plan.id else plan.meta.get("kind")
        if plan.part == "learning_curve":
            assert t["monitor"] == want.get(role, high), plan.id
        elif plan.meta.get("role") == "joint":
            assert t["monitor"] is None, plan.id  # several targets: the validation loss over all of them
        else:
            assert t["monitor"] == plan.meta["methods"][0], plan.id
    pj = [p for p in parts["learning_curve"].plans if "/pj/" in p.id]
    assert pj[0].id.endswith("pretrain_s0") and pj[0].meta["kind"] == "joint"  # pre-trained with the embedding
    assert pj[1].config["train"]["init_fidelities"] == {high: low} and pj[1].needs == [pj[0].id]


class _Crash(Exception):
    pass


def test_killed_mid_run_continues_from_its_checkpoint(shared, tmp_path, monkeypatch):
    """A run that dies mid-way continues from its last checkpoint on the next `experiment run`, with its
    clock summed over both starts, and ends where an uninterrupted run ends."""
    import lightning as L

    only = ["learning_curve/single/n20_s0"]
    args = [CONVERGE, "convergence.patience_steps=1000", "base.train.checkpoint_every_n_steps=2"]
    run_experiment(TINY, overrides=tiny(tmp_path / "whole", *args), only=only)
    whole = json.loads((tmp_path / "whole/runs/learning_curve/single/n20_s0.json").read_text())
    assert whole["steps"] == 30 and whole["starts"] == 1 and not whole["stopped_early"]

    class Bomb(L.Callback):
        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == 13:
                raise _Crash("killed")

    make = trainer_mod.make_trainer
    monkeypatch.setattr(trainer_mod, "make_trainer", lambda *a, **k: _with_callback(make(*a, **k), Bomb()))
    out = tmp_path / "cut"
    with pytest.raises(MultifiError, match="1 run"):
        run_experiment(TINY, overrides=tiny(out, *args), only=only)
    run = out / "work/learning_curve/single/n20_s0/run"
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 12
    ctx = load_context(TINY, tiny(out, *args))
    (flying,) = experiment_status(ctx, only)
    assert flying.state == "in flight" and flying.steps == 12 and 2 <= flying.best_step <= 12
    assert flying.cpu_seconds > 0 and flying.starts == 1
    assert flying.running is False and "stopped" in status_table("tiny", [flying])  # killed: no process holds it
    with runner_mod._lock(lock_path(ctx, only[0])):  # as while a runner trains it
        (held,) = experiment_status(ctx, only)
        assert held.running is True and "running" in status_table("tiny", [held])
    pid, start = process_identity(os.getpid()).split()
    lock_path(ctx, only[0]).write_text(f"{pid} {int(start) + 1}")  # a live process id reused by another process
    assert experiment_status(ctx, only)[0].running is False
    monkeypatch.setattr(trainer_mod, "make_trainer", make)
    monkeypatch.setattr(runner_mod, "cpu_model", lambda: "Other CPU")  # resumed on another machine
    run_experiment(TINY, overrides=tiny(out, *args), only=only)
    (done,) = experiment_status(load_context(TINY, tiny(out, *args)), only)
    assert (done.state, done.steps, done.starts, done.left_cpu_seconds) == ("done", 30, 2, 0.0)
    cut = json.loads((out / "runs/learning_curve/single/n20_s0.json").read_text())
    assert cut["how"] == "resumed" and cut["starts"] == 2 and cut["steps"] == 30
    assert cut["cpus"] == [*whole["cpus"], "Other CPU"] and whole["cpus"][0] not in ("", "unknown")
    assert cut["cpu_seconds"] > 0 and cut["train_seconds"] >= cut["cpu_seconds"] * 0.2
    import csv

    with open(run / "metrics.csv") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val_loss")]
    assert val_steps == sorted(set(val_steps)) and len(val_steps) == 15  # every 2 steps, none repeated
    assert "resuming" in (out / "work/learning_curve/single/n20_s0/log.txt").read_text()
    high = "B3LYP/6-31G(2df,p)"
    assert cut["test"][high]["mae_meV"] == pytest.approx(whole["test"][high]["mae_meV"], rel=1e-5)
    assert cut["best_step"] == whole["best_step"]


def test_raising_the_cap_continues_capped_runs_and_keeps_converged_ones(shared, tmp_path):
    """A run stopped at the old cap continues from its checkpoint to the raised one and ends where a run planned
    with that cap from the start ends; a run that stopped early before the new cap stays done (not retrained);
    a cap below where it stopped makes it another run; pre-trainings keep their own cap."""
    only = ["learning_curve/single/n20_s0"]
    every = "base.train={epochs: 2, batch_size: 8, lr: 0.005, warmup_steps: 0, schedule: plateau, checkpoint_every_n_steps: 2}"
    capped = ["convergence={val_every_n_steps: 2, patience_steps: 1000, max_steps: 16}", every]
    raised = [*capped, "convergence.max_steps=30"]
    out, path = tmp_path / "out", "runs/learning_curve/single/n20_s0.json"
    run_experiment(TINY, overrides=tiny(out, *capped), only=only)
    first = json.loads((out / path).read_text())
    assert (first["steps"], first["cap"], first["stopped_early"]) == (16, 16, False)
    (row,) = experiment_status(load_context(TINY, tiny(out, *raised)), only)
    assert (row.state, row.steps, row.cap_steps, row.resumable) == ("to extend", 16, 30, True)
    assert row.left_cpu_seconds == pytest.approx(first["cpu_seconds"] * 14 / 16, rel=0.01)
    run_experiment(TINY, overrides=tiny(out, *raised), report_only=True)  # reported, flagged as not converged
    assert "learning_curve/single/n20_s0 (16 steps)" in (out / "README.md").read_text()
    assert json.loads((out / "details.json").read_text())["capped_runs"] == only
    run_experiment(TINY, overrides=tiny(out, *raised), only=only)
    ext = json.loads((out / path).read_text())
    assert (ext["steps"], ext["cap"], ext["starts"], ext["how"]) == (30, 30, 2, "extended to a raised cap")
    assert ext["cpu_seconds"] > first["cpu_seconds"]
    assert "continuing to 30" in (out / "work/learning_curve/single/n20_s0/log.txt").read_text()
    run_experiment(TINY, overrides=tiny(tmp_path / "whole", *raised), only=only)
    whole = json.loads((tmp_path / "whole" / path).read_text())
    high = "B3LYP/6-31G(2df,p)"
    assert ext["test"][high]["mae_meV"] == pytest.approx(whole["test"][high]["mae_meV"], rel=1e-5)
    assert ext["best_step"] == whole["best_step"]

    early = tiny(tmp_path / "early", CONVERGE, every)  # patience 4: stops before its cap of 30
    run_experiment(TINY, overrides=early, only=only)
    stopped = json.loads((tmp_path / "early" / path).read_text())
    assert stopped["stopped_early"] and stopped["steps"] < 30
    before = result_files(tmp_path / "early")
    for cap, state in ((60, "done"), (stopped["steps"] - 2, "stale")):
        (row,) = experiment_status(load_context(TINY, [*early, f"convergence.max_steps={cap}"]), only)
        assert row.state == state, cap
    run_experiment(TINY, overrides=[*early, "convergence.max_steps=60"], only=only)
    assert result_files(tmp_path / "early") == before
    cosine = [*capped[:1], "base.train.checkpoint_every_n_steps=2"]  # the learning rate follows the cap: no extension
    run_experiment(TINY, overrides=tiny(tmp_path / "cos", *cosine), only=only)
    (row,) = experiment_status(load_context(TINY, tiny(tmp_path / "cos", *cosine, "convergence.max_steps=30")), only)
    assert row.state == "stale"

    parts = plan_parts(load_context(TINY, tiny(tmp_path / "p", CONVERGE, "convergence.pretrain_max_steps=8")))
    caps = {p.id: p.config["train"]["max_steps"] for p in parts["learning_curve"].plans}
    assert {c for i, c in caps.items() if "/pretrain_s" in i} == {8} and {c for i, c in caps.items() if "/n" in i} == {
        30
    }


def _with_callback(trainer, callback):
    trainer.callbacks.append(callback)
    return trainer


def test_shipped_qm9_converged_spec_validates(tmp_path):
    """The converged spec: the same rule for every variant, validation on the target fidelity."""
    from multifi_experiments.spec import load_spec

    s, _ = load_spec(ROOT / "experiments/qm9_converged.yaml", [f"output={tmp_path / 'out'}"])
    assert s.convergence is not None and s.convergence.patience_steps < s.convergence.max_steps
    assert s.base.model["features"] >= 64 and s.base.model["interactions"] >= 3
    lc = s.learning_curve
    assert lc.n_low is None and max(lc.ns) >= 16000
    assert {v.kind for v in lc.variants.values()} >= {"single", "joint", "finetune", "delta", "pretrain_joint"}
    hf, _ = load_spec(ROOT / "experiments/qm9_converged_hf.yaml", [f"output={tmp_path / 'hf'}"])
    assert hf.learning_curve.reference_curves.results == "results/qm9_converged" and hf.convergence == s.convergence
    assert hf.base == s.base and hf.learning_curve.split_methods == [lc.low] and hf.learning_curve.val == lc.val


def test_step_matched_controls_train_equal_steps_and_report_apart(shared, fake, tmp_path):
    """With step_matched, every joint and separate model of transfer / ten methods gets a twin trained exactly
    that many steps; the twins are reported in their own table and never mix into the main comparison."""
    out = tmp_path / "out"
    args = tiny(out, CONVERGE, "ten_methods.step_matched=6", "transfer.step_matched=5", "transfer.ns=[8]")
    parts = plan_parts(load_context(TINY, args))
    controls = [p for name in ("transfer", "ten_methods") for p in parts[name].plans if p.meta.get("control")]
    main = [p for name in ("transfer", "ten_methods") for p in parts[name].plans if not p.meta.get("control")]
    assert len(controls) == len(main) > 0
    for p in controls:
        t = p.config["train"]
        steps = 5 if p.part == "transfer" else 6
        assert t["max_steps"] == steps and t["early_stopping_steps"] is None and f"/steps{steps}/" in p.id
    for p in main:
        assert p.config["train"]["max_steps"] == 30 and p.config["train"]["early_stopping_steps"] == 4
    run_experiment(TINY, overrides=args, only=["ten_methods", "transfer"])
    details = json.loads((out / "details.json").read_text())
    assert set(details["ten_methods_steps"]) == {"6 steps"} and set(details["transfer_steps"]) == {"5 steps"}
    assert list(details["ten_methods_steps"]["6 steps"]) == list(details["ten_methods"]["methods"])  # same order
    assert details["embedding_map"]["run"] == "ten_methods/s0/joint"
    for row in details["ten_methods"]["methods"].values():  # main table: one value per seed, not two
        assert row["joint"]["seeds"] == row["separate"]["seeds"] == 2
    assert "### Step-matched control: every model 6 steps" in (out / "README.md").read_text()


def test_signature_resolves_backbone_default_keys():
    """Plan signatures hash backbone-default keys as the run resolves them: a key pinned to the generic default
    hashes like the empty section every run had before backbone defaults existed (so such runs stay done),
    and an unset key hashes like the backbone's default (so runs made with the generic one become stale)."""
    from multifi_experiments import plan as plan_module
    from multifi_experiments.plan import RunPlan

    def sig(model, loss, train=None, resolve=True):
        config = {
            "model": model,
            "loss": loss,
            "train": {"lr": 0.001} if train is None else train,
            "data": {"sources": []},
        }
        p = RunPlan("x/y", "x", config, {}, {})
        if resolve:
            return p.signature()
        original = plan_module._resolved_backbone_keys
        plan_module._resolved_backbone_keys = lambda cfg: cfg
        try:
            return p.signature()
        finally:
            plan_module._resolved_backbone_keys = original

    painn = {"backbone": "painn"}
    legacy = sig(painn, {}, resolve=False)  # what a run made with the generic defaults stored
    assert sig(painn, {"kind": "mse"}) == legacy == sig(painn, {"kind": "mse", "huber_delta": 0.01})
    assert sig(painn, {}) != legacy and sig(painn, {}) == sig(painn, {"kind": "huber"})
    m3gnet = {"backbone": "m3gnet"}
    explicit = {"kind": "huber", "huber_delta": 0.1, "energy": 10.0}
    full_train = {"lr": 0.003, "warmup_steps": 50}
    assert sig(m3gnet, explicit, full_train) == sig(m3gnet, explicit, full_train, resolve=False)  # unchanged
    assert sig(m3gnet, {}, {}) == sig(m3gnet, explicit, full_train)
    assert sig(m3gnet, {"kind": "mse"}, full_train) != sig(m3gnet, explicit, full_train)
    # execution settings do not change what a run computes
    assert sig({**painn, "compile": True}, {}) == sig(painn, {}) == sig(painn, {}, {"lr": 0.001, "threads": 2})


def test_errors_are_compared_without_structures_whose_references_were_estimated():
    """A joint model predicts test structures with an element the target method's training labels lacked (its
    reference estimated); a model of that method alone leaves them out. The report compares the errors without
    them (fitted_only) and keeps the others in the run's JSON."""
    from multifi_experiments.baselines import _errors
    from multifi_experiments.report import _mae

    whole = {
        "n": 50,
        "energy_mae_meV": 900.0,
        "energy_rmse_meV": 2000.0,
        "energy_mae_meV_per_atom": 400.0,
        "n_estimated_references": 8,
        "fitted_references": {
            "n": 42,
            "energy_mae_meV": 300.0,
            "energy_rmse_meV": 400.0,
            "energy_mae_meV_per_atom": 100.0,
        },
    }
    errors = _errors(whole)
    assert errors["n"] == 50 and errors["estimated"] == 8 and errors["fitted_only"]["n"] == 42
    result = {"test": {"R2SCAN": errors}}
    assert _mae(result, "R2SCAN") == 300.0 and _mae(result, "R2SCAN", "mae_meV_per_atom") == 100.0
    assert _mae(result, "R2SCAN", "n") == 42
    plain = {
        "test": {"R2SCAN": _errors({k: v for k, v in whole.items() if k in ("n", "energy_mae_meV", "energy_rmse_meV")})}
    }
    assert _mae(plain, "R2SCAN") == 900.0 and "fitted_only" not in plain["test"]["R2SCAN"]


def test_results_over_other_test_structures_than_the_reference_are_left_out_and_named():
    """A joint result counted over 50 test structures while the single-fidelity run of the same n and seed could
    predict 36 (a result from before the errors without estimated references): out of curves, named."""
    from types import SimpleNamespace

    from multifi_experiments.report import _same_structures

    def plan(variant, n, seed):
        return SimpleNamespace(id=f"{variant}/n{n}_s{seed}", meta={"variant": variant, "n": n, "seed": seed})

    plans = [
        plan("single", 11, 0),
        plan("joint", 11, 0),
        plan("single", 11, 1),
        plan("joint", 11, 1),
        plan("joint", 23, 0),
    ]
    count = {"single/n11_s0": 36, "joint/n11_s0": 50, "single/n11_s1": 43, "joint/n11_s1": 43, "joint/n23_s0": 50}
    results = {k: {"test": {"R2SCAN": {"n": c, "mae_meV": 1.0}}} for k, c in count.items()}
    keep, differ = _same_structures(plans, results, "R2SCAN", "single")
    assert [p.id for p in keep] == ["single/n11_s0", "single/n11_s1", "joint/n11_s1", "joint/n23_s0"]
    assert differ == {"joint n=11": ["seed 0: 50 vs 36"]}


def test_factor_cells_give_the_seed_spread_and_never_average_lower_bounds():
    from multifi_experiments.readme import _seed_spread

    two = {"mean": 2.35, "std": 0.02, "values": [2.37, 2.33], "bounds": [None, None]}
    assert _seed_spread(two) == " (2.35 ± 0.02, 2 seeds)"
    assert _seed_spread({"mean": 3.5, "std": None, "values": [3.5], "bounds": [None]}) == ""
    bounded = {"values": [1.53, 1.38, 3.9565217391304346, None, 0.5], "bounds": [None, None, "lower", None, "upper"]}
    assert _seed_spread(bounded) == " (seeds: 1.53, 1.38, > 4.0, —, < 0.5)"


def test_seed_factors_that_are_bounds_or_undefined_get_no_mean():
    """summary.json's per-seed factors: a mean over lower bounds, or one leaving out a seed without a factor,
    would read as a measurement."""
    from multifi_experiments.report import _factor_spread

    ns, maes = [10, 20, 40], [100.0, 70.0, 50.0]
    ok = _factor_spread(ns, maes, 10, [70.0, 100.0])
    assert ok["values"] == pytest.approx([2.0, 1.0]) and ok["mean"] == pytest.approx(1.5)
    beyond = _factor_spread(ns, maes, 10, [70.0, 40.0])
    assert "mean" not in beyond and beyond["bounds"] == [None, "lower"] and beyond["values"] == pytest.approx([2, 4])
    worse = _factor_spread(ns, maes, 10, [150.0])
    assert worse["bounds"] == ["upper"] and worse["values"] == pytest.approx([1.0]) and "mean" not in worse


def test_a_variant_worse_than_the_whole_reference_curve_gets_an_upper_bound_not_a_lower_one():
    """The reference's first segment rises (noise), and the variant is worse than every reference point: the
    reference needs fewer molecules than its smallest n, so the factor is below n_min / n, never '> n_max / n'."""
    from multifi_experiments.efficiency import bounded
    from multifi_experiments.readme import _factor

    ns, maes = [10, 20, 40], [800.0, 909.6, 942.8]
    e = efficiency_factor(ns, maes, 10, 970.8).as_dict()
    assert e["outside"] == "before" and bounded(e, ns) == (1.0, "upper")
    for worse in (850.0, 930.0, 942.8):  # inside the rising segment: interpolated there as 1.39, 3.07, 4.00 before
        assert bounded(efficiency_factor(ns, maes, 10, worse).as_dict(), ns) == (1.0, "upper")
    assert bounded(efficiency_factor(ns, maes, 10, 790.0).as_dict(), ns) == (4.0, "lower")
    dip = efficiency_factor([10, 20, 40, 80], [100.0, 60.0, 80.0, 50.0], 10, 70.0).as_dict()  # first reached at 10-20
    assert dip["outside"] == "" and 1.0 < dip["factor"] < 2.0
    assert _factor(e, ns).startswith("< 1.0")
    better = efficiency_factor(ns, [100.0, 70.0, 50.0], 10, 40.0).as_dict()
    assert better["outside"] == "beyond" and bounded(better, ns) == (4.0, "lower")
    inside = efficiency_factor(ns, [100.0, 70.0, 50.0], 10, 70.0).as_dict()
    assert inside["outside"] == "" and bounded(inside, ns) == (pytest.approx(2.0), None)


def test_a_failed_run_writes_why_into_its_log(tmp_path):
    """The reason a run failed is in its log.txt (one line for a MultifiError, a traceback for a bug)."""
    from multifi_experiments.runner import _run_logging

    for exc, traceback in [
        (MultifiError("train.monitor: none of the 4 validation structures"), False),
        (KeyError("x"), True),
    ]:
        path = tmp_path / f"{type(exc).__name__}.txt"
        with pytest.raises(type(exc)), _run_logging(path):
            raise exc
        text = path.read_text()
        assert f"failed: {type(exc).__name__}: " in text and ("Traceback" in text) == traceback


def test_progress_line_quotes_the_errors_the_report_uses():
    """A run's progress line gives the error over the structures with determined references, as the report's
    tables do, and says how many that is; without estimated references, the plain error."""
    from multifi_experiments.runner import _errors_text

    full = {"n": 4, "mae_meV_per_atom": 213.0, "forces_mae_meV_per_A": 1041.0}
    part = {**full, "fitted_only": {"n": 1, "mae_meV_per_atom": 82.7, "forces_mae_meV_per_A": 843.6}}
    assert _errors_text("R2SCAN", full) == "R2SCAN 213.0 meV/atom, 1041 meV/Å"
    assert _errors_text("R2SCAN", part) == (
        "R2SCAN 82.7 meV/atom, 844 meV/Å (1 of 4 structures; the rest have estimated references)"
    )
    assert _errors_text("B3LYP", {"n": 10, "mae_meV": 50.0}) == "B3LYP 50.0 meV"
    # every structure's reference estimated (fitted_only {"n": 0}): the error over all, not a KeyError that marked
    # the finished run as failed
    assert _errors_text("B3LYP", {"n": 3, "mae_meV": 9.0, "fitted_only": {"n": 0}}) == "B3LYP 9.0 meV"
    assert _errors_text("B3LYP", {"n": 0}) == "B3LYP: no test error"


def test_the_report_says_how_many_test_structures_the_errors_cover():
    from multifi_experiments.readme import _evaluated

    assert _evaluated({"test": 600, "test_evaluated": [600]}, "molecules") == ""
    assert _evaluated({"test": 600, "test_evaluated": [595]}, "molecules").startswith(", of which 595 evaluated")
    assert ", of which 595–600 evaluated" in _evaluated({"test": 600, "test_evaluated": [595, 600]}, "molecules")


def test_a_run_another_runner_finished_meanwhile_is_kept_not_restarted(shared, fake, tmp_path):
    """Two runners on one spec: the second planned a run the first was training and, once the lock was free,
    trained it again from its finished folder (a new result, `starts` 2, a '2 s' progress line). Now it keeps
    the finished result."""
    from multifi_experiments.runner import run_one

    only = ["learning_curve/single/n10_s0"]
    run_experiment(TINY, overrides=tiny(tmp_path / "out"), only=only)
    ctx = load_context(TINY, tiny(tmp_path / "out"))
    (plan,) = [p for pp in plan_parts(ctx).values() for p in pp.plans if p.id == only[0]]
    path = tmp_path / "out/runs/learning_curve/single/n10_s0.json"
    before, calls = path.read_bytes(), len(fake)
    again = run_one(ctx, plan)  # as the second runner does when its turn comes
    assert again["finished_elsewhere"] and len(fake) == calls and path.read_bytes() == before


def test_epochs_of_a_run_count_the_epochs_trained(tmp_path):
    """A run that ended on an epoch's last step: Lightning's `epoch` field is already the next one; the epochs
    trained come from the loop's progress (8 epochs of 2 steps, not 9); a run stopped inside its 56th epoch: 56."""
    import torch

    from multifi_experiments.runner import _progress_of

    (tmp_path / "checkpoints").mkdir()
    for epoch, started, expected in ((8, 8, 8), (55, 56, 56)):
        progress = {"total": {"ready": started, "started": started, "processed": epoch, "completed": epoch}}
        torch.save(
            {"epoch": epoch, "loops": {"fit_loop": {"epoch_progress": progress}}}, tmp_path / "checkpoints/last.ckpt"
        )
        assert _progress_of(tmp_path) == {"epochs": expected}


def test_a_run_stopped_by_sigterm_says_to_rerun_the_spec_not_multifi_train(shared, tmp_path, monkeypatch):
    """The training's own hint (multifi train --resume RUN) finished a run outside the runner, which then never
    wrote its clock and result: the runner's hint is its own command."""
    import multifi.train.run as train_run
    from multifi.errors import Terminated

    def stopped(cfg, resume=False, **kw):
        raise Terminated(f"continue with: multifi train --resume {cfg.output_dir}")

    monkeypatch.setattr(train_run, "train", stopped)
    out = tmp_path / "out"
    with pytest.raises(
        Terminated, match=r"learning_curve/single/n10_s0 stopped; continue with: multifi experiment run"
    ):
        run_experiment(TINY, overrides=tiny(out), only=["learning_curve/single/n10_s0"])


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie that no one reaps counts as ended)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_workers_of_a_killed_runner_stop_instead_of_training_on_orphaned(tmp_path):
    """SIGKILL of the runner (an out-of-memory kill, a lost session) stops its workers' runs as a time limit
    would (SIGTERM, which a training handles by stopping at the end of a step), and the workers then exit: an
    orphaned worker would train for hours holding the run's lock, or wait for work forever."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "graceful.py").write_text(
        "import signal, time\n"
        "def run():\n"  # a training: SIGTERM ends it at the next step, and it returns
        "    stop = []\n"
        "    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))\n"
        "    while not stop:\n"
        "        time.sleep(0.05)\n"
        "    return 'stopped'\n"
    )
    script = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import graceful\n"
        "from multifi_experiments.runner import _executor\n"
        "pool = _executor(2, 2)\n"
        "pids = {pool.submit(os.getpid).result() for _ in range(4)}\n"  # workers started and initialised
        "pool.submit(graceful.run)\n"
        "pool.submit(time.sleep, 300)\n"
        "time.sleep(3)\n"
        "import multiprocessing\n"
        "print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) >= 2 and not any(_gone(p) for p in workers)  # two busy, perhaps one idle
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.time() + 30
        while time.time() < deadline and not all(_gone(p) for p in workers):
            time.sleep(0.2)
        assert all(_gone(p) for p in workers), f"workers {workers} outlived the killed runner"
    finally:
        parent.kill()


def test_ctrl_c_stops_the_workers_and_names_the_stopped_runs_and_the_command(tmp_path, monkeypatch):
    """Ctrl-C (or SIGINT to the runner alone) while runs train in workers: the workers get SIGTERM (their runs
    stop with the checkpoint kept) and the message names the stopped runs and the command that continues."""
    import multiprocessing
    import signal
    import time
    from concurrent.futures import Executor, Future
    from types import SimpleNamespace

    spawn = multiprocessing.get_context("spawn")
    bystander = spawn.Process(target=time.sleep, args=(300,))  # the caller's own child (e.g. a Manager): spared
    bystander.start()
    sleeper = spawn.Process(target=time.sleep, args=(300,))  # a worker's stand-in, started with the pool

    class Pool(Executor):
        def __init__(self):
            sleeper.start()

        def submit(self, fn, /, *args, **kwargs):
            return Future()  # never finishes: the runs are training

    def interrupted(futures, return_when):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "_executor", lambda parallel, runs: Pool())
    monkeypatch.setattr(runner_mod, "wait", interrupted)
    plans = [SimpleNamespace(id=f"part/run{k}", needs=[]) for k in range(3)]
    ctx = SimpleNamespace(spec=SimpleNamespace(parallel=2), command="multifi experiment run spec.yaml --only part")
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            runner_mod._execute(ctx, plans)
        assert (
            str(caught.value)
            == "part/run0, part/run1 stopped; continue with: multifi experiment run spec.yaml --only part"
        )
        sleeper.join(30)
        assert sleeper.exitcode == -signal.SIGTERM
        assert bystander.is_alive()
    finally:
        sleeper.kill()
        bystander.kill()


def test_runs_scored_on_other_test_structures_get_the_true_reason_not_an_age():
    """A fresh joint run whose error covers other test structures than the reference's (estimated references
    left out on one side, unseen elements on the other) was said to 'predate' the current code."""
    from multifi_experiments.readme import _count_mismatch

    text = " ".join(
        _count_mismatch(
            {"test_count_mismatch": {"joint n=10": ["seed 0: 7 vs 9"]}, "noun": "structures", "high": "R2SCAN"}
        )
    )
    assert "Not compared on the same test structures" in text and "joint n=10 (seed 0: 7 vs 9)" in text
    assert "reference energy at R2SCAN was estimated" in text and "cover_compositions: true" in text
    assert not _count_mismatch({"noun": "structures"})


def test_a_metric_no_run_measured_gets_a_labelled_empty_panel_without_warnings(tmp_path):
    """Stress asked of a fidelity without stress labels: its panel says nothing was measured (matplotlib warned
    'No artists with labels found' on every report)."""
    import warnings

    from multifi_experiments.plots import learning_curves

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = learning_curves(
            tmp_path / "lc.png",
            [({"single": {"10": {"mean": 5.0, "std": None, "seeds": 1}}}, "energy"), ({"single": {}}, "stress")],
            "title",
        )
    assert path.stat().st_size > 0


def test_progress_lines_give_short_runs_their_seconds():
    """A run of 0.7 s was reported as '0 s'."""
    from multifi_experiments.runner import _seconds_text

    assert _seconds_text(0.7) == "0.7 s" and _seconds_text(9.96) == "10.0 s" and _seconds_text(42.4) == "42 s"
