"""The simulated acquisition loop on experiments/selection_tiny.yaml (synthetic shared folder, stand-in trainer):
round records, picks inside the pool and never repeated, shared round 0, resume without retraining, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_experiments import shared  # noqa: F401  (fixture)

from multifi.errors import MultifiError
from multifi_experiments.runner import run_experiment
from multifi_experiments.selection import run_spec
from multifi_experiments.spec import validate_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "selection_tiny.yaml"
ARMS = ("joint_random", "joint_uncertainty", "joint_diversity", "joint_batch", "single_random")


def records(out: Path) -> dict:
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted((out / "rounds").rglob("*.json"))}


def status(out: Path, only=()) -> dict:
    from multifi_experiments.runner import load_context
    from multifi_experiments.status import experiment_status

    return {r.id: r for r in experiment_status(load_context(SPEC, [f"output={out}"]), only)}


def test_selection_loop_tiny(shared, fake, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    # status lists every training run once: round 0 per (model, seed), later rounds per (arm, seed)
    planned = status(out)
    assert len(planned) == 2 * 2 + len(ARMS) * 2 * 2 and {r.state for r in planned.values()} == {"to do"}
    assert "selection/joint/s1/r0_n8" in planned and "selection/joint_batch/s1/r2_n20" in planned
    assert sorted(status(out, ["joint_batch"])) == sorted(
        f"selection/{a}/s{s}/r{r}_n{n}"
        for s in (0, 1)
        for a, r, n in (("joint", 0, 8), ("joint_batch", 1, 14), ("joint_batch", 2, 20))
    )
    run_spec(SPEC, overrides=[f"output={out}"])
    finished = status(out)
    assert set(finished) == set(planned) and all(
        r.state == "done" and r.left_cpu_seconds == 0 for r in finished.values()
    )
    splits = {k: set(v) for k, v in json.loads((out / "splits" / "selection.json").read_text()).items()}
    assert len(splits["pool"]) == 60 and not splits["pool"] & (splits["test"] | splits["val"])
    recs = records(out)
    assert len(recs) == len(ARMS) * 2 * 3  # arms × seeds × rounds
    # runs: round 0 once per (model, seed); later rounds once per (arm, seed)
    assert len(fake) == 2 * 2 + len(ARMS) * 2 * 2
    for arm in ARMS:
        for seed in (0, 1):
            chain = [recs[f"rounds/{arm}/s{seed}/r{r}.json"] for r in range(3)]
            assert [c["n"] for c in chain] == [8, 14, 20]
            picks = [i for c in chain for i in c["picked_next"]]
            assert len(picks) == 12 and len(set(picks)) == 12 and set(picks) <= splits["pool"]
            assert len(chain[2]["picked_next"]) == 0
            assert chain[0]["run"] == f"selection/{'single' if arm.startswith('single') else 'joint'}/s{seed}/r0_n8"
            assert chain[1]["run"] == f"selection/{arm}/s{seed}/r1_n14"
            for c in chain:
                assert "B3LYP/6-31G(2df,p)" in c["test"] and set(c["llpr"]) >= {"spearman", "miscalibration_area"}
                assert c["command"] == f"multifi experiment run experiments/selection_tiny.yaml --set output={out}"
            # round 2's top-fidelity labels: round 0's random molecules plus both rounds' picks, val and test
            inputs = out / "work" / chain[2]["run"] / "inputs"
            high = {int(x) for x in (inputs / "source0.idx").read_text().split()}
            train = high - splits["val"] - splits["test"]
            assert len(train) == 20 and set(picks) <= train <= splits["pool"]
            if arm.startswith("joint"):  # the low fidelity on the whole pool
                assert {int(x) for x in (inputs / "source1.idx").read_text().split()} == splits["pool"]
    # picks differ between strategies (same start, same models at round 0)
    first = {arm: tuple(recs[f"rounds/{arm}/s0/r0.json"]["picked_next"]) for arm in ARMS[:4]}
    assert len(set(first.values())) == 4
    # batch picks the largest-σ molecule first, like uncertainty
    assert first["joint_batch"][0] == first["joint_uncertainty"][0]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test_mae_meV"]) == set(ARMS) and set(summary["test_mae_meV"]["joint_batch"]) == {
        "8",
        "14",
        "20",
    }
    assert set(summary["data_efficiency"]) == set(ARMS) - {"single_random"}
    readme = (out / "README.md").read_text()
    assert "Data-efficiency factor against `single_random`" in readme and "selection.png" in readme
    assert (out / "selection.png").stat().st_size > 1000

    # a second run trains nothing and rewrites no record
    before = {p: (out / p).stat().st_mtime_ns for p in recs}
    n_calls = len(fake)
    run_spec(SPEC, overrides=[f"output={out}"])
    assert len(fake) == n_calls and {p: (out / p).stat().st_mtime_ns for p in recs} == before
    # the command line: the report alone, rebuilt from the round records
    (out / "README.md").unlink()
    from multifi.cli.main import main

    assert main(["experiment", "run", str(SPEC), "--set", f"output={out}", "--report-only"]) == 0
    assert len(fake) == n_calls and "Data-efficiency factor" in (out / "README.md").read_text()


def test_selection_spec_errors(tmp_path):
    base = {
        "name": "x",
        "selection": {
            "pool": 10,
            "rounds": [4, 8],
            "models": {"j": {"kind": "joint", "inject": "both"}},
            "arms": {"a": {"model": "j", "strategy": "batch"}},
        },
    }
    validate_spec(base)
    for patch, fragment in [
        ({"rounds": [8, 4]}, "increasing"),
        ({"rounds": [4, 20]}, "pool of 10"),
        ({"arms": {"a": {"model": "k", "strategy": "batch"}}}, "unknown model 'k'"),
        ({"efficiency": {"reference": "b"}}, "unknown arm 'b'"),
        ({"models": {"j": {"kind": "joint"}}}, "needs inject"),
    ]:
        with pytest.raises(MultifiError, match=fragment):
            validate_spec({**base, "selection": {**base["selection"], **patch}})
    with pytest.raises(MultifiError, match="a selection spec"):
        run_experiment(SPEC)
    with pytest.raises(MultifiError, match="spec of its own"):
        validate_spec({**base, "learning_curve": {"variants": {"single": {"kind": "single"}}}})


def test_warm_start_plans_start_from_the_previous_round(shared, tmp_path):  # noqa: F811
    from multifi_experiments.runner import load_context
    from multifi_experiments.selection import initial_picks, plan_splits, round_plan

    ctx = load_context(SPEC, [f"output={tmp_path}", "selection.warm_start=true"])
    splits = plan_splits(ctx)
    acquired = initial_picks(ctx, splits["pool"], 0)
    r0 = round_plan(ctx, "joint_batch", 0, 0, acquired, splits, None)
    more = np.setdiff1d(splits["pool"], acquired)[:6]
    r1 = round_plan(ctx, "joint_batch", 0, 1, np.concatenate([acquired, more]), splits, r0)
    assert r0.id == "selection/joint/s0/r0_n8" and not r0.needs and "init_from" not in r0.config["train"]
    assert r1.needs == [r0.id] and r1.config["train"]["init_from"] == "{model:" + r0.id + "}"
    assert r1.config["train"]["init_fidelities"] == {"B3LYP/6-31G(2df,p)": "B3LYP/6-31G(2df,p)", "GFN2-xTB": "GFN2-xTB"}
    cold = load_context(SPEC, [f"output={tmp_path}"])
    assert (
        "init_from"
        not in round_plan(cold, "joint_batch", 0, 1, np.concatenate([acquired, more]), splits, r0).config["train"]
    )


def test_selection_factors_outside_the_reference_curve_are_bounds():
    """An arm better than the reference at every measured n showed '–' and null (worse arms got numbers): now
    '> n_max/n', and '< n_min/n' for an arm worse than the reference at its smallest n."""
    from multifi_experiments.efficiency import efficiency_factor
    from multifi_experiments.selection_report import _bounds, _factors

    ns, maes = [14, 28, 56], [100.0, 70.0, 50.0]
    eff = {
        "reference_ns": ns,
        "arms": {
            "good": {"14": efficiency_factor(ns, maes, 14, 40.0).as_dict()},
            "mid": {"14": efficiency_factor(ns, maes, 14, 70.0).as_dict()},
            "bad": {"14": efficiency_factor(ns, maes, 14, 120.0).as_dict()},
        },
    }
    f = _factors(eff)
    assert f["good"]["14"] == 4.0 and f["mid"]["14"] == pytest.approx(2.0) and f["bad"]["14"] == 1.0
    assert _bounds(eff) == {"good": {"14": "lower"}, "bad": {"14": "upper"}}
