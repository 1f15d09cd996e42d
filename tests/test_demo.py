"""The bundled demo end to end at toy size: both models train from the packaged configs, the table and
summary.json come out, and a second call reuses the finished runs."""

from __future__ import annotations

import json

import pytest

from multifi.demo import main

TOY = ["train.epochs=1", "model.features=8", "model.interactions=1", "train.threads=1", "train.progress=false"]


@pytest.mark.slow
def test_demo_runs_at_toy_size_and_reuses_finished_runs(tmp_path, capsys):
    args = ["--out", str(tmp_path / "demo")] + [x for kv in TOY for x in ("--set", kv)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    ratio = summary["single"]["energy_mae_meV"] / summary["joint"]["energy_mae_meV"]
    assert summary["ratio_single_over_joint"] == pytest.approx(ratio, rel=1e-9)
    assert summary["joint"]["n"] == summary["single"]["n"] == 800  # the demo's B3LYP test molecules
    assert f"ratio single/joint: {ratio:.2f}" in printed and "trained in" in printed
    assert main(args) == 0  # finished runs are read back, not trained again
    assert "trained in" not in capsys.readouterr().out
