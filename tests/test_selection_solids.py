"""The simulated acquisition loop on structure files (experiments/solids_selection_tiny.yaml): r2SCAN acquired,
PBE known, on a synthetic shared folder in the MatPES schema, trained for real (two epochs of a tiny M3GNet).
Splits by structure, picks unique and never test or validation structures, the joint model's labels per
fidelity, energy and force errors with a factor per metric, and the same picks from the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_experiments_solids import shared  # noqa: F401  (fixture)

from multifi_experiments.runner import load_context
from multifi_experiments.selection import run_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "solids_selection_tiny.yaml"
ARMS = ("joint_uncertainty", "joint_batch", "single_random")


def _records(out: Path) -> dict:
    return {str(p.relative_to(out / "rounds")): json.loads(p.read_text()) for p in (out / "rounds").rglob("*.json")}


def test_selection_loop_on_solids(shared, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run_spec(SPEC, overrides=[f"output={out}"])
    splits = {k: set(v) for k, v in json.loads((out / "splits" / "selection.json").read_text()).items()}
    # 20 structures labelled at both: 4 test, 2 validation, the other 14 are the pool; 20 more carry PBE only
    assert [len(splits[k]) for k in ("test", "val", "pool", "low_extra")] == [4, 2, 14, 20]
    assert all(k.startswith("matpes:") for k in splits["pool"])
    assert not splits["pool"] & (splits["test"] | splits["val"]) and not splits["low_extra"] & splits["pool"]
    held_out = splits["test"] | splits["val"]
    recs = _records(out)
    assert len(recs) == len(ARMS) * 2 * 3  # arms × seeds × rounds
    ctx = load_context(SPEC, [f"output={out}"])
    for arm in ARMS:
        for seed in (0, 1):
            chain = [recs[f"{arm}/s{seed}/r{r}.json"] for r in range(3)]
            picks = [k for c in chain for k in c["picked_keys"]]
            assert [c["n"] for c in chain] == [4, 7, 10] and len(picks) == 6 and len(set(picks)) == 6
            assert set(picks) <= splits["pool"] and not set(picks) & held_out
            assert [ctx.catalog.split_keys([i])[0] for c in chain for i in c["picked_next"]] == picks
            spans = [c["test_not_spanned"] for c in chain]  # nested training sets: the span only grows
            assert spans == sorted(spans, reverse=True) and 0 <= spans[0] <= 4
            for c in chain:
                # an r2SCAN-only model of 4-10 structures may lack an element of every test structure (then
                # it has no test error); a joint model knows every element from PBE
                if arm.startswith("joint") or "R2SCAN" in c["test"]:
                    assert {"mae_meV_per_atom", "forces_mae_meV_per_A"} <= set(c["test"]["R2SCAN"])
                    assert c["test"]["R2SCAN"]["n"] + c["test"]["R2SCAN"].get("unseen", 0) == 4
                assert np.isfinite(c["llpr"]["spearman"])
            # round 2 trains on r2SCAN for the 10 acquired structures (+ val, test), PBE on no held-out one
            inputs = out / "work" / chain[2]["run"] / "inputs"
            r2scan = set((inputs / "source0.keys").read_text().split())
            assert (
                r2scan - held_out > set(picks) and len(r2scan - held_out) == 10 and r2scan - held_out <= splits["pool"]
            )
            if arm.startswith("joint"):
                assert set((inputs / "source1.keys").read_text().split()) == splits["pool"] | splits["low_extra"]
        assert recs[f"{arm}/s0/r0.json"]["picked_keys"] != recs[f"{arm}/s1/r0.json"]["picked_keys"]
    # round 0 takes composition-spanning structures first: 4 structures of independent element counts
    r0 = (out / "work" / recs["joint_batch/s0/r0.json"]["run"] / "inputs" / "source0.keys").read_text().split()
    id_of = {str(k): i for i, k in enumerate(ctx.catalog.dataset().keys.tolist())}
    ids = np.array([id_of[k] for k in r0 if k not in held_out])
    assert len(ids) == 4 and np.linalg.matrix_rank(ctx.catalog.composition(ids).astype(float)) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {
        "test_mae_meV_per_atom",
        "test_forces_mae_meV_per_A",
        "data_efficiency",
        "data_efficiency_bounds",
        "data_efficiency_by_metric",
    }
    assert set(summary["data_efficiency_by_metric"]) == {"energy_per_atom", "forces"}
    assert set(summary["test_mae_meV_per_atom"]["joint_batch"]) == {"4", "7", "10"}
    readme = (out / "README.md").read_text()
    assert "R2SCAN test energy MAE (meV/atom)" in readme and "R2SCAN test force MAE (meV/Å)" in readme
    assert "Data-efficiency factor against `single_random` (force MAE)" in readme

    # the same seed gives the same models and picks (a fresh output folder, one arm, seed 0)
    again = tmp_path / "again"
    run_spec(SPEC, overrides=[f"output={again}", "seeds.count=1"], only=["joint_batch"])
    assert sorted(_records(again)) == [f"joint_batch/s0/r{r}.json" for r in range(3)]
    for name, rec in _records(again).items():
        assert rec["picked_keys"] == recs[name]["picked_keys"] and rec["test"] == recs[name]["test"], name


def test_pool_of_every_structure_labelled_at_both_bounds_the_rounds(shared, tmp_path):  # noqa: F811
    from multifi.errors import MultifiError
    from multifi_experiments.selection import plan_splits

    ctx = load_context(SPEC, [f"output={tmp_path}", "selection.rounds=[4,7,15]"])
    with pytest.raises(MultifiError, match="needs 21 structures labelled at R2SCAN and PBE .* only 20 are"):
        plan_splits(ctx)
    ctx = load_context(SPEC, [f"output={tmp_path}", "selection.pool=10"])
    assert len(plan_splits(ctx)["pool"]) == 10
