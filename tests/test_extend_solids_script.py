"""experiments/extend_solids.py reuses a finished run only when it was made with the same settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "extend_solids.py"


def _script():
    spec = importlib.util.spec_from_file_location("extend_solids", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_finished_run_of_other_settings_is_refused_not_reused(tmp_path):
    es = _script()
    cfg = {"data": {"sources": [{"path": "PBE.jsonl.gz"}]}, "train": {**es.TRAIN, "max_steps": 1500}}
    made = {  # as a run's config.yaml holds it: validated, with every default written out
        "data": {"sources": [{"path": "PBE.jsonl.gz", "fidelity": None, "format": "auto"}], "train_limits": {}},
        "train": {**es.TRAIN, "max_steps": 1500, "seed": 0},
    }
    run = tmp_path / "pbe"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(made))
    (run / "metrics.json").write_text(json.dumps({"fidelities": {}}))
    (run / "cpu_seconds.txt").write_text("1.0\n")
    calls = []
    assert es.run_once(run, lambda: calls.append(1), cfg)["cpu_seconds"] == 1.0 and calls == []
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 3000}}
    with pytest.raises(SystemExit, match=r"pbe: finished with other settings \(train.max_steps = 1500 there, 3000"):
        es.run_once(run, lambda: calls.append(1), longer)
    other = {**cfg, "data": {"sources": [{"path": "R2SCAN.jsonl.gz"}]}}
    assert "data.sources.0.path" in es.first_difference(other, made) and calls == []


def test_table_says_when_a_cell_averages_fewer_seeds():
    es = _script()
    err = {"energy_mae_meV_per_atom": 10.0, "forces_mae_meV_per_A": 100.0}
    run = lambda seed, joint: {  # noqa: E731
        "n": 11,
        "seed": seed,
        "r2scan_only": {"metrics": {"fidelities": {"R2SCAN": err}}, "cpu_seconds": 1.0},
        **({"joint_from_scratch": err} if joint else {}),
        **{
            f"extend_{m}": {
                "metrics": {"fidelities": {"R2SCAN": err}, "forgetting": {"PBE": {"after": err}}},
                "cpu_seconds": 1.0,
            }
            for m in es.MODES
        },
    }
    results = {
        "pbe_model": {"metrics": {"fidelities": {"PBE": err}}, "cpu_seconds": 1.0},
        "runs": {"n11_s0": run(0, True), "n11_s1": run(1, False)},
        "settings": {"ns": [11], "seeds": [0, 1], "steps": 1500},
    }
    text = es.table(results)
    assert "| joint from scratch (results/solids) | 10.0 (1 of 2 seeds) |" in text
    assert "| r2SCAN only | 10.0 |" in text
