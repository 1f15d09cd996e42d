"""End-to-end training through the Python API: run directory contents, refusal, kill → resume."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import METRIC_KEYS, TINY_FIDELITIES, rattled_molecule

from multifi.config import load_config
from multifi.errors import MultifiError
from multifi.models.registry import load_potential
from multifi.predict import predict_atoms
from multifi.train.prepare import prepare_data
from multifi.train.run import train
from multifi.train.trainer import make_trainer


def steps_per_epoch(cfg) -> int:
    return math.ceil(len(prepare_data(cfg).pairs["train"]) / cfg.train.batch_size)


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def check_metrics_json(path: Path, expected_n: dict[str, int]) -> dict:
    payload = json.loads(path.read_text())
    fids = payload["fidelities"]
    assert set(fids) == set(expected_n)
    for name, m in fids.items():
        assert set(m) == METRIC_KEYS, name
        assert m["n"] == expected_n[name] and isinstance(m["n"], int)
        assert np.isfinite(m["forces_label_slope"])  # any sign for a few steps of training
        assert -1 <= m["forces_label_cosine"] <= 1
        assert m["n_forces"] == expected_n[name]  # every structure of these tests has forces
        for key in METRIC_KEYS - {"n", "n_forces", "stress_mae_GPa", "forces_label_slope", "forces_label_cosine"}:
            assert isinstance(m[key], float) and np.isfinite(m[key]) and m[key] > 0, (name, key)
        assert m["stress_mae_GPa"] is None  # molecules: no stress labels
        assert m["energy_rmse_meV"] >= m["energy_mae_meV"] >= m["energy_mae_meV_per_atom"]
    return payload


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_extxyz):
    """One tiny 2-epoch run shared by the tests of this module (and re-used by nothing else)."""
    root = tmp_path_factory.mktemp("train")
    raw = {
        "data": {"sources": [{"path": str(tiny_extxyz)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "model": {
            "features": 16,
            "interactions": 1,
            "cutoff": 4.0,
            "n_rbf": 8,
            "fidelity_embedding": {"dim": 4, "inject": "both"},
        },
        "train": {"epochs": 2, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
        "output_dir": str(root / "run"),
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, [])
    run_dir = train(cfg)
    return cfg, Path(run_dir)


def test_train_writes_the_run_directory(trained_run):
    cfg, run_dir = trained_run
    assert run_dir == Path(cfg.output_dir)
    for name in (
        "config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "metrics.csv",
        "metrics.json",
        "model.pt",
        "splits.json",
    ):
        assert (run_dir / name).is_file(), name
    # the resolved config reloads to the same configuration
    assert load_config(run_dir / "config.yaml", []).model_dump() == cfg.model_dump()
    last = ckpt(run_dir / "checkpoints/last.ckpt")
    assert last["global_step"] == cfg.train.epochs * steps_per_epoch(cfg)


def test_optimizer_state_is_indexed_by_the_architecture(trained_run):
    """The optimizer holds every parameter of the potential, frozen ones (the radial frequencies) included, in
    module order: a checkpoint's optimizer state then fits any module of the same architecture, whatever it
    froze, and an in-flight run resumes after such a change."""
    _, run_dir = trained_run
    last = ckpt(run_dir / "checkpoints/last.ckpt")
    potential = load_potential(run_dir / "model.pt")
    frozen = [n for n, p in potential.named_parameters() if not p.requires_grad]
    assert frozen, "the test needs a frozen parameter"
    (group,) = last["optimizer_states"][0]["param_groups"]
    assert group["params"] == list(range(len(list(potential.parameters()))))


def test_metrics_csv_has_per_fidelity_validation_columns(trained_run):
    _, run_dir = trained_run
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in TINY_FIDELITIES:
        for key in ("energy_mae_meV", "energy_rmse_meV", "energy_mae_meV_per_atom", "forces_mae_meV_per_A"):
            assert f"val/{name}/{key}" in columns, (name, key)
    assert "val_loss" in columns
    epochs_with_val = {r["epoch"] for r in rows if r.get("val/hi/energy_mae_meV")}
    assert epochs_with_val == {"1", "2"}  # counted from 1, as the log lines


def test_metrics_json_schema_and_test_counts(trained_run):
    cfg, run_dir = trained_run
    splits = json.loads((run_dir / "splits.json").read_text())
    prep = prepare_data(cfg)
    test_keys = set(splits["test"])
    assert test_keys == set(prep.dataset.keys[prep.split.test].tolist())
    assert not (test_keys & set(splits["train"])) and not (test_keys & set(splits["val"]))
    expected = {
        name: int(prep.dataset.energy_mask[prep.split.test, k].sum())
        for k, name in enumerate(prep.dataset.fidelities.names)
    }
    assert all(expected.values())
    check_metrics_json(run_dir / "metrics.json", expected)


def test_trained_model_predicts_at_each_fidelity(trained_run):
    _, run_dir = trained_run
    pot = load_potential(run_dir / "model.pt")
    from_ckpt = load_potential(run_dir / "checkpoints/best.ckpt")
    assert pot.fidelities.names == TINY_FIDELITIES and pot.elements == [1, 6, 7, 8]
    mols = [rattled_molecule("CH4", 99), rattled_molecule("H2O", 98)]
    e_lo, f_lo, _ = predict_atoms(pot, mols, "lo")
    e_hi, _, _ = predict_atoms(pot, mols, "hi")
    np.testing.assert_allclose(predict_atoms(from_ckpt, mols, "lo")[0], e_lo, rtol=1e-6)  # model.pt = best EMA
    assert np.all(np.abs(e_hi - e_lo) > 1e-3)
    # 'hi' labels are 1.1·E + 0.3 eV/atom: the fitted reference energies carry most of that difference
    assert np.all(e_hi > e_lo) and [f.shape for f in f_lo] == [(5, 3), (3, 3)]


def test_existing_non_empty_run_dir_is_refused(trained_run):
    cfg, run_dir = trained_run
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(MultifiError, match=f"{run_dir}: run directory exists and is not empty; use --resume"):
        train(cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_resume_without_checkpoint_starts_afresh(write_config, tmp_path, caplog):
    """A run directory whose start wrote no checkpoint is no dead end: --resume (and train) start it again."""
    from multifi.train.run import train_from_args

    run_dir = tmp_path / "half"
    run_dir.mkdir()
    with pytest.raises(MultifiError, match=r"half: not a run directory \(no config.yaml"):
        train_from_args(None, [], str(run_dir))
    (run_dir / "config.yaml").write_text(write_config().read_text())
    (run_dir / "metrics.csv").write_text("epoch,step,val_loss\n0,5,1.0\n")  # left by the failed start
    with caplog.at_level("WARNING", logger="multifi"):
        train_from_args(None, ["train.epochs=1"], str(run_dir))
    assert "no checkpoint to resume from; starting the run from the beginning" in caplog.text
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "model.pt").exists()
    assert "1.0" not in (run_dir / "metrics.csv").read_text().split("\n")[1]


def test_one_training_at_a_time_writes_a_run_directory(write_config, tmp_path, monkeypatch, caplog):
    """A second training (or resume) of a run directory another one holds is a one-line error before it writes
    anything (both ran and mixed their files: one's config.yaml, the other's model.pt); one that wrote the folder
    between this start's checks and its lock is refused too; the lock goes with its process."""
    from multifi.files import held_lock
    from multifi.train.run import RUN_LOCK, _check_unchanged_since_start, _checkpoint_stamp

    train_cfg = {"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}
    cfg = load_config(write_config(train=train_cfg, output_dir=str(tmp_path / "run")), [])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with held_lock(run_dir / RUN_LOCK, "this run directory"):
        with caplog.at_level(logging.INFO, logger="multifi"):
            with pytest.raises(MultifiError, match=rf"run: this run directory is in use by process {os.getpid()}"):
                train(cfg)
        assert {p.name for p in run_dir.iterdir()} == {RUN_LOCK}
        assert "run directory:" not in caplog.text  # refused before reading any data
    train(cfg)  # released: the same start runs
    cfg.train.epochs = 2
    with held_lock(run_dir / RUN_LOCK, "this run directory"):
        with pytest.raises(MultifiError, match="in use by process"):
            train(cfg, resume=True)
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # NFS without lockd: trains, and says it is unguarded
    with caplog.at_level(logging.WARNING, logger="multifi"), held_lock(run_dir / RUN_LOCK, "this run directory"):
        pass
    assert "no lock on this file system (" in caplog.text and not (run_dir / RUN_LOCK).exists()
    monkeypatch.undo()
    stamp = _checkpoint_stamp(run_dir)
    _check_unchanged_since_start(run_dir, stamp)
    os.utime(run_dir / "checkpoints" / "last.ckpt", ns=(1, 1))  # rewritten by another training meanwhile
    with pytest.raises(MultifiError, match="another training wrote this run directory while this one started"):
        _check_unchanged_since_start(run_dir, stamp)


def test_a_folder_with_the_users_own_config_or_log_is_not_taken_for_a_run(write_config, tmp_path, capsys):
    """output_dir holding the config being trained (its config.yaml) or files of the user's named like a run's
    (train.log): refused, not taken for an unstarted run and overwritten; console output redirected into a run's
    own train.log: refused."""
    from test_cli import fails, run

    own = tmp_path / "exp1"
    own.mkdir()
    config = write_config(output_dir=str(own))
    (own / "config.yaml").write_text("# my notes\n" + config.read_text())
    fails(["train", own / "config.yaml"], capsys, "exp1/config.yaml: the config lies in its own output_dir")
    assert (own / "config.yaml").read_text().startswith("# my notes")
    mine = tmp_path / "exp2"
    mine.mkdir()
    (mine / "train.log").write_text("my notes\n")
    fails(["train", config, "--set", f"output_dir={mine}"], capsys, "run directory exists and is not empty")
    assert (mine / "train.log").read_text() == "my notes\n"
    earlier = tmp_path / "earlier"  # a start of an earlier version, killed before its first checkpoint: no lock file
    earlier.mkdir()
    for name, text in (("config.yaml", config.read_text()), ("splits.json", "{}"), ("train.log", "")):
        (earlier / name).write_text(text)
    assert run(["train", config, "--set", f"output_dir={earlier}", "--set", "train.epochs=1"], capsys)[0] == 0
    run_dir = tmp_path / "run"
    assert train(load_config(write_config(output_dir=str(run_dir)), ["train.epochs=1"])) == run_dir
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    with open(run_dir / "train.log", "a") as out:
        done = subprocess.run(
            [sys.executable, "-m", "multifi.cli.main", "train", "--resume", str(run_dir), "--set", "train.epochs=2"],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
    assert done.returncode == 2 and "the console output is redirected into the run's own log" in done.stderr


def test_a_resume_refuses_settings_of_a_new_runs_start(write_config, tmp_path):
    """--resume with --set train.init_from / init_fidelities or output_dir: one-line errors (init_from was accepted,
    did nothing, and config.yaml recorded it, resolved against the run directory)."""
    from multifi.train.run import train_from_args

    run_dir = train(load_config(write_config(output_dir=str(tmp_path / "run")), ["train.epochs=1"]))
    before = (run_dir / "config.yaml").read_text()
    for override, said in (
        ("train.init_from=other/model.pt", "--set train.init_from=other/model.pt: a resumed run continues from"),
        ("train.init_fidelities.lo=hi", "train.init_fidelities act on a new run's first step only"),
        (f"output_dir={tmp_path / 'elsewhere'}", "a resumed run stays in its directory"),
    ):
        with pytest.raises(MultifiError, match=re.escape(said)):
            train_from_args(None, [override, "train.epochs=2"], str(run_dir))
    assert (run_dir / "config.yaml").read_text() == before


def test_config_error_leaves_run_dir_reusable(write_config, tmp_path):
    """A run that fails on a config/data mismatch must not block the corrected run."""
    path = write_config(train={"fidelity_sampling": {"nope": 1.0}})
    with pytest.raises(MultifiError, match="unknown fidelity 'nope'"):
        train(load_config(path, []))
    path = write_config(
        train={
            "epochs": 1,
            "batch_size": 8,
            "progress": False,
            "threads": 1,
            "warmup_steps": 0,
            "fidelity_sampling": {"hi": 0.5},
        }
    )
    run_dir = train(load_config(path, []))
    assert (run_dir / "metrics.json").exists()


def test_max_steps_shorter_than_an_epoch(write_config):
    """Training may stop mid-epoch (train.max_steps) before any validation has run."""
    cfg = load_config(write_config(), ["train.max_steps=2", "train.epochs=5"])
    run_dir = train(cfg)
    assert ckpt(run_dir / "checkpoints/last.ckpt")["global_step"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["fidelities"].keys() == set(TINY_FIDELITIES)


def test_train_limits_reach_the_training_samples(write_config, caplog):
    cfg = load_config(write_config(), ["data.train_limits.hi=3"])
    prep = prepare_data(cfg)
    assert "data.train_limits" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="multifi"):  # above what the split holds: capped silently before
        prepare_data(load_config(write_config(), ["data.train_limits.hi=5000"]))
    assert re.search(
        r"data.train_limits: hi limited to 5000 labels, but the training split holds (\d+) at it", caplog.text
    )
    k = prep.dataset.fidelities.index("hi")
    assert (prep.pairs["train"][:, 1] == k).sum() == 3
    assert (prep.pairs["train"][:, 1] != k).sum() == (
        prepare_data(load_config(write_config(), [])).pairs["train"][:, 1] != k
    ).sum()


def test_a_run_split_by_position_resumes_and_is_read_back_as_it_trained(write_config):
    """A run of a version before data.split.order (its config.yaml has no such key) split its structures and
    limited its labels by position: resuming it, and reading its training labels back (extend's replay, the
    uncertainty fit), use that order, not the key order of newer runs (which would move test structures into
    training silently, or refuse the resume)."""
    from multifi.cli.main import main
    from multifi.train.extension_data import load_old_run

    path = write_config(train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0})
    raw = yaml.safe_load(path.read_text())
    raw["data"]["split"]["order"] = "position"
    raw["data"]["train_limits"] = {"lo": 12}
    path.write_text(yaml.safe_dump(raw))
    run_dir = Path(load_config(path, []).output_dir)
    assert main(["train", str(path)]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["split"].pop("order") == "position"  # as a run written before the setting
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    trained = prepare_data(load_config(path, []))
    by_key = prepare_data(load_config(path, ["data.split.order=key"]))
    assert set(by_key.dataset.keys[by_key.split.test]) != set(trained.dataset.keys[trained.split.test])
    old = load_old_run(run_dir)
    as_pairs = lambda ds, pairs: sorted((str(ds.keys[s]), ds.fidelities.names[k]) for s, k in pairs.tolist())  # noqa: E731
    assert as_pairs(old.dataset, old.train) == as_pairs(trained.dataset, trained.pairs["train"])
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=2"]) == 0
    assert set(json.loads((run_dir / "splits.json").read_text())["test"]) == set(
        trained.dataset.keys[trained.split.test]
    )
    assert load_config(run_dir / "config.yaml", []).data.split.order == "position"  # now written out


def test_the_labels_train_limits_kept_are_recorded_and_read_back_from_the_record(write_config):
    """With data.train_limits the run writes which labels the limits kept (train_labels.json); extend's replay and
    the LLPR fit read that record, not a new draw (so a later change of how limits draw cannot move them); a
    damaged record is a one-line error."""
    from multifi.data.split import TRAIN_LABELS
    from multifi.train.extension_data import load_old_run
    from multifi.uncertainty import _run_data

    train_cfg = {"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}
    cfg = load_config(write_config(train=train_cfg), ["data.train_limits.lo=10"])
    run_dir = train(cfg)
    prep = prepare_data(cfg)
    record = json.loads((run_dir / TRAIN_LABELS).read_text())
    assert len(record["lo"]) == 10 and len(record["hi"]) == int((prep.pairs["train"][:, 1] == 1).sum())
    as_keys = lambda ds, pairs: sorted((str(ds.keys[s]), ds.fidelities.names[k]) for s, k in pairs.tolist())  # noqa: E731
    expected = as_keys(prep.dataset, prep.pairs["train"])
    assert as_keys(*(lambda r: (r.dataset, r.train))(load_old_run(run_dir))) == expected
    dataset, pairs = _run_data(run_dir)
    assert as_keys(dataset, pairs["train"]) == expected
    dropped = record["lo"].pop()
    (run_dir / TRAIN_LABELS).write_text(json.dumps(record))  # the record, not a new draw, decides
    old = load_old_run(run_dir)
    assert as_keys(old.dataset, old.train) == [x for x in expected if x != (dropped, "lo")]
    dataset, pairs = _run_data(run_dir)
    assert (dropped, "lo") not in as_keys(dataset, pairs["train"])
    (run_dir / TRAIN_LABELS).write_text('{"lo": ["no-such-key"]}')
    with pytest.raises(MultifiError, match=r"train_labels\.json: structure 'no-such-key' is not in the run's dataset"):
        load_old_run(run_dir)
    (run_dir / TRAIN_LABELS).write_text('{"lo": ')
    with pytest.raises(MultifiError, match=r"train_labels\.json: not a readable training-labels file"):
        load_old_run(run_dir)


def test_resume_with_a_foreign_optimizer_state_is_a_one_line_error(write_config, tmp_path):
    """A checkpoint whose optimizer holds other parameters (another architecture or parameter grouping) is
    refused with one line naming the mismatch, not a traceback from inside torch."""
    cfg = load_config(write_config(train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1}), [])
    run_dir = train(cfg)
    last = run_dir / "checkpoints/last.ckpt"
    state = ckpt(last)
    state["optimizer_states"][0]["param_groups"][0]["params"].pop()
    torch.save(state, last)
    cfg.train.epochs = 2
    with pytest.raises(MultifiError, match=r"optimizer state holds \d+ parameter tensors, this model trains") as exc:
        train(cfg, resume=True)
    assert "\n" not in str(exc.value)


def test_resume_with_another_model_config_is_a_one_line_error(write_config):
    """Resuming a run with a changed model section names the first tensor whose shape differs (one line), not
    torch's multi-line state_dict error; a checkpoint whose optimizer groups differ (same total) names the
    per-group counts."""
    cfg = load_config(write_config(train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1}), [])
    run_dir = train(cfg)
    wider = load_config(write_config(train={"epochs": 2, "batch_size": 8, "progress": False, "threads": 1}), [])
    wider.model.features = 12
    with pytest.raises(
        MultifiError,
        match=r"config.yaml: a resumed run keeps the settings its checkpoint holds .*"
        r"changed: model.features: 16 → 12. Start a new run",
    ) as exc:
        train(wider, resume=True)
    assert "\n" not in str(exc.value) and "train.epochs" not in str(exc.value)  # epochs may change
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("features: 16", "features: 12"))
    with pytest.raises(
        MultifiError, match=r"differs from the settings its checkpoint trained with \(model.features: 16 in"
    ):
        train(wider, resume=True)  # a config.yaml edited by hand: the checkpoint's settings decide, and say so
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("features: 12", "features: 16"))
    # an edited learning rate: the checkpoint's optimiser state would keep the old one while config.yaml said new
    text = (run_dir / "config.yaml").read_text()
    assert "  lr: 0.0005\n" in text
    (run_dir / "config.yaml").write_text(text.replace("  lr: 0.0005\n", "  lr: 0.01\n"))
    with pytest.raises(MultifiError, match=r"config.yaml: differs .* \(train.lr: 0.0005 in the checkpoint, 0.01 now\)"):
        train(load_config(run_dir / "config.yaml", ["train.epochs=2"]), resume=True)
    assert "  fidelity_weights: {}\n" in text  # a dict-valued setting filled in: flattened, it had no key before
    (run_dir / "config.yaml").write_text(text.replace("  fidelity_weights: {}\n", "  fidelity_weights: {lo: 0.01}\n"))
    with pytest.raises(MultifiError, match=r"\(loss.fidelity_weights: \{\} in the checkpoint, \{'lo': 0.01\} now\)"):
        train(load_config(run_dir / "config.yaml", ["train.epochs=2"]), resume=True)
    (run_dir / "config.yaml").write_text(text)
    last = run_dir / "checkpoints/last.ckpt"
    state = ckpt(last)
    group = state["optimizer_states"][0]["param_groups"][0]
    state["optimizer_states"][0]["param_groups"] = [
        {**group, "params": group["params"][:1]},
        {**group, "params": group["params"][1:]},
    ]
    torch.save(state, last)
    cfg.train.epochs = 2
    with pytest.raises(MultifiError, match=r"holds \[1, \d+\] parameter tensors, this model trains \[\d+\]"):
        train(cfg, resume=True)


