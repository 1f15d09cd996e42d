"""README's "From Python" block runs as written (in a temporary folder) and its model predicts the labels'
fidelity it is asked for."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- python-api -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its python-api block"
    return match.group(1)


def test_readme_python_block_trains_and_predicts(tmp_path, monkeypatch, caplog):
    """... and says nothing false about its EMT labels (their positive hydrogen reference was taken for Hartree)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with caplog.at_level("WARNING", logger="multifi"):
        exec(compile(python_block(), "README.md (python-api)", "exec"), namespace)
    assert "Hartree" not in caplog.text
    run_dir = Path(namespace["run_dir"])
    assert (run_dir / "model.pt").is_file() and (run_dir / "train.log").is_file()
    energies, forces = namespace["energies"], namespace["forces"]
    assert len(energies) == len(forces) == 81 and np.isfinite(energies).all()
    assert all(s is None for s in namespace["stresses"])
    high = np.array([a.get_potential_energy() for a in namespace["frames"][1::2]])
    low = np.array([a.get_potential_energy() for a in namespace["frames"][::2]])
    predicted = np.asarray(energies)
    # frames[::2] are the "low" copies; predicted at "high" they land nearer the high labels than the low ones
    assert np.abs(predicted - high).mean() < np.abs(predicted - low).mean()
    # evaluate_files: the errors `multifi evaluate` reports, here of the run's own training frames (warned about)
    result = namespace["result"]
    assert set(result.metrics) == {"low", "high"} and result.metrics["high"]["n"] == 81
    k = result.dataset.fidelities.index("high")
    at = result.pairs[:, 1] == k
    labels = result.dataset.energy[result.pairs[at, 0], k]
    mae = 1000 * np.abs(result.predicted[at] - labels).mean()  # meV per structure, recomputed
    assert result.metrics["high"]["energy_mae_meV"] == pytest.approx(mae, rel=1e-6)
    assert "were trained on: their errors are not held-out errors" in caplog.text
    from multifi.evaluation import evaluate_files

    one = evaluate_files(run_dir, str(tmp_path / "frames.extxyz"), diagnose=False)  # one file, not a list
    assert one.payload == result.payload
