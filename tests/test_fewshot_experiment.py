"""The few-shot extension experiment on experiments/fewshot_tiny.yaml (synthetic shared folder, real training at
toy size): splits, every run planned and finished, old methods bit-for-bit unchanged after the embedding mode
(from the summary), report files, a second run trains nothing, spec errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_experiments import shared  # noqa: F401  (fixture)

import multifi.train.extend as extend_mod
import multifi.train.run as train_run
from multifi.cli.main import main
from multifi.errors import MultifiError
from multifi_experiments.fewshot import run_spec
from multifi_experiments.runner import run_experiment
from multifi_experiments.spec import load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "fewshot_tiny.yaml"
NEW, OLD = "GFN1-xTB", ["B3LYP/6-31G(2df,p)", "GFN2-xTB", "HF/STO-3G"]
VARIANTS = ("embedding", "head", "all_replay", "scratch", "retrain")


def test_few_shot_loop_tiny(shared, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    calls: list = []
    for mod, name in [(train_run, "train"), (extend_mod, "extend")]:
        real = getattr(mod, name)
        monkeypatch.setattr(
            mod, name, lambda cfg, *a, _real=real, **k: calls.append(cfg.output_dir) or _real(cfg, *a, **k)
        )
    run_spec(SPEC, overrides=[f"output={out}"], only=["few_shot/embedding/n8"])  # one run and its base
    assert sorted(Path(c).parent.name for c in calls) == ["base", "n8_s0"]
    run_spec(SPEC, overrides=[f"output={out}"])

    splits = json.loads((out / "splits" / "few_shot.json").read_text())
    assert set(splits["old"]) == set(OLD)  # every labelled block but the new method's (PBE/3-21G has no labels)
    new_eval = set(splits["new"]["test"]) | set(splits["new"]["val"])
    assert len(splits["new"]["test"]) == 6 and len(splits["new"]["val"]) == 4
    for order in splits["new"]["train_order"].values():
        assert not set(order) & new_eval
    for s in splits["old"].values():
        assert not set(s["train"]) & (set(s["test"]) | set(s["val"]))

    runs = {str(p.relative_to(out / "runs"))[:-5]: json.loads(p.read_text()) for p in (out / "runs").rglob("*.json")}
    expected = {"few_shot/base"} | {f"few_shot/{v}/n{n}_s{s}" for v in VARIANTS for n, s in [(4, 0), (4, 1), (8, 0)]}
    assert set(runs) == expected and len(calls) == len(expected)
    base = runs["few_shot/base"]
    assert set(base["test"]) == set(OLD) and base["meta"]["methods"] == OLD
    for v in VARIANTS:
        r = runs[f"few_shot/{v}/n8_s0"]
        assert r["test"][NEW]["n"] == 6  # the same test molecules for every variant
        if v != "scratch":
            assert set(r["test"]) == {NEW, *OLD}
        train = {int(x) for x in (out / "work" / r["id"] / "inputs" / "source0.idx").read_text().split()} - new_eval
        if v != "retrain":
            assert train == set(splits["new"]["train_order"]["s0"][:8])
    emb = runs["few_shot/embedding/n4_s1"]
    assert emb["old_fidelities_unchanged"] is True
    assert all(emb["forgetting"][m]["before"] == emb["forgetting"][m]["after"] for m in OLD)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == {"planned": 16, "finished": 16}
    assert set(summary["new_test_mae_meV"]) == set(VARIANTS)
    assert all(summary["new_test_mae_meV"][v][n] > 0 for v in VARIANTS for n in ("4", "8"))
    # the embedding mode leaves every old method bit-for-bit as the base model predicts it
    assert summary["old_fidelities_unchanged"]["embedding"] == {"4": True, "8": True}
    assert summary["old_change_max_abs_meV"]["embedding"] == {"4": 0.0, "8": 0.0}
    assert all(summary["old_change_meV"]["embedding"][n][m] == 0.0 for n in ("4", "8") for m in OLD)
    assert summary["old_fidelities_unchanged"]["all_replay"] == {"4": False, "8": False}
    assert "scratch" not in summary["old_change_meV"] or not summary["old_change_meV"]["scratch"]
    assert set(summary["base_test_mae_meV"]) == set(OLD)
    readme = (out / "README.md").read_text()
    assert f"`multifi experiment run experiments/fewshot_tiny.yaml --set output={out}`" in readme
    assert "few_shot.png" in readme and "Forgetting" in readme
    table = readme.split("mean ± std over seeds")[1].split("![few-shot]")[0]
    assert "| embedding | " in table and " ± " in table and " (1 seed) |" in table  # n = 8 has one seed
    assert (out / "few_shot.png").stat().st_size > 1000 and (out / "details.json").exists()

    # finished runs are skipped: nothing trains again, no result is rewritten (through the command line)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    (out / "README.md").unlink()
    assert main(["experiment", "run", str(SPEC), "--set", f"output={out}"]) == 0
    (out / "summary.json").unlink()
    assert main(["experiment", "run", str(SPEC), "--set", f"output={out}", "--report-only"]) == 0
    assert json.loads((out / "summary.json").read_text()) == summary and (out / "README.md").exists()
    assert len(calls) == len(expected)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == before


def test_few_shot_spec_errors(shared, tmp_path):  # noqa: F811
    spec, _ = load_spec(ROOT / "experiments" / "qm9_fewshot.yaml")
    assert spec.few_shot.new == "HF/3-21G" and set(spec.few_shot.modes) == {"embedding", "head", "all_replay"}
    base = {"name": "x", "few_shot": {"ns": [4, 8]}}
    validate_spec(base)
    for patch, fragment in [
        ({"ns": [8, 4]}, "increasing"),
        ({"inject": "single"}, "needs fidelity conditioning"),
        ({"inject": "heads"}, "no trainable fidelity vector"),
        ({"modes": {"scratch": {"train": "head"}}}, "names a baseline"),
        ({"modes": {"e": {"train": "embedding", "replay": 0.1}}}, "replay needs train: head or all"),
    ]:
        with pytest.raises(MultifiError, match=fragment):
            validate_spec({**base, "few_shot": {**base["few_shot"], **patch}})
    with pytest.raises(MultifiError, match="spec of its own"):
        validate_spec({**base, "ten_methods": {}})
    with pytest.raises(MultifiError, match="a few-shot spec"):
        run_experiment(SPEC, overrides=[f"output={tmp_path}"])
    out = [f"output={tmp_path}"]
    with pytest.raises(MultifiError, match="needs 31 molecules of the GFN1-xTB block labelled"):
        run_spec(SPEC, overrides=[*out, "few_shot.ns=[21]"])
    with pytest.raises(MultifiError, match="has no block"):
        run_spec(SPEC, overrides=[*out, "few_shot.new=GFN3"])
    with pytest.raises(MultifiError, match="init_like"):
        run_spec(SPEC, overrides=[*out, "few_shot.init_like=PBE/3-21G"])