def test_resume_from_a_checkpoint_written_before_the_contact_buffer_existed(write_config):
    """A run checkpointed by an earlier version (no head.contact, no ema.head.contact) resumes: buffers added
    since are filled as unknown, not refused as another model configuration."""
    cfg = load_config(
        write_config(train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "ema_decay": 0.9}), []
    )
    run_dir = train(cfg)
    last = run_dir / "checkpoints/last.ckpt"
    state = ckpt(last)
    dropped = [k for k in state["state_dict"] if k.endswith("head.contact")]
    assert len(dropped) == 2  # the model's and its EMA copy's
    for k in dropped:
        del state["state_dict"][k]
    torch.save(state, last)
    cfg.train.epochs = 2
    out = train(cfg, resume=True)
    assert ckpt(out / "checkpoints/last.ckpt")["epoch"] == 1


def test_resume_without_training_left_is_a_one_line_error_and_changes_nothing(write_config):
    """--resume with fewer epochs than done (Lightning's traceback, after config.yaml was rewritten) or with other
    settings that leave nothing more to train on a finished run (model.pt and metrics.json rewritten for nothing)
    is refused; with its own settings a finished run is left as it is."""
    cfg = load_config(write_config(train={"epochs": 3, "batch_size": 8, "progress": False, "threads": 1}), [])
    run_dir = train(cfg)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "model.pt", "metrics.json")}
    assert train(cfg.model_copy(deep=True), resume=True) == run_dir  # its own settings: nothing to do
    for change in ({"epochs": 2}, {"max_steps": 10}, {"max_steps": 15}):
        again = cfg.model_copy(deep=True)
        for key, value in change.items():
            setattr(again.train, key, value)
        with pytest.raises(MultifiError, match=r"finished \(15 steps, in epoch 3\)|fewer: a resume can only train on"):
            train(again, resume=True)
    assert before == {name: (run_dir / name).read_bytes() for name in before}
    cfg.train.epochs = 1
    with pytest.raises(MultifiError, match=r"completed 3 epochs \(step 15\); train.epochs=1 is fewer") as exc:
        train(cfg, resume=True)
    assert "\n" not in str(exc.value)
    cfg.train.epochs, cfg.train.max_steps = 4, 10  # a step limit below the checkpoint's step (was a traceback)
    with pytest.raises(MultifiError, match=r"checkpoint is at step 15; train.max_steps=10 is fewer"):
        train(cfg, resume=True)
    assert before["config.yaml"] == (run_dir / "config.yaml").read_bytes()
    cfg.train.max_steps = -1
    cfg.train.epochs = 4  # more to train: resumes
    assert ckpt(train(cfg, resume=True) / "checkpoints/last.ckpt")["global_step"] == 20


