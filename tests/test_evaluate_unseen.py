"""Evaluation never averages in structures the model cannot predict: an element that no training label of
any fidelity contained has no reference energy (errors of electronvolts), so such structures are left out
of the errors, counted per fidelity and warned about; predictions stay aligned with the samples."""

from __future__ import annotations

import logging

import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import TINY_MODEL, rattled_molecule

from multifi.config import SourceConfig
from multifi.data.sources import read_sources
from multifi.keys import COUNT, ENERGY_MAE, UNSEEN
from multifi.models.registry import build_potential
from multifi.train.evaluate import evaluate_pairs, structures_with_unseen_elements


def _dataset(tmp_path):
    frames = []
    for i, name in enumerate(("H2O", "CH3OH", "NH3", "H2O", "CH3CH2OH")):
        a = rattled_molecule(name, seed=i)
        a.calc = SinglePointCalculator(a, energy=-10.0 * len(a) + 0.1 * i)
        a.info["fidelity"] = "A"
        frames.append(a)
    path = tmp_path / "five.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return read_sources([SourceConfig(path=str(path))])


def test_structures_with_an_element_no_label_contained_are_left_out_counted_and_warned(tmp_path, caplog):
    ds = _dataset(tmp_path)
    potential = build_potential({**TINY_MODEL, "fidelity_embedding": {"inject": "single"}}, ["A"])
    ref = np.zeros((119, 1))
    ref[[1, 6, 8]] = -10.0  # H, C, O fitted; N (in NH3) never labelled
    potential.head.set_baseline(ref, np.ones(1))
    pairs = np.stack([np.arange(5), np.zeros(5, np.int64)], 1)
    assert structures_with_unseen_elements(potential, ds, pairs[:, 0]).tolist() == [False, False, True, False, False]
    with caplog.at_level(logging.WARNING, logger="multifi"):
        metrics, energy = evaluate_pairs(potential, ds, None, pairs, batch_size=2, return_predictions=True)
    assert metrics["A"][COUNT] == 4 and metrics["A"][UNSEEN] == 1
    assert "1 evaluated structure(s) contain N, which no training label contained" in caplog.text
    kept = np.array([0, 1, 3, 4])
    alone, e_kept = evaluate_pairs(potential, ds, None, pairs[kept], batch_size=2, return_predictions=True)
    assert metrics["A"][ENERGY_MAE] == alone["A"][ENERGY_MAE] and UNSEEN not in alone["A"]
    assert energy.shape == (5,) and np.allclose(energy[kept], e_kept, atol=1e-5) and np.isfinite(energy[2])
    _, e_nh3 = evaluate_pairs(potential, ds, None, pairs[[2]], return_predictions=True)
    assert np.allclose(energy[2], e_nh3, atol=1e-5)
    only_unseen = evaluate_pairs(potential, ds, None, pairs[[2]])
    assert only_unseen["A"] == {COUNT: 0, UNSEEN: 1}
