"""Evaluation never averages in structures the model cannot predict: an element that no training label of
any fidelity contained has no reference energy (errors of electronvolts), so such structures are left out
of the errors, counted per fidelity and warned about; predictions stay aligned with the samples."""

from __future__ import annotations

import logging

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import TINY_MODEL, rattled_molecule

from multifi.config import SourceConfig
from multifi.data.sources import read_sources
from multifi.errors import MultifiError
from multifi.keys import COUNT, ENERGY_MAE, FORCES_MAE, UNSEEN
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


def _assert_close(got: dict, expected: dict, rel: float) -> None:
    """Metrics dicts {fidelity: {key: value}} alike: the same keys, counts equal, values within `rel`."""
    assert got.keys() == expected.keys()
    for name, metrics in expected.items():
        assert got[name].keys() == metrics.keys()
        for key, value in metrics.items():
            assert got[name][key] == (value if value is None or key == COUNT else pytest.approx(value, rel=rel)), key


def test_grouped_evaluation_predicts_once_and_gives_each_groups_metrics_as_alone(tmp_path, caplog):
    """evaluate_pairs(groups=…): per group the metrics an evaluation of that group alone gives (its unseen structure
    counted in its group), the whole's as without groups, from one prediction per structure; the warning about the
    unseen element said once."""
    ds = _dataset(tmp_path)
    potential = build_potential({**TINY_MODEL, "fidelity_embedding": {"inject": "single"}}, ["A"])
    ref = np.zeros((119, 1))
    ref[[1, 6, 8]] = -10.0
    potential.head.set_baseline(ref, np.ones(1))
    pairs = np.stack([np.arange(5), np.zeros(5, np.int64)], 1)
    codes = np.array([1, 0, 1, 1, 0])  # NH3 (structure 2, unseen) in group 1
    calls = []
    potential.register_forward_hook(lambda module, args, out: calls.append(args[0].n_atoms.numel()))
    with caplog.at_level(logging.WARNING, logger="multifi"):
        whole, energy, by_group = evaluate_pairs(potential, ds, None, pairs, 2, return_predictions=True, groups=codes)
    assert sum(calls) == 5 and caplog.text.count("which no training label contained") == 1
    _assert_close(whole, evaluate_pairs(potential, ds, None, pairs, batch_size=2), rel=1e-12)  # sums in another order
    assert by_group[1]["A"][COUNT] == 2 and by_group[1]["A"][UNSEEN] == 1 and by_group[0]["A"][COUNT] == 2
    for g in (0, 1):  # batches of other structures: float32 rounding
        _assert_close(by_group[g], evaluate_pairs(potential, ds, None, pairs[codes == g], batch_size=2), rel=1e-6)
    metrics, by_group = evaluate_pairs(potential, ds, None, pairs, 2, groups=np.zeros(5, np.int64))
    assert by_group == [metrics]


def test_validation_and_test_structures_with_an_unseen_element_are_warned_before_training(tmp_path, caplog):
    """NH3 only in the validation and test splits: warned at the start (not only by the test report at the end),
    and validation leaves it out entirely (energy, forces), as the test report does."""
    import torch

    from multifi.config import validate_config
    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import make_neighbors
    from multifi.train.module import PotentialModule
    from multifi.train.run import train

    frames = []
    for i in range(12):
        a = rattled_molecule("NH3" if i in (10, 11) else ("H2O", "CH3OH")[i % 2], seed=i)
        a.calc = SinglePointCalculator(a, energy=-10.0 * len(a) + 0.1 * i, forces=np.full((len(a), 3), 0.1))
        a.info.update(fidelity="A", key=f"m{i}")
        frames.append(a)
    ase.io.write(tmp_path / "d.extxyz", frames, format="extxyz")
    split = {}
    for name, keys in (("train", range(0, 8)), ("val", [8, 10]), ("test", [9, 11])):
        (tmp_path / f"{name}.txt").write_text("".join(f"m{i}\n" for i in keys))
        split[name] = str(tmp_path / f"{name}.txt")
    cfg = validate_config(
        {
            "data": {"sources": [{"path": str(tmp_path / "d.extxyz")}], "split": {"files": split}},
            "model": TINY_MODEL,
            "train": {"epochs": 1, "batch_size": 4, "progress": False, "threads": 1, "warmup_steps": 0},
            "output_dir": str(tmp_path / "run"),
        }
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        train(cfg, dry_run=True)
    assert "1 of 2 validation structures (e.g. m10) contain N, which no training label contains" in caplog.text
    assert "1 of 2 test structures (e.g. m11) contain N" in caplog.text
    # monitoring the validation force error when every validation structure holds N: never measured, an error
    (tmp_path / "val.txt").write_text("m10\n")
    monitored = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"monitor": "A", "monitor_metric": FORCES_MAE})}
    )
    with pytest.raises(
        MultifiError,
        match=r"train.monitor_metric: every one of the 1 validation structures with force labels at 'A' holds N",
    ):
        train(monitored, dry_run=True)
    # the validation step's masks: m10 (NH3) keeps no label, m8 keeps energy and forces
    ds = read_sources([SourceConfig(path=str(tmp_path / "d.extxyz"))])
    module = PotentialModule({"model": cfg.model, "fidelities": ["A"]}, cfg.loss, cfg.train)
    ref = np.zeros((119, 1))
    ref[[1, 6, 8]] = -10.0
    module.potential.head.set_baseline(ref, np.ones(1))
    module.sync_ema()
    order = [int(np.flatnonzero(ds.keys == k)[0]) for k in ("m8", "m10")]
    graph = GraphCollator(ds, make_neighbors(ds, cfg.model.cutoff))(np.array([[order[0], 0], [order[1], 0]]))
    masked = module._without_estimated_energies(graph)
    assert masked.energy_mask.tolist() == [True, False] and masked.forces_mask.tolist() == [True, False]
    assert torch.equal(graph.forces_mask, torch.tensor([True, True]))