def test_resume_of_an_early_stopped_run_uses_the_raised_patience_or_says_to_raise_it(write_config, caplog):
    """A run that stopped early is finished: --resume with more epochs but the same patience is a one-line error
    naming the patience (it trained an epoch and stopped again before); with a raised patience it trains on with
    that patience (Lightning restored the checkpoint's, so config.yaml said one patience and the run used another)."""
    cfg = load_config(
        write_config(
            train={"epochs": 3, "batch_size": 8, "progress": False, "threads": 1, "early_stopping_patience": 2}
        ),
        [],
    )
    run_dir = train(cfg)
    last = run_dir / "checkpoints/last.ckpt"
    state = ckpt(last)
    per_epoch = state["global_step"] // 3
    key = next(k for k in state["callbacks"] if k.startswith("EarlyStopping"))
    state["callbacks"][key]["wait_count"] = 2  # as if the last two validations had not improved: stopped early
    torch.save(state, last)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "model.pt", "metrics.json")}
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert train(cfg.model_copy(deep=True), resume=True) == run_dir
    assert "stopped early: no improvement in 2 validations" in caplog.text
    more = cfg.model_copy(deep=True)
    more.train.epochs = 6
    with pytest.raises(MultifiError, match=r"stopped early.*raise train.early_stopping_patience") as exc:
        train(more, resume=True)
    assert "\n" not in str(exc.value)
    assert before == {name: (run_dir / name).read_bytes() for name in before}
    more.train.early_stopping_patience = 10
    train(more, resume=True)
    state = ckpt(last)
    assert state["callbacks"][key]["patience"] == 10
    assert state["global_step"] == 6 * per_epoch  # the restored patience (2) would have stopped it in epoch 4
    assert json.loads((run_dir / "metrics.json").read_text())["patience_validations"] == 10


def test_train_kill_resume(write_config, tmp_path, monkeypatch, caplog):
    """SIGKILL a training subprocess after its first checkpoint; --resume continues from the saved step."""
    path = write_config(train={"epochs": 6, "batch_size": 2, "progress": False, "threads": 1, "warmup_steps": 0})
    cfg = load_config(path, [])
    run_dir = Path(cfg.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    total = cfg.train.epochs * steps_per_epoch(cfg)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "multifi.cli.main", "train", str(path), "--set", "train.checkpoint_every_n_steps=3"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 150
        while not last.exists():
            assert proc.poll() is None, f"training exited early: {(tmp_path / 'train.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists(), "the run finished before it was killed"
    saved = ckpt(last)["global_step"]
    assert 0 < saved < total

    from multifi.cli.main import main
    from multifi.train.module import PotentialModule

    seen: list[int] = []
    original = PotentialModule.training_step

    def spy(self, graph, batch_idx):
        seen.append(int(self.global_step))
        return original(self, graph, batch_idx)

    monkeypatch.setattr(PotentialModule, "training_step", spy)
    with caplog.at_level("INFO", logger="multifi"):
        assert main(["train", "--resume", str(run_dir)]) == 0
    assert seen[0] == saved, f"resumed at step {seen[0]}, checkpoint was at {saved}"
    assert f"resuming at step {saved} from checkpoints/last.ckpt" in caplog.text
    assert len(seen) == total - saved and seen == list(range(saved, total))
    final = ckpt(last)
    assert final["global_step"] == total and final["epoch"] == cfg.train.epochs - 1
    assert final["hyper_parameters"]["train"]["checkpoint_every_n_steps"] == 3  # the run's own config is reused
    assert (run_dir / "checkpoints" / "best.ckpt").exists()
    prep = prepare_data(cfg)
    check_metrics_json(
        run_dir / "metrics.json",
        {
            n: int(prep.dataset.energy_mask[prep.split.test, k].sum())
            for k, n in enumerate(prep.dataset.fidelities.names)
        },
    )
    # the killed-and-resumed run ends where an uninterrupted run ends: same data order (the sampler resumes
    # mid-epoch), optimizer, scheduler and EMA restored; only float reduction order may differ (thread count)
    full = tmp_path / "uninterrupted"
    assert main(["train", str(path), "--set", "train.checkpoint_every_n_steps=3", "--set", f"output_dir={full}"]) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())["fidelities"]
    straight = json.loads((full / "metrics.json").read_text())["fidelities"]
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert resumed[name]["energy_mae_meV"] == pytest.approx(straight[name]["energy_mae_meV"], rel=1e-4, abs=1e-3)

    # the log too: the epoch it was killed in averages all of that epoch's steps, not only those after the resume
    def epoch_rows(d: Path) -> list[dict]:
        with open(d / "metrics.csv") as f:
            return [r for r in csv.DictReader(f) if r.get("train_loss_epoch")]

    a, b = epoch_rows(run_dir), epoch_rows(full)
    cols = [c for c in b[0] if c.startswith("train_")]
    assert "train_loss_epoch" in cols and "train_energy" in cols
    assert len(a) == len(b) == cfg.train.epochs
    for ra, rb in zip(a, b):
        for c in cols:
            assert float(ra[c]) == pytest.approx(float(rb[c]), rel=1e-4, abs=1e-7), (ra["epoch"], c)


@pytest.mark.parametrize("inject, precision", [("single", "32"), ("heads", "64"), ("onehot", "32")])
def test_train_other_modes_and_float64(write_config, inject, precision):
    model = {
        "features": 16,
        "interactions": 1,
        "cutoff": 4.0,
        "n_rbf": 8,
        "fidelity_embedding": {"dim": 4, "inject": inject},
    }
    cfg = load_config(write_config(model=model), [f"train.precision={precision}", "train.epochs=1"])
    run_dir = train(cfg)
    pot = load_potential(run_dir / "model.pt")
    assert next(pot.parameters()).dtype == (torch.float64 if precision == "64" else torch.float32)
    mols = [rattled_molecule("CH4", 1)]
    lo, hi = predict_atoms(pot, mols, "lo")[0], predict_atoms(pot, mols, "hi")[0]
    if inject == "single":  # one pooled baseline: a fidelity-blind model predicts the same at both
        assert lo == pytest.approx(hi, abs=1e-9)
        np.testing.assert_array_equal(pot.head.ref[:, 0], pot.head.ref[:, 1])
    else:
        assert abs(lo - hi).max() > 1e-3
    prep = prepare_data(cfg)  # every test sample of the run's split is scored
    test, names = prep.pairs["test"], prep.dataset.fidelities.names
    check_metrics_json(run_dir / "metrics.json", {n: int((test[:, 1] == k).sum()) for k, n in enumerate(names)})


# ---------------------------------------------------------------------------------------------- convergence
def _val_column(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def test_early_stopping_on_one_fidelitys_validation_error(write_config):
    """The monitored fidelity's validation MAE picks the best checkpoint; the run stops `early_stopping_steps`
    after it (rounded up to whole validations) and records both steps."""
    cfg = load_config(
        write_config(
            train={
                "epochs": 1000,
                "max_steps": 400,
                "batch_size": 8,
                "progress": False,
                "threads": 1,
                "warmup_steps": 0,
                "lr": 0.01,
                "val_every_n_steps": 2,
                "early_stopping_steps": 5,
                "monitor": "hi",
                "ema_decay": 0.0,
            }
        ),
        [],
    )
    assert cfg.train.patience_validations == 3
    run_dir = train(cfg)
    payload = json.loads((run_dir / "metrics.json").read_text())
    column = _val_column(run_dir, "val/hi/energy_mae_meV")
    best_step, best_value = min(column, key=lambda sv: (sv[1], sv[0]))
    assert payload["monitor"] == "val/hi/energy_mae_meV"
    assert payload["stopped_early"] and payload["steps"] < 400
    assert payload["best_monitored"] == pytest.approx(best_value, rel=1e-5)
    # one step convention: metrics.csv's row of the best validation, the checkpoint and metrics.json agree
    assert payload["best_step"] == ckpt(run_dir / "checkpoints/best.ckpt")["global_step"] == best_step
    assert payload["steps"] - payload["best_step"] == 3 * 2
    assert payload["val_fidelities"]["hi"]["energy_mae_meV"] == pytest.approx(best_value, rel=1e-4)


def test_plateau_schedule_follows_the_monitored_error_and_resumes(write_config, tmp_path):
    """lr halves after every validation without a new best of the monitored error, also across a resume
    (the scheduler's best value travels in the checkpoint)."""
    cfg = load_config(
        write_config(
            train={
                "epochs": 1000,
                "max_steps": 12,
                "batch_size": 8,
                "progress": False,
                "threads": 1,
                "warmup_steps": 0,
                "lr": 0.01,
                "val_every_n_steps": 2,
                "schedule": "plateau",
                "plateau_patience": 0,
                "plateau_factor": 0.5,
                "min_lr_ratio": 1e-6,
                "monitor": "hi",
                "early_stopping_patience": None,
            }
        ),
        [],
    )
    run_dir = train(cfg)
    cfg.train.max_steps = 24
    train(cfg, resume=True)
    state = ckpt(run_dir / "checkpoints/last.ckpt")
    column = [v for _, v in _val_column(run_dir, "val/hi/energy_mae_meV")]
    assert len(column) == 12
    worse = sum(b >= min(column[: i + 1]) for i, b in enumerate(column[1:]))  # validations without a new best
    lr = state["optimizer_states"][0]["param_groups"][0]["lr"]
    assert worse > 0 and lr == pytest.approx(0.01 * 0.5**worse, rel=1e-6)
    assert state["plateau_scheduler"]["best"] == pytest.approx(min(column), rel=1e-5)


@pytest.mark.parametrize(
    "monitor, message", [("nope", "unknown fidelity 'nope'"), ("lo", "has no validation structures")]
)
def test_monitor_must_name_a_validated_fidelity(write_config, tmp_path, monitor, message):
    import ase.io
    from conftest import tiny_frames

    frames = tiny_frames(20)
    for i, a in enumerate(frames):
        a.info["key"] = f"m{i}"
    ase.io.write(tmp_path / "keyed.extxyz", frames)
    lo_only = [f"m{i}" for i, a in enumerate(frames) if a.info["fidelity"] == "lo"][:4]
    hi = [f"m{i}" for i, a in enumerate(frames) if a.info["fidelity"] == "hi"]
    for name, keys in {"train": hi[:6] + lo_only, "val": hi[6:8], "test": hi[8:10]}.items():
        (tmp_path / f"{name}.keys").write_text("\n".join(keys) + "\n")
    files = {s: str(tmp_path / f"{s}.keys") for s in ("train", "val", "test")}
    cfg = load_config(
        write_config(
            data={"sources": [{"path": str(tmp_path / "keyed.extxyz")}], "split": {"files": files}},
            train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "monitor": monitor},
        ),
        [],
    )
    with pytest.raises(MultifiError, match=message):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


def test_patience_in_steps_needs_step_validation(write_config):
    with pytest.raises(MultifiError, match="early_stopping_steps"):
        load_config(write_config(train={"early_stopping_steps": 10}), [])


def test_best_checkpoint_found_after_the_run_directory_moved(tmp_path):
    """A resumed run whose directory moved: the checkpoint state names the old path; best.ckpt beside the
    run's own checkpoints is still the one evaluated (not last.ckpt)."""
    from types import SimpleNamespace

    from multifi.train.trainer import best_checkpoint

    ckpts = tmp_path / "moved" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "best.ckpt").write_bytes(b"x")
    (ckpts / "last.ckpt").write_bytes(b"y")
    cb = SimpleNamespace(filename="best", dirpath=str(ckpts), best_model_path="/elsewhere/run/checkpoints/best.ckpt")
    trainer = SimpleNamespace(
        checkpoint_callbacks=[SimpleNamespace(filename="last", dirpath=str(ckpts), best_model_path=""), cb]
    )
    assert best_checkpoint(trainer, ckpts / "last.ckpt") == ckpts / "best.ckpt"
    cb.best_model_path = ""  # no validation yet: the last checkpoint
    assert best_checkpoint(trainer, ckpts / "last.ckpt") == ckpts / "last.ckpt"


def test_a_moved_run_keeps_its_best_score_on_resume(write_config, tmp_path):
    """Lightning resets the best score of a run whose checkpoint folder moved (the next validation would then
    replace best.ckpt whatever its error); the run's checkpoint callbacks read the moved folder as the same."""
    import shutil

    from multifi.cli.main import main

    path = write_config(train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0})
    run_dir = Path(load_config(path, []).output_dir)
    assert main(["train", str(path)]) == 0
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(run_dir), str(moved))
    score = ckpt(moved / "checkpoints/last.ckpt")["callbacks"]
    key = next(k for k in score if k.startswith("ModelCheckpoint{'monitor': 'val_loss'"))
    best_before = score[key]["best_model_score"]
    cfg = load_config(moved / "config.yaml", ["train.epochs=2"])
    cfg.output_dir = str(moved)
    trainer = make_trainer(cfg, moved)
    state = ckpt(moved / "checkpoints/last.ckpt")
    best_cb = trainer.checkpoint_callbacks[0]
    assert best_cb.state_key == key  # the state of checkpoints written by plain ModelCheckpoint is found
    best_cb.load_state_dict(state["callbacks"][key])
    assert best_cb.best_model_score == best_before
    assert best_cb.best_model_path == str(moved / "checkpoints" / "best.ckpt")


def test_resume_with_other_settings_updates_config_yaml_and_keeps_the_first(write_config, caplog):
    """--resume RUN --set train.epochs=N: config.yaml then describes what the run trained with (the first
    start's settings kept in config.start.yaml, the change logged); a plain resume rewrites nothing."""
    import logging

    from multifi.cli.main import main

    train = {"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}
    path = write_config(train={**train, "checkpoint_every_n_steps": 2})  # last.ckpt: the run's final state
    run_dir = Path(load_config(path, []).output_dir)
    assert main(["train", str(path)]) == 0
    first = (run_dir / "config.yaml").read_text()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert (run_dir / "config.yaml").read_text() == first and not (run_dir / "config.start.yaml").exists()
    with caplog.at_level(logging.INFO, logger="multifi"):
        assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=2"]) == 0
    assert load_config(run_dir / "config.yaml").train.epochs == 2
    assert (run_dir / "config.start.yaml").read_text() == first
    assert "train.epochs: 1 → 2" in caplog.text
    assert "cosine learning-rate schedule spans the run's steps, whose number changed" in caplog.text
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    assert ckpt(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=3"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == steps * 3 // 2  # a whole third epoch
    # what the checkpoint fixes cannot change on resume: an error, and config.yaml stays as it was
    written = (run_dir / "config.yaml").read_text()
    for change in ("train.lr=0.01", "train.batch_size=4", "model.features=32", "loss.kind=mse"):
        assert main(["train", "--resume", str(run_dir), "--set", change]) == 2
        assert (run_dir / "config.yaml").read_text() == written
    assert main(["train", str(path), "--resume", str(run_dir)]) == 2  # a config next to --resume: ambiguous
    assert main(["train", "--resume", str(run_dir), "--set", "output_dir=elsewhere"]) == 2


def test_a_run_ending_between_checkpoints_and_validations_keeps_its_final_state(write_config, caplog):
    """max_steps below both intervals: the stop is validated, last.ckpt and best.ckpt hold the final step and
    model.pt is that state (was: 'no such checkpoint' after training, then a model never validated)."""
    train_cfg = {"epochs": 1000, "max_steps": 5, "batch_size": 8, "progress": False, "threads": 1}
    cfg = load_config(write_config(train={**train_cfg, "val_every_n_steps": 100, "checkpoint_every_n_steps": 100}), [])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        run_dir = train(cfg)
    assert ckpt(run_dir / "checkpoints/last.ckpt")["global_step"] == 5
    assert ckpt(run_dir / "checkpoints/best.ckpt")["global_step"] == 5
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 5
    assert "no validation ran" not in caplog.text
    saved = load_potential(run_dir / "model.pt")
    final = load_potential(run_dir / "checkpoints/last.ckpt")
    for a, b in zip(saved.state_dict().values(), final.state_dict().values()):
        assert torch.equal(a, b)


def test_cpu_budget_stops_training_and_resumes_with_the_time_spent(write_config, monkeypatch):
    """train.max_cpu_seconds ends training after the step that reaches it (the clock: this process's CPU time,
    here a fake one of 1 s per reading); the spent time is checkpointed, so a resume with a larger budget
    trains only the difference, and metrics.json says the budget ended the run."""
    import itertools

    import multifi.train.callbacks as callbacks_module
    from multifi.cli.main import main

    clock = itertools.count()
    monkeypatch.setattr(callbacks_module.time, "process_time", lambda: float(next(clock)))
    path = write_config(
        train={"epochs": 100, "batch_size": 2, "progress": False, "threads": 1, "warmup_steps": 0, "max_cpu_seconds": 5}
    )
    run_dir = Path(load_config(path, []).output_dir)
    assert main(["train", str(path)]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["steps"] == 5 and m["cpu_budget_reached"] and m["cpu_budget_s"] == 5
    assert not m["stopped_early"]
    spent = ckpt(run_dir / "checkpoints" / "last.ckpt")["callbacks"]["CpuBudget"]["spent"]
    assert 5 <= spent <= 9  # (checkpoint writes read the fake clock too)
    assert main(["train", "--resume", str(run_dir), "--set", "train.max_cpu_seconds=12"]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["cpu_budget_reached"] and 5 < m["steps"] <= 5 + (12 - spent) + 1


@pytest.mark.parametrize("stop", ["early_stopping", "cpu_budget"])
def test_a_run_killed_after_it_stopped_resumes_to_the_same_model(write_config, tmp_path, monkeypatch, stop):
    """A run killed after the checkpoint of the validation that stopped it early (or of the step that used up its
    CPU budget) but before its final files: the resume trained on, so a later improvement silently gave another
    model and other test errors. Now it stops before any step and writes the run's own model.pt and metrics."""
    import itertools

    import multifi.train.callbacks as callbacks_module

    train_cfg = {"epochs": 1000, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0, "lr": 0.01}
    if stop == "early_stopping":
        train_cfg.update(max_steps=400, val_every_n_steps=2, early_stopping_steps=5, monitor="hi", ema_decay=0.0)
    else:
        clock = itertools.count()  # a fake CPU clock: 1 s per reading
        monkeypatch.setattr(callbacks_module.time, "process_time", lambda: float(next(clock)))
        train_cfg.update(max_cpu_seconds=5, early_stopping_patience=None)
    cfg = load_config(write_config(train=train_cfg, output_dir=str(tmp_path / "run")), [])
    run_dir = train(cfg)
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["stopped_early"] if stop == "early_stopping" else first["cpu_budget_reached"]
    model = load_potential(run_dir / "model.pt").state_dict()
    for name in ("model.pt", "metrics.json"):  # the files a kill in that window leaves unwritten
        (run_dir / name).unlink()
    train(cfg, resume=True)
    again = json.loads((run_dir / "metrics.json").read_text())
    assert (again["steps"], again["best_step"]) == (first["steps"], first["best_step"])
    assert again["fidelities"] == first["fidelities"]
    for key, value in load_potential(run_dir / "model.pt").state_dict().items():
        assert torch.equal(value, model[key]), key


def test_resume_after_a_data_file_was_edited_is_an_error(write_config, tmp_path, tiny_extxyz, caplog):
    """The resume reads the run's cached data: an edited source file would be ignored silently, so it is an
    error; the same file moved elsewhere (same content) resumes."""
    import shutil

    from multifi.cli.main import main

    data = tmp_path / "data.extxyz"
    shutil.copy(tiny_extxyz, data)
    path = write_config(
        data={"sources": [{"path": str(data)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
    )
    run_dir = Path(load_config(path, []).output_dir)
    assert main(["train", str(path)]) == 0
    assert (run_dir / "sources.json").exists()
    moved = tmp_path / "moved.extxyz"
    shutil.move(data, moved)
    stale = run_dir / "checkpoints" / ".last.ckpt.x1y2.tmp"  # left by a kill during a checkpoint write
    stale.write_bytes(b"")
    assert (
        main(["train", "--resume", str(run_dir), "--set", "train.epochs=2", "--set", f"data.sources.0.path={moved}"])
        == 0
    )
    assert not stale.exists()
    os.utime(moved, ns=(1, 1))  # touched, same bytes: resumes (the content decides, read once)
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=3"]) == 0
    recorded = json.loads((run_dir / "sources.json").read_text())[0]
    assert recorded["mtime_ns"] == 1 and recorded["inode"] == moved.stat().st_ino  # the next resume reads nothing
    text = bytearray(moved.read_bytes())  # one digit of a label changed: same size, new time
    i = text.index(b"energy=") + len(b"energy=")
    i += next(j for j, c in enumerate(text[i:]) if chr(c).isdigit())
    text[i] = ord("1") if text[i] != ord("1") else ord("2")
    moved.write_bytes(bytes(text))
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=4"]) == 2
    with open(moved, "a") as f:
        f.write("\n")
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=4"]) == 2
    moved.unlink()  # gone: the run's copy trains on, and the user is told so (it continued silently before)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=4"]) == 0
    assert f"{moved}: not found; the resume trains on the run's copy of the data" in caplog.text


def test_resume_without_a_data_copy_after_a_data_file_was_edited_is_an_error(
    write_config, tmp_path, tiny_extxyz, capsys
):
    """data.cache: false: the resume reads the data files again, so an edited label would train the rest of the run
    on other labels (silently, before): an error naming the file; the unedited file resumes."""
    import shutil

    from multifi.cli.main import main

    data = tmp_path / "data.extxyz"
    shutil.copy(tiny_extxyz, data)
    path = write_config(
        data={"sources": [{"path": str(data)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}, "cache": False},
        train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
    )
    run_dir = Path(load_config(path, []).output_dir)
    assert main(["train", str(path)]) == 0
    assert not (run_dir / "dataset.npz").exists() and (run_dir / "sources.json").exists()
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=2"]) == 0
    text = data.read_text().replace("energy=", "energy=1", 1)  # one label changed
    data.write_text(text)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: changed since the run started" in err and "would train on other labels" in err


def test_a_run_stopped_early_inside_an_epoch_continues_that_epoch_on_resume(write_config, tmp_path, monkeypatch):
    """Early stopping at a validation inside an epoch (val_every_n_steps), then a resume that trains on (e.g. with
    more patience): the run continues the cut epoch where it stopped, so its weights equal an uninterrupted run's."""
    import multifi.train.trainer as trainer_module

    # early stopping whose decision is known: at step 7's validation
    class StopAtStep7(trainer_module.RunEarlyStopping):
        def _run_early_stopping_check(self, trainer):
            trainer.should_stop = trainer.should_stop or trainer.global_step == 7

    train_cfg = {"epochs": 100, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}
    train_cfg.update(schedule="constant", val_every_n_steps=7, early_stopping_patience=50)
    cut = load_config(
        write_config(name="cut.yaml", train={**train_cfg, "max_steps": 21}, output_dir=str(tmp_path / "cut"))
    )
    monkeypatch.setattr(trainer_module, "RunEarlyStopping", StopAtStep7)
    train(cut)
    first = ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 7 and first["MultiFidelityData"]["batches_done"] == 2  # 5 steps per epoch
    monkeypatch.undo()
    train(cut, resume=True)
    straight = load_config(
        write_config(name="s.yaml", train={**train_cfg, "max_steps": 21}, output_dir=str(tmp_path / "s"))
    )
    train(straight)
    a, b = (ckpt(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("cut", "s"))
    assert a["global_step"] == b["global_step"] == 21 and a["MultiFidelityData"] == b["MultiFidelityData"]
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_a_run_continued_past_its_max_steps_trains_like_one_that_never_stopped(write_config, tmp_path):
    """A run that ended at max_steps mid-epoch and is resumed with a higher max_steps continues that epoch where
    it stopped (Lightning closes a cut-short epoch as complete; the final checkpoint was written after that and
    made the resume skip the epoch's rest and shift every later epoch's sample order)."""
    from multifi.cli.main import main

    # a constant learning rate: a cosine schedule spans max_steps, so raising it changes the rate (said on resume)
    train_cfg = {"epochs": 100, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}
    train_cfg["schedule"] = "constant"
    cut = write_config(name="cut.yaml", train={**train_cfg, "max_steps": 13}, output_dir=str(tmp_path / "cut"))
    straight = write_config(name="straight.yaml", train={**train_cfg, "max_steps": 24}, output_dir=str(tmp_path / "s"))
    assert main(["train", str(cut)]) == 0
    assert ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")["MultiFidelityData"]["batches_done"] > 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--set", "train.max_steps=24"]) == 0
    assert main(["train", str(straight)]) == 0
    a, b = (ckpt(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("cut", "s"))
    assert a["MultiFidelityData"] == b["MultiFidelityData"] and a["epoch"] == b["epoch"]
    # the same weights at step 24 (the best checkpoints may differ: the cut run also validated at step 13)
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def _train_with_callback(monkeypatch, cfg, callback) -> None:
    """train(cfg) with `callback` added to its Trainer (one that copies the run directory at a chosen point)."""
    import multifi.train.run as run_module

    build = run_module.build_trainer

    def with_callback(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    monkeypatch.setattr(run_module, "build_trainer", with_callback)
    try:
        train(cfg)
    finally:
        monkeypatch.setattr(run_module, "build_trainer", build)


def test_a_resume_from_an_epoch_end_checkpoint_trains_like_a_run_that_never_stopped(
    write_config, tmp_path, monkeypatch
):
    """A run killed after its epoch-end checkpoint (step 10, 5 steps per epoch: a copy of the run directory
    taken at step 11 holds it) and resumed: Lightning ended that epoch a second time and counted it twice, so
    every later epoch drew the next epoch's sample order, and metrics.csv's steps were one too high. Now the
    same weights (bit for bit) and the same metrics.csv steps as a run that never stopped."""
    from lightning.pytorch.callbacks import Callback

    train_cfg = {"epochs": 100, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}
    train_cfg.update(schedule="constant", max_steps=30)
    straight = load_config(write_config(name="s.yaml", train=train_cfg, output_dir=str(tmp_path / "s")))
    cut = tmp_path / "cut"

    class CopyAtStep11(Callback):  # the state a kill at step 11 leaves behind
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 11 and not cut.exists():
                shutil.copytree(tmp_path / "s", cut)

    _train_with_callback(monkeypatch, straight, CopyAtStep11())
    saved = ckpt(cut / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 10 and saved["MultiFidelityData"]["batches_done"] == 5  # the epoch-end save
    resumed = load_config(cut / "config.yaml")
    resumed.output_dir = str(cut)
    train(resumed, resume=True)
    a, b = (ckpt(d / "checkpoints" / "last.ckpt") for d in (cut, tmp_path / "s"))
    assert a["global_step"] == b["global_step"] == 30 and a["epoch"] == b["epoch"]
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key

    def steps(d):
        with open(d / "metrics.csv") as f:
            return [(r["epoch"], r["step"]) for r in csv.DictReader(f)]

    assert steps(cut) == steps(tmp_path / "s") == [(str(e + 1), str(5 * e + 5)) for e in range(6)]


@pytest.mark.parametrize(
    "where", ["inside an epoch", "after it inside an epoch", "at an epoch's end", "at the run's end"]
)
def test_a_step_checkpoint_at_a_validation_step_holds_that_validation(write_config, tmp_path, monkeypatch, where):
    """A step checkpoint due at a step that a validation follows (checkpoint_every_n_steps = val_every_n_steps, or
    the steps of an epoch) was written before that validation: a run killed after it at its last step resumed
    without that validation (its plateau step, early-stopping count, best score), so best.ckpt, model.pt and the
    test errors changed. Now it is written after the validation and the plateau schedule's step at it (which ran
    after the checkpoint callbacks, so a checkpoint at a validation's end lacked it): a run killed as the validation
    starts (a copy of the run then), or once the checkpoint is written, resumes to the weights, metrics rows and
    best step of a run that never stopped (5 steps per epoch here)."""
    from lightning.pytorch.callbacks import Callback

    train_cfg = {"epochs": 100, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0, "lr": 1e-6}
    train_cfg.update(schedule="plateau", plateau_patience=0, plateau_factor=0.5, ema_decay=0.0)
    # lr 1e-6: no validation improves by the schedule's threshold, so each one (patience 0) halves the rate
    every, copy_at = {"at an epoch's end": (5, 10), "at the run's end": (5, 20)}.get(where, (4, 8))
    after = where.startswith("after")  # a kill once the step's checkpoint is written: the next step's start
    train_cfg.update(checkpoint_every_n_steps=every, **({"max_steps": 30} if copy_at < 20 else {"epochs": 4}))
    if every == 4:
        train_cfg.update(val_every_n_steps=4, early_stopping_steps=8)
    else:
        train_cfg.update(early_stopping_patience=2)
    straight = load_config(write_config(name="s.yaml", train=train_cfg, output_dir=str(tmp_path / "s")))
    cut = tmp_path / "cut"

    class CopyAtValidation(Callback):  # what a kill as that step's validation starts (or after it) leaves behind
        def on_validation_start(self, trainer, *args):
            if trainer.global_step == copy_at and not cut.exists() and not after:
                shutil.copytree(tmp_path / "s", cut)

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == copy_at + 1 and not cut.exists() and after:
                shutil.copytree(tmp_path / "s", cut)

    _train_with_callback(monkeypatch, straight, CopyAtValidation())
    assert ckpt(cut / "checkpoints" / "last.ckpt")["global_step"] == (copy_at if after else copy_at - every)
    resumed = load_config(cut / "config.yaml")
    resumed.output_dir = str(cut)
    train(resumed, resume=True)
    a, b = (ckpt(d / "checkpoints" / "last.ckpt") for d in (cut, tmp_path / "s"))
    assert a["global_step"] == b["global_step"]
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key

    def rows(d):
        with open(d / "metrics.csv") as f:
            return list(csv.DictReader(f))

    assert rows(cut) == rows(tmp_path / "s") and sum(bool(r["val_loss"]) for r in rows(cut)) >= 4
    first, again = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "s", cut))
    assert (again["steps"], again["best_step"], again["best_monitored"]) == (
        first["steps"],
        first["best_step"],
        first["best_monitored"],
    )
    assert again["fidelities"] == first["fidelities"]


def test_resumes_from_an_epochs_last_step_keep_counting_epochs(write_config, tmp_path):
    """A checkpoint written after an epoch's last step but before the epoch closed (here the stop at max_steps =
    10, 5 steps per epoch; likewise a step checkpoint or Ctrl-C there): Lightning's restart from it left every
    later checkpoint's epoch counters one behind, so a second stop-and-resume inside a later epoch ran extra
    steps, and a resume with more epochs one epoch too few. Stopped at 10, then 17, then run to 30 steps: the
    same steps, counters and weights as a run that never stopped."""
    from multifi.cli.main import main

    train_cfg = {"epochs": 100, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}
    train_cfg["schedule"] = "constant"
    cut = write_config(name="cut.yaml", train={**train_cfg, "max_steps": 10}, output_dir=str(tmp_path / "cut"))
    straight = write_config(name="straight.yaml", train={**train_cfg, "max_steps": 30}, output_dir=str(tmp_path / "s"))
    assert main(["train", str(cut)]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--set", "train.max_steps=17"]) == 0
    mid = ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]["epoch_progress"]["total"]
    assert mid["started"] == mid["completed"] + 1 == 4, mid  # inside the fourth epoch
    assert main(["train", "--resume", str(tmp_path / "cut"), "--set", "train.max_steps=30"]) == 0
    assert main(["train", str(straight)]) == 0
    a, b = (ckpt(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("cut", "s"))
    assert a["global_step"] == b["global_step"] == 30 and a["epoch"] == b["epoch"]
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)

    def losses(d):  # the epoch after the stop at step 10 averaged the stopped epoch's losses in as well
        with open(tmp_path / d / "metrics.csv") as f:
            return [(r["epoch"], float(r["train_loss_epoch"])) for r in csv.DictReader(f) if r["train_loss_epoch"]]

    got, want = losses("cut"), losses("s")
    assert [e for e, _ in got] == [e for e, _ in want] == [str(e) for e in range(1, 7)]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)


def test_a_resume_on_another_number_of_processes(write_config, tmp_path, caplog):
    """The checkpoint records its number of processes. Resumed on another: a cosine schedule (planned over the
    steps) or a checkpoint inside an epoch (Lightning counts batches per process, so the epoch would end early
    or retrain samples) is a one-line error; at an epoch's end with a plateau schedule, a warning. Checkpoints
    without the record are not checked."""
    from multifi.config import load_config
    from multifi.train.resume import check_world

    def ckpt(world, batches_done):
        state = {"epoch": 3, "batches_done": batches_done}
        return {"MultiFidelityData": state if world is None else {**state, "world": world}}

    cosine = load_config(write_config(train={"schedule": "cosine"}))
    plateau = load_config(write_config(name="p.yaml", train={"schedule": "plateau"}))
    with pytest.raises(MultifiError, match=r"cosine learning-rate schedule .* \(1 → 2 processes\): resume on 1"):
        check_world(2, ckpt(1, 0), cosine, tmp_path)
    with pytest.raises(MultifiError, match=r"inside an epoch.* \(2 → 1 processes\)"):
        check_world(1, ckpt(2, 5), plateau, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"")  # a killed run: no model.pt to start from
    with pytest.raises(MultifiError, match=r"train.init_from: .*checkpoints/best.ckpt\)"):
        check_world(1, ckpt(2, 5), plateau, tmp_path)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        check_world(2, ckpt(1, 0), plateau, tmp_path)
        assert "another number of processes (1 → 2 processes)" in caplog.text
        caplog.clear()
        check_world(1, ckpt(1, 5), cosine, tmp_path)  # the same number: nothing to say
        check_world(2, ckpt(None, 5), cosine, tmp_path)  # an older checkpoint: not checked
    assert not caplog.text


def test_the_logged_learning_rate_is_the_last_steps(write_config, tmp_path, caplog):
    """metrics.csv's lr is the rate the last optimiser step used (the scheduler has already moved on to the next
    step's): 5 steps into a 10-step linear warm-up, lr × 5/10 — as the warm-up warning says it peaks; the log
    line of the epoch gives the same rate (it gave the next step's)."""
    import csv

    train_cfg = {"epochs": 1, "batch_size": 8, "warmup_steps": 10, "lr": 0.002, "schedule": "cosine", "progress": True}
    cfg = load_config(write_config(train=train_cfg))
    steps = steps_per_epoch(cfg)
    with caplog.at_level("INFO", logger="multifi"):
        train(cfg)
    rows = [r for r in csv.DictReader(open(Path(cfg.output_dir) / "metrics.csv")) if r.get("lr")]
    assert float(rows[-1]["lr"]) == pytest.approx(0.002 * steps / 10, rel=1e-6)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1"))
    assert f"lr {0.002 * steps / 10:.3g}" in line, line
    # without validation the line comes at the epoch's end, after the schedule has moved on: still the last step's
    unvalidated = load_config(write_config(name="nv.yaml", train=train_cfg, output_dir=str(tmp_path / "nv")))
    unvalidated.data.split.val = 0.0
    caplog.clear()
    with caplog.at_level("INFO", logger="multifi"):
        train(unvalidated)
    steps = steps_per_epoch(unvalidated)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1"))
    assert f"lr {0.002 * steps / 10:.3g}" in line, line


def test_a_resume_sees_edits_to_qm9_label_tables_and_indices_files(tmp_path):
    """QM9 sources were recorded as no file, so an edited label table or indices file resumed silently on the old
    cached data; now both are fingerprinted like any data file (runs recorded before keep resuming)."""
    from multifi.config import validate_config
    from multifi.train.resume import SOURCES, check_sources_unchanged, source_fingerprints

    labels, indices = tmp_path / "gfn.csv", tmp_path / "idx.txt"
    labels.write_text("index,energy_eV\n1,-834.0\n2,-900.0\n")
    indices.write_text("1\n2\n")
    cfg = validate_config(
        {
            "data": {"sources": [{"qm9": {"labels": str(labels), "fidelity": "GFN2-xTB", "indices": str(indices)}}]},
            "output_dir": str(tmp_path / "run"),
        }
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / SOURCES).write_text(json.dumps(source_fingerprints(cfg)))
    assert check_sources_unchanged(run_dir, cfg) is None
    os.utime(labels, ns=(1, 1))  # touched, same bytes: fine, recorded anew
    assert check_sources_unchanged(run_dir, cfg)[0]["qm9"]["labels"]["mtime_ns"] == 1
    labels.write_text("index,energy_eV\n1,-9834.0\n2,-900.0\n")
    with pytest.raises(MultifiError, match=r"gfn.csv: changed since the run started"):
        check_sources_unchanged(run_dir, cfg)
    (run_dir / SOURCES).write_text(json.dumps(source_fingerprints(cfg)))
    indices.write_text("1\n")
    with pytest.raises(MultifiError, match=r"idx.txt: changed since the run started"):
        check_sources_unchanged(run_dir, cfg)
    (run_dir / SOURCES).write_text(json.dumps([None]))  # recorded by an older version: nothing to compare
    assert check_sources_unchanged(run_dir, cfg) is None


def test_training_from_python_gives_back_the_callers_thread_count(write_config, tmp_path, monkeypatch):
    """train.threads applies to the training only: a Python caller's MD afterwards ran on that many threads."""
    import multifi.train.run as run_module

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    cfg = load_config(write_config(train={"threads": other, "max_steps": 2}, output_dir=str(tmp_path / "run")))
    seen, real = [], run_module.hush_lightning
    monkeypatch.setattr(run_module, "hush_lightning", lambda: (seen.append(torch.get_num_threads()), real())[1])
    train(cfg)
    assert seen == [other] and torch.get_num_threads() == before


def test_training_from_python_leaves_the_callers_process_state(write_config, tmp_path):
    """An integrator's process after train(): its random generators (Lightning reseeded random, numpy and torch),
    Lightning's seed variables, the warning filters and Lightning's logger levels as they were; a mapping of the
    sections trains as its RunConfig would, anything else is a one-line error."""
    import logging
    import random
    import warnings

    import yaml

    cfg_path = write_config(train={"max_steps": 2, "seed": 3}, output_dir=str(tmp_path / "run"))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    filters = list(warnings.filters)
    levels = {n: logging.getLogger(n).level for n in ("lightning", "lightning.pytorch")}
    os.environ.pop("PL_GLOBAL_SEED", None)
    train(yaml.safe_load(cfg_path.read_text()))  # the sections as a mapping
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert "PL_GLOBAL_SEED" not in os.environ and warnings.filters == filters
    assert {n: logging.getLogger(n).level for n in levels} == levels
    assert (tmp_path / "run" / "model.pt").exists()
    with pytest.raises(MultifiError, match="train takes a RunConfig"):
        train(str(cfg_path))


def test_a_resume_may_move_qm9_label_tables_and_names_the_setting_it_refuses(tmp_path):
    """A QM9 label table (or indices file) moved elsewhere, same bytes, is the same data (its fingerprint in
    sources.json checks it): the resume was refused as a change of data.sources, with the whole list of sources
    before and after (2 KB) and not the setting that differed. Now a move resumes; a table added or dropped, or
    moved in a run that recorded no fingerprint of it, is refused, naming its own key."""
    import shutil

    from multifi.config import dump_config, validate_config
    from multifi.train.resume import SOURCES, check_resume_changes, source_fingerprints

    first, moved = tmp_path / "first", tmp_path / "moved with space"
    for folder in (first, moved):
        folder.mkdir()
        (folder / "gfn.csv").write_text("index,energy_eV\n1,-834.0\n2,-900.0\n")
        (folder / "gfn.txt").write_text("1\n2\n")

    def config(folder: Path | None, limit: int = 800, weights: dict | None = None, indices: bool = True):
        qm9 = {"fidelity": "GFN2-xTB", "limit": limit}
        if folder is not None:
            qm9.update(labels=str(folder / "gfn.csv"), indices=str(folder / "gfn.txt") if indices else None)
        return validate_config(
            {
                "data": {"sources": [{"path": str(tmp_path / "a.extxyz")}, {"qm9": qm9}]},
                "loss": {"fidelity_weights": weights or {}},
                "output_dir": str(tmp_path / "run"),
            }
        )

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "splits.json").write_text("{}")
    (run_dir / "config.yaml").write_text(dump_config(config(first)))
    (run_dir / SOURCES).write_text(json.dumps(source_fingerprints(config(first))))
    check_resume_changes(run_dir, config(moved))  # moved, fingerprinted: fine (check_sources_unchanged: contents)
    with pytest.raises(MultifiError, match=r"changed: data\.sources\.1\.qm9\.limit: 800 → 700\. Start") as exc:
        check_resume_changes(run_dir, config(first, 700))
    assert "fidelity" not in str(exc.value).split("changed:")[1]  # only the setting that differs
    with pytest.raises(MultifiError, match=r"changed: loss\.fidelity_weights\.GFN2-xTB: None → 2\.0\. Start"):
        check_resume_changes(run_dir, config(first, weights={"GFN2-xTB": 2.0}))
    with pytest.raises(MultifiError, match=r"changed: data\.sources\.1\.qm9\.indices: '\(a file"):
        check_resume_changes(run_dir, config(first, indices=False))  # an indices file dropped
    with pytest.raises(MultifiError, match=r"changed: data\.sources\.1\.qm9\.indices: .* → '\(a file"):
        (run_dir / "config.yaml").write_text(dump_config(config(first, indices=False)))
        check_resume_changes(run_dir, config(first))  # one added
    with pytest.raises(MultifiError, match=r"data\.sources\.1\.qm9\.labels: None → '\(a file"):
        (run_dir / "config.yaml").write_text(dump_config(config(None)))  # QM9's own energies, then a table
        check_resume_changes(run_dir, config(first))
    (run_dir / "config.yaml").write_text(dump_config(config(first)))
    (run_dir / SOURCES).write_text(json.dumps([None, None]))  # recorded by an older version: no fingerprint
    with pytest.raises(MultifiError, match=r"data\.sources\.1\.qm9\.labels: .*first/gfn\.csv' → .*moved"):
        check_resume_changes(run_dir, config(moved))
    shutil.rmtree(moved)


def test_a_run_ending_at_max_steps_inside_an_epoch_validates_its_last_step(write_config, tmp_path):
    """max_steps 7 with 5 steps per epoch: validation at step 5 (epoch end) and at step 7 (the stop), so the last
    steps take part in picking the model (they were never validated: model.pt came from step 5)."""
    import csv

    cfg = load_config(write_config(train={"epochs": 100, "max_steps": 7, "batch_size": 8, "schedule": "constant"}))
    assert steps_per_epoch(cfg) == 5
    train(cfg)
    rows = [r for r in csv.DictReader(open(Path(cfg.output_dir) / "metrics.csv")) if r.get("val_loss")]
    assert [int(r["step"]) for r in rows] == [5, 7]
    assert ckpt(Path(cfg.output_dir) / "checkpoints" / "last.ckpt")["global_step"] == 7


def test_a_run_without_validation_labels_says_what_it_monitors(write_config, caplog):
    """split.files without val (or val: 0) silently switched the checkpoint kept to the training loss."""
    cfg = load_config(
        write_config(
            data={"split": {"val": 0.0, "test": 0.2, "seed": 0}},
            train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
        ),
        [],
    )
    with caplog.at_level(logging.WARNING, logger="multifi"):
        train(cfg)
    assert "no validation labels (data.split): the checkpoint kept and early stopping follow the training loss" in (
        caplog.text
    )


def test_labels_given_twice_agree_within_rounding_and_conflict_beyond():
    """Two tables of one fidelity rounding the same energy differently (2 µeV apart) were a hard conflict."""
    from multifi.data.dataset import FidelityDataset

    def rec(e):
        return {"numbers": np.array([1, 1]), "positions": np.array([[0, 0, 0], [0, 0, 0.74]]), "key": "h2",
                "labels": {"DFT": {"energy": e}}}  # fmt: skip

    merged = FidelityDataset.merge([FidelityDataset.from_records([rec(-31.123456)]),
                                    FidelityDataset.from_records([rec(-31.123458)])])  # fmt: skip
    assert len(merged) == 1
    rounded = FidelityDataset.merge([FidelityDataset.from_records([rec(-31.123456)]),
                                     FidelityDataset.from_records([rec(-31.123)])])  # fmt: skip
    assert len(rounded) == 1 and rounded.energy[0, 0] == -31.123  # three decimals: the same label, the last kept
    with pytest.raises(MultifiError, match="conflicting energy labels"):
        FidelityDataset.merge(
            [FidelityDataset.from_records([rec(-31.1234)]), FidelityDataset.from_records([rec(-31.1334)])]
        )
    chain = [FidelityDataset.from_records([rec(-31.0 + d)]) for d in (0.0, 0.9e-3, 1.8e-3)]  # each step within
    with pytest.raises(MultifiError, match=r"\(-31.000000 vs -30.998200 eV\)"):  # the first and last are not
        FidelityDataset.merge(chain)


def test_the_run_directory_keeps_the_log_of_every_start(write_config, tmp_path, caplog):
    """multifi's log (warnings about the data included) reached only the terminal: a run directory now keeps it
    in train.log (at the multifi logger's level: INFO from the CLI), appended on resume; a start that fails its
    checks writes nothing."""
    cfg = load_config(
        write_config(train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0}), []
    )
    caplog.set_level(logging.INFO, logger="multifi")
    run_dir = train(cfg)
    text = (run_dir / "train.log").read_text()
    assert "run directory:" in text and "WARNING" in text and text.count("run directory:") == 1
    # the outcome too: the model kept and its test errors, as metrics.json has them
    result = json.loads((run_dir / "metrics.json").read_text())
    assert f"the model kept is the checkpoint of step {result['best_step']}" in text
    hi = result["fidelities"]["hi"]
    assert f"test hi ({hi['n']} structures): energy MAE {hi['energy_mae_meV']:.4g} meV" in text
    cfg.train.epochs = 2
    train(cfg, resume=True)
    assert (run_dir / "train.log").read_text().count("run directory:") == 2
    bad = load_config(
        write_config(name="bad.yaml", output_dir=str(tmp_path / "bad")),
        ["data.train_limits.hi=0", "data.train_limits.lo=0"],
    )
    with pytest.raises(MultifiError):
        train(bad)
    assert not (tmp_path / "bad").exists()


def test_a_pooled_model_of_two_distant_methods_does_not_blame_the_labels(write_config, tmp_path, caplog):
    """inject: single fits one reference set to all fidelities; the unit checks compared each fidelity's labels
    with that pooled fit and warned "energies in two units ... in one fidelity?" for correct labels."""
    import ase.io
    from conftest import MOLECULES, emt_labelled

    frames = []
    for i in range(40):
        a = rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=i)
        frames += [emt_labelled(a, "lo"), emt_labelled(a, "hi", 1.0, 8.0)]  # 8 eV/atom apart
    ase.io.write(tmp_path / "far.extxyz", frames, format="extxyz")
    model = {**TINY_MODEL_SINGLE}
    data = {"sources": [{"path": str(tmp_path / "far.extxyz")}]}
    cfg = load_config(write_config(model=model, data=data, train={"max_steps": 1}), [])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        train(cfg)
    assert "lie far from the reference energies" not in caplog.text


TINY_MODEL_SINGLE = {
    "features": 8,
    "interactions": 1,
    "cutoff": 4.0,
    "n_rbf": 8,
    "fidelity_embedding": {"inject": "single"},
}


def test_training_structures_without_any_edge_are_warned(write_config, tmp_path, caplog):
    """Positions in Bohr (or a cutoff shorter than every bond): no two atoms within the cutoff, so the model gives
    zero forces and reference energies whatever the labels; it trained without a word."""
    import ase.io
    from conftest import MOLECULES, emt_labelled

    frames = []
    for i in range(30):
        a = rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=i)
        a.positions *= 4.0  # every bond ≥ 3.8 Å, beyond the 3.0 Å cutoff
        frames.append(emt_labelled(a, "lo"))
    ase.io.write(tmp_path / "far.extxyz", frames, format="extxyz")
    data = {"sources": [{"path": str(tmp_path / "far.extxyz")}]}
    model = {"features": 8, "interactions": 1, "cutoff": 3.0, "n_rbf": 8}
    cfg = load_config(write_config(model=model, data=data, train={"max_steps": 1}), [])
    with caplog.at_level(logging.WARNING, logger="multifi"):
        train(cfg, dry_run=True)
    assert re.search(r"far.extxyz: \d+ of \d+ training structures of more than one atom have no two atoms", caplog.text)


def test_a_metrics_csv_written_with_epochs_from_0_continues_counting_from_1(tmp_path):
    """A run written before metrics.csv counted epochs from 1, resumed after: its rows are renumbered, and the
    interrupted epoch's partial training mean still goes (it was kept as an extra epoch)."""
    from multifi.train.logger import RunCSVLogger

    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss_epoch,val_loss\n0,5,1.0,0.9\n1,7,0.8,0.7\n")
    logger = RunCSVLogger(tmp_path)
    logger.steps_done = lambda: 10
    logger.log_metrics({"epoch": 1, "train_loss_epoch": 0.75, "val_loss": 0.6})
    with open(tmp_path / "metrics.csv") as f:
        rows = [(r["epoch"], r["step"], r["train_loss_epoch"], r["val_loss"]) for r in csv.DictReader(f)]
    assert rows == [("1", "5", "1.0", "0.9"), ("2", "7", "", "0.7"), ("2", "10", "0.75", "0.6")]


def test_training_from_python_without_logging_configured_shows_what_the_command_line_shows(write_config, tmp_path):
    """A script calling train() without configuring logging saw nothing, not even the data's warnings (they went
    to train.log only, and its INFO lines were missing): INFO and above go to stderr and train.log, as from the
    command line; with logging configured, the caller's handlers decide (no second copy of each line)."""
    import subprocess
    import sys

    script = "from multifi.config import load_config; from multifi.train.run import train; train(load_config({!r}))"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    config = write_config()
    proc = subprocess.run([sys.executable, "-c", script.format(str(config))], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "run directory:" in proc.stderr
    run_log = (tmp_path / "run" / "train.log").read_text()
    assert "INFO run directory:" in run_log
    warned = [line.split(" WARNING ", 1)[1] for line in run_log.splitlines() if " WARNING " in line]
    assert warned and all(w in proc.stderr for w in warned)
    configured = "import logging; logging.basicConfig(level=logging.WARNING); " + script.format(str(config))
    shutil.rmtree(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", configured], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "run directory:" not in proc.stderr
    assert all(proc.stderr.count(w) == 1 for w in warned)
