"""Bad input and failures a new user meets: one-line errors, nothing silently wrong, no dead-end run directories."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import drain_fifo, emt_labelled, fifo_and_target, rattled_molecule
from test_cli import cli_run, fails, run  # noqa: F401  (module fixture: one tiny trained run)

from multifi.cli.main import main
from multifi.errors import MultifiError


# ------------------------------------------------------------------------------------ fidelity rule
def test_source_fidelity_never_relabels_structures_naming_their_own(write_config, tiny_extxyz, tmp_path, capsys):
    """Frames saying fidelity=lo in a source configured as LJ: an error naming the file and frame, in train and
    data info; nothing written."""
    fails(
        ["train", write_config(), "--set", "data.sources.0.fidelity=LJ"],
        capsys,
        str(tiny_extxyz),
        "frame 0 (0-based)",
        "names fidelity 'lo'",
        "source says 'LJ'",
    )
    assert not (tmp_path / "run").exists()
    fails(["data", "info", tiny_extxyz, "--fidelity", "LJ"], capsys, str(tiny_extxyz), "frame 0", "'lo'", "'LJ'")


def test_source_fidelity_labels_frames_naming_none(tmp_path, capsys):
    frames = [emt_labelled(rattled_molecule(m, i), "EMT") for i, m in enumerate(("CH4", "NH3"))]
    del frames[1].info["fidelity"]
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, frames)
    code, out, _ = run(["data", "info", path, "--fidelity", "EMT"], capsys)
    assert code == 0 and "EMT" in out and "structures: 2" in out


# ------------------------------------------------------------------------------------ special files
@pytest.mark.parametrize("via_symlink", [False, True])
def test_out_to_a_fifo_writes_through(model, tmp_path, capsys, via_symlink):
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    fifo, out = fifo_and_target(tmp_path, via_symlink)
    got: list = []
    reader = drain_fifo(fifo, got)
    assert run(["predict", model, src, "--fidelity", "lo", "--out", out], capsys)[0] == 0
    reader.join(10)
    assert b"energy=" in got[0] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_out_write_errors_are_one_line(model, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    (tmp_path / "file").write_text("")
    fails(
        ["predict", model, src, "--fidelity", "lo", "--out", tmp_path / "file" / "x.xyz"],
        capsys,
        "file: exists and is not a folder",
    )
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    labelled = tmp_path / "labelled.xyz"
    ase.io.write(labelled, [emt_labelled(rattled_molecule("H2O", 0), "lo")])
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    fails(
        ["evaluate", model, labelled, "--out", tmp_path / "m.json"],
        capsys,
        "m.json: cannot write (Read-only file system)",
    )


# ------------------------------------------------------------------------------------ NaN / empty output
def test_overlapping_atoms_are_an_error_at_prediction(model, tmp_path, capsys):
    bad = Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0], [0.9, 0.3, 0]])
    src = tmp_path / "bad.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0), bad])
    out = tmp_path / "pred.xyz"
    fails(
        ["predict", model, src, "--fidelity", "lo", "--out", out],
        capsys,
        str(src),
        "structure 1: atoms 0 and 1 are 0.000 Å apart",
    )
    assert not out.exists()
    # evaluate: the same error (before, NaN metrics and a JSON file with NaN in it, exit 0)
    labelled = tmp_path / "bad_labelled.extxyz"
    labelled_bad = bad.copy()
    labelled_bad.calc = SinglePointCalculator(labelled_bad, energy=-10.0, forces=np.zeros((3, 3)))
    labelled_bad.info["fidelity"] = "lo"
    ase.io.write(labelled, [emt_labelled(rattled_molecule("H2O", 0), "lo"), labelled_bad])
    metrics = tmp_path / "m.json"
    fails(
        ["evaluate", model, labelled, "--out", metrics],
        capsys,
        f"{labelled}: structure 1 (0-based) has atoms 0.000 Å apart",
    )
    assert not metrics.exists()
    import multifi

    bad.calc = multifi.Calculator(model, fidelity="lo")
    with pytest.raises(MultifiError, match="atoms 0 and 1 are 0.000 Å apart"):
        bad.get_potential_energy()


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_batch_size_must_be_positive(model, tmp_path, capsys, value):
    src = tmp_path / "in.xyz"
    ase.io.write(src, [rattled_molecule("H2O", 0)])
    for cmd in (["predict", model, src, "--fidelity", "lo", "--out", tmp_path / "o.xyz"], ["evaluate", model, src]):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in cmd + ["--batch-size", value]])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith(f"multifi: error: multifi {cmd[0]}: argument --batch-size: expected a positive integer")
    assert not (tmp_path / "o.xyz").exists()


def test_structure_without_atoms_is_an_error(tmp_path, capsys):
    empty = Atoms()
    empty.calc = SinglePointCalculator(empty, energy=0.0)
    empty.info["fidelity"] = "lo"
    path = tmp_path / "empty.extxyz"
    ase.io.write(path, [emt_labelled(rattled_molecule("CH4", 0), "lo"), empty])
    fails(["data", "info", path], capsys, str(path), "structure 1: no atoms")


# ------------------------------------------------------------------------------------ no dead ends
@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.fidelity_sampling={lo: -1}", ["train.fidelity_sampling.lo", "greater than or equal to 0"]),
        ("train.fidelity_sampling={lo: 0, hi: 0}", ["train.fidelity_sampling: every fidelity", "weight 0"]),
        ("train.fidelity_sampling={hi: 1}", ["listed weights sum to 1 but lo", "are not listed"]),
        ("train.devices=0", ["train.devices", "number of devices"]),
        ("train.devices=abc", ["train.devices", "'abc'"]),
        ("train.accelerator=nonsense", ["train.accelerator=nonsense"]),
        ("data.sources.x.path=a", ["data.sources is a list of 1", "data.sources.0"]),
        ("train.epochs.x=1", ["train.epochs is a value"]),
        ("train.epochs=[1", ["not valid YAML", "line 1"]),
    ],
)
def test_bad_settings_fail_before_anything_is_written(write_config, tmp_path, capsys, override, fragments):
    fails(
        [
            "train",
            write_config(train={"epochs": 1, "batch_size": 8, "progress": False, "threads": 1}),
            "--set",
            override,
        ],
        capsys,
        *fragments,
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
def test_gpu_accelerator_without_gpu(write_config, tmp_path, capsys):
    fails(["train", write_config(), "--set", "train.accelerator=gpu"], capsys, "train.accelerator=gpu")
    assert not (tmp_path / "run").exists()


def test_devices_flag(write_config, tmp_path, capsys):
    fails(["train", write_config(), "--devices", "0"], capsys, "train.devices", "got 0")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_device_ids_on_cpu(write_config, tmp_path, capsys, dry_run):
    """GPU-style device ids on a CPU: one line (was Lightning's TypeError traceback), also from --dry-run."""
    fails(["train", write_config(), "--devices", "0,1", *dry_run], capsys, "train.devices=0,1", "train.devices=2")
    assert not (tmp_path / "run").exists()


def test_broken_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources:\n    - path: a.xyz\n  split: {val: 0.1\nmodel: {}\n")
    fails(["train", path], capsys, str(path), "not valid YAML: line ")


def test_config_that_is_no_utf8_text_or_a_directory(write_config, tmp_path, capsys):
    """A config saved in Latin-1, a binary file, a run directory: one line each (were a UnicodeDecodeError traceback
    and "no such config file" for a folder that exists)."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"# cutoff in \xc5\n" + write_config().read_bytes())
    fails(["train", latin1, "--dry-run"], capsys, str(latin1), "not a UTF-8 text file (byte 12")
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(128, 256)))
    for argv in (["train", binary, "--dry-run"], ["experiment", "status", binary]):
        fails(argv, capsys, str(binary), "not a UTF-8 text file")
    run_dir = tmp_path / "run1"
    run_dir.mkdir()
    fails(["train", run_dir, "--dry-run"], capsys, f"{run_dir}: a directory, not a config file")
    (run_dir / "config.yaml").write_text("{}")
    fails(["train", run_dir, "--dry-run"], capsys, "a run directory? `multifi train --resume DIR` continues it")


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_output_dir_that_cannot_be_a_folder(write_config, tmp_path, capsys, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = blocker if kind == "file" else blocker / "run"
    fails(["train", write_config(), "--set", f"output_dir={out}"], capsys, str(out))
    assert blocker.read_text() == ""


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_dir_where_no_folder_can_be_made_fails_in_the_dry_run_too(write_config, capsys):
    """/proc takes no new folders whatever the permissions say (root passes os.access): the dry run said 'valid' and
    the run failed after loading the data; both fail at once now, leaving nothing behind."""
    before = set(Path("/proc").iterdir())
    for dry in (["--dry-run"], []):
        fails(
            ["train", write_config(), "--set", "output_dir=/proc/multifi_run", *dry], capsys, "cannot create output_dir"
        )
    assert not [p for p in set(Path("/proc").iterdir()) - before if p.name.startswith(".multifi")]


def test_output_dir_write_error_mid_run_is_one_line(write_config, tmp_path, capsys, monkeypatch):
    """A full disk while the run writes (here the first checkpoint): one line, and the directory restarts."""
    import multifi.train.callbacks as callbacks_mod

    real = callbacks_mod.atomic_write

    def full(path, write):
        if str(path).endswith(".ckpt"):
            raise MultifiError(f"{path}: cannot write ({os.strerror(errno.ENOSPC)})")
        return real(path, write)

    monkeypatch.setattr(callbacks_mod, "atomic_write", full)
    fails(["train", write_config()], capsys, ".ckpt: cannot write (No space left on device)")
    monkeypatch.setattr(callbacks_mod, "atomic_write", real)
    assert run(["train", write_config()], capsys)[0] == 0  # the same command again: no rm -rf needed
    assert (tmp_path / "run" / "model.pt").exists()


def test_ctrl_c_in_epoch_0_exits_130_and_the_run_restarts(write_config, tmp_path, capsys, monkeypatch):
    from multifi.train.module import PotentialModule

    real = PotentialModule.training_step

    def interrupted(self, batch, batch_idx):
        if batch_idx == 1:
            raise KeyboardInterrupt
        return real(self, batch, batch_idx)

    monkeypatch.setattr(PotentialModule, "training_step", interrupted)
    code, _, err = run(["train", write_config()], capsys)
    assert code == 130 and err.strip().splitlines()[-1].startswith(
        "multifi: interrupted; continue with: multifi train --resume"
    )
    monkeypatch.setattr(PotentialModule, "training_step", real)
    run_dir = tmp_path / "run"
    assert run(["train", "--resume", run_dir], capsys)[0] == 0
    assert (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("validate_every", [None, 2])
def test_sigterm_exits_143_with_the_resume_hint_and_the_run_continues(
    write_config, tmp_path, capsys, monkeypatch, validate_every
):
    """SIGTERM (a scheduler's time limit, kill) stops a run as Ctrl-C does, but exits 143, not 130, after
    checkpointing the step it came in, unless a validation was due at that step (Lightning runs it after the
    step's checkpoint hooks; a checkpoint before it made the resume skip it): the resumed run ends as one never
    stopped."""
    import signal

    from multifi.models.registry import load_potential
    from multifi.train.module import PotentialModule

    real = PotentialModule.training_step

    def terminated(self, batch, batch_idx):
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    train = {"batch_size": 4, "val_every_n_steps": validate_every}
    monkeypatch.setattr(PotentialModule, "training_step", terminated)
    code, _, err = run(["train", write_config(train=train)], capsys)
    assert code == 143 and err.strip().splitlines()[-1].startswith(
        "multifi: terminated; continue with: multifi train --resume"
    )
    # the step during which SIGTERM came is checkpointed (with epoch-end checkpoints only, the epoch was lost)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None
    assert (step == 2) == (validate_every is None)  # a validation due at step 2: no checkpoint of it
    monkeypatch.setattr(PotentialModule, "training_step", real)
    assert run(["train", "--resume", tmp_path / "run"], capsys)[0] == 0
    straight = write_config(name="straight.yaml", train=train, output_dir=str(tmp_path / "s"))
    assert run(["train", straight], capsys)[0] == 0
    for name in ("metrics.json",):  # the same validations, the same model kept
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("run", "s"))
        assert (a["steps"], a["best_step"], a["best_monitored"]) == (b["steps"], b["best_step"], b["best_monitored"])
    straight = load_potential(tmp_path / "s" / "model.pt").state_dict()
    for key, value in load_potential(tmp_path / "run" / "model.pt").state_dict().items():
        assert torch.equal(value, straight[key]), key  # as a run that was never stopped


def test_a_lost_training_process_is_one_line_with_the_resume_hint(tmp_path):
    """gloo's error when another rank dies (a traceback of 100 lines before) becomes one line; in a single-process
    run a RuntimeError stays what it is."""
    from multifi.train.trainer import fit_or_interrupt

    class Trainer:
        interrupted = received_sigterm = False

        def __init__(self, world_size):
            self.world_size = world_size

        def fit(self, *args, **kwargs):
            raise RuntimeError(
                "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                "[127.0.0.1]:22232: Connection reset by peer. This is typically caused by a remote worker hanging"
            )

    hint = "continue with: multifi train --resume run"
    with pytest.raises(MultifiError) as info:
        fit_or_interrupt(Trainer(2), None, None, None, tmp_path, hint)
    assert str(info.value) == (
        f"{tmp_path}: another training process stopped (Read error [127.0.0.1]:22232: Connection reset by peer); {hint}"
    )
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        fit_or_interrupt(Trainer(1), None, None, None, tmp_path, hint)

    class Slow(Trainer):  # a slow peer or this process's own fault is no lost process: its traceback stays
        def fit(self, *args, **kwargs):
            raise RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation to complete")

    with pytest.raises(RuntimeError, match="Timed out waiting"):
        fit_or_interrupt(Slow(2), None, None, None, tmp_path, hint)


def test_resume_with_truncated_last_checkpoint_falls_back_to_best(write_config, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    assert run(["train", write_config()], capsys)[0] == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["train", "--resume", run_dir, "--set", "train.epochs=3"], capsys)[0] == 0
    assert "last.ckpt: unreadable" in caplog.text and "resuming from checkpoints/best.ckpt" in caplog.text
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["fidelities"]
    # no readable checkpoint at all: a finished run is not started again over its model (nor is one whose
    # checkpoints were deleted); an unfinished one is, rather than leaving a dead end
    for p in (run_dir / "checkpoints").glob("*.ckpt"):
        p.write_bytes(b"PK\x03\x04 truncated")
    model = (run_dir / "model.pt").read_bytes()
    fails(["train", "--resume", run_dir], capsys, "a finished run (model.pt, metrics.json) without checkpoints")
    assert (run_dir / "model.pt").read_bytes() == model
    gone = tmp_path / "gone"
    shutil.copytree(run_dir, gone)
    shutil.rmtree(gone / "checkpoints")
    fails(["train", "--resume", gone], capsys, "without checkpoints: nothing to resume")
    fails(["train", write_config(), "--set", f"output_dir={gone}"], capsys, "train into another output_dir")
    other = tmp_path / "evaluated"  # a folder holding an `evaluate --out metrics.json`: no run of its own
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    fails(["train", write_config(), "--set", f"output_dir={other}"], capsys, "not empty; use another output_dir")
    (run_dir / "model.pt").unlink()
    (run_dir / "metrics.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["train", "--resume", run_dir, "--set", "train.epochs=1"], capsys)[0] == 0
    assert "no checkpoint to resume from; starting the run from the beginning" in caplog.text
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0


# ------------------------------------------------------------------------------------ logs
def test_metrics_csv_one_dense_row_per_validation_and_none_twice_after_resume(write_config, tmp_path, capsys):
    import csv

    run_dir = tmp_path / "run"
    assert run(["train", write_config()], capsys)[0] == 0  # 2 epochs of 5 steps
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["5", "10"]  # optimiser steps done, as the checkpoints count
    assert all(r["val_loss"] and r["lr"] and r["train_loss_epoch"] and r["val/hi/energy_mae_meV"] for r in rows)
    assert not any(k.endswith("_step") for k in rows[0])
    # the interrupted session had validated once more after its last checkpoint: that row must not stay twice
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("2,15," + ",".join("123456" for _ in list(rows[0])[2:]) + "\n")
    assert run(["train", "--resume", run_dir, "--set", "train.epochs=3"], capsys)[0] == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["5", "10", "15"] and rows[-1]["val_loss"] != "123456"


def test_metrics_csv_one_training_mean_per_epoch_after_a_max_steps_run_is_continued(write_config, tmp_path, capsys):
    """A run stopped inside an epoch (max_steps 7, epochs of 5 steps) and continued logs that epoch's training
    mean again at its end: metrics.csv keeps the full epoch's only, and the validation rows."""
    import csv

    run_dir = tmp_path / "run"
    assert run(["train", write_config(), "--set", "train.max_steps=7"], capsys)[0] == 0
    with open(run_dir / "metrics.csv", newline="") as f:  # the stopped epoch's means say how much they cover
        covered = {r["step"]: float(r["train_samples"]) for r in csv.DictReader(f) if r["train_loss_epoch"]}
    assert list(covered) == ["5", "7"] and 0 < covered["7"] < covered["5"], covered
    assert run(["train", "--resume", run_dir, "--set", "train.max_steps=-1"], capsys)[0] == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    means = [(r["epoch"], r["step"]) for r in rows if r["train_loss_epoch"]]
    assert means == [("1", "5"), ("2", "10")], rows
    assert [r["step"] for r in rows] == ["5", "7", "10"]  # the stop at 7 was validated; no partial-epoch mean
    assert all(r["val_loss"] for r in rows) and all(r["train_energy"] for r in rows if r["step"] != "7")
    assert [float(r["train_samples"]) for r in rows if r["train_loss_epoch"]] == [covered["5"]] * 2


@pytest.mark.parametrize("terminal", [False, True])
def test_train_log_has_a_line_per_validation_whatever_the_console(
    write_config, tmp_path, caplog, monkeypatch, terminal
):
    """train.log held no validation lines when the run started on a terminal (a progress bar instead) or with
    train.progress off; now it always does, and they stay off the console there (the console handlers' filter)."""
    import multifi.train.logger as logger_module
    from multifi.config import load_config
    from multifi.logs import not_file_only
    from multifi.train.run import train

    monkeypatch.setattr(logger_module, "progress_bar_wanted", lambda progress: bool(progress) and terminal)
    train_cfg = {"progress": terminal, "epochs": 2, "batch_size": 8, "threads": 1}
    with caplog.at_level("INFO", logger="multifi"):
        run_dir = train(load_config(write_config(train=train_cfg, output_dir=str(tmp_path / "run"))))
    records = [r for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(records) == 2 and not any(not_file_only(r) for r in records)
    logged = [line for line in (run_dir / "train.log").read_text().splitlines() if " INFO epoch " in line]
    assert len(logged) == 2 and "epoch 1/2  step 5/10  val E MAE meV: hi " in logged[0]


def test_epoch_line_without_a_terminal(write_config, tmp_path, caplog):
    """progress: true without a TTY (pytest captures stderr): one line per epoch, no progress bar."""
    from multifi.config import load_config
    from multifi.train.run import train

    with caplog.at_level("INFO", logger="multifi"):
        train(load_config(write_config(train={"progress": True, "epochs": 2, "batch_size": 8, "threads": 1})))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2  step 5/10  val E MAE meV: hi ")
    assert " lr " in lines[0] and lines[0].endswith(" s")
    caplog.clear()  # a step limit is shown next to the step: it, not the epochs, ends the run
    with caplog.at_level("INFO", logger="multifi"):
        cfg = {"progress": True, "epochs": 100, "max_steps": 7, "batch_size": 8, "threads": 1}
        train(load_config(write_config(name="limit.yaml", train=cfg, output_dir=str(tmp_path / "limit"))))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert lines[0].startswith("epoch 1/100  step 5/7  ")
    caplog.clear()  # the epochs end it before max_steps: "step 10/30" read as 30 steps to come; the real end shown
    with caplog.at_level("INFO", logger="multifi"):
        cfg = {"progress": True, "epochs": 2, "max_steps": 30, "batch_size": 8, "threads": 1}
        train(load_config(write_config(name="cap.yaml", train=cfg, output_dir=str(tmp_path / "cap"))))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert lines[-1].startswith("epoch 2/2  step 10/10  ")
    # validation every 3 steps, epochs of 5: an epoch end without a validation shows no (old) validation numbers
    caplog.clear()
    cfg = {"progress": True, "epochs": 2, "batch_size": 8, "threads": 1, "val_every_n_steps": 3}
    with caplog.at_level("INFO", logger="multifi"):
        train(load_config(write_config(train=cfg, output_dir=str(tmp_path / "steps"))))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    at_end = [line for line in lines if "step 5/10 " in line]
    assert at_end and all("val" not in line and "train loss" in line for line in at_end), lines
    assert any("step 3/10 " in line and "val E MAE" in line for line in lines)


def test_monitoring_a_metric_without_validation_labels_is_an_error_before_training(write_config, tmp_path, capsys):
    """train.monitor_metric forces on data without forces: a traceback after the first validation before."""
    config = write_config(train={"epochs": 1, "monitor": "hi", "monitor_metric": "stress_mae_GPa"})
    message = "train.monitor_metric: stress_mae_GPa needs stress labels at 'hi'"
    fails(["train", config, "--dry-run"], capsys, f"{config}: {message}")
    fails(["train", config], capsys, "needs stress labels")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ reference and plan
def _keys(model, prefix=""):
    from multifi.validation import first_model

    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key
        sub = first_model(field.annotation)
        if sub is not None:
            yield from _keys(sub, key + ".")


def test_config_example_has_every_key_and_validates(tmp_path, capsys):
    from multifi.config import RunConfig, load_config

    out = tmp_path / "example.yaml"
    assert run(["config", "--example", "--out", out], capsys)[0] == 0
    text = out.read_text()
    for key in _keys(RunConfig):  # every key appears (nested ones by their last name), each with a comment
        name = key.rsplit(".", 1)[-1]
        assert f"{name}: " in text or f"{name}:\n" in text, key
    cfg = load_config(out)
    defaults = RunConfig.model_validate({"data": {"sources": [{"path": "x"}]}})
    assert cfg.model_dump(exclude={"data": {"sources"}}) == defaults.model_dump(exclude={"data": {"sources"}})
    code, stdout, _ = run(["config"], capsys)
    assert code == 0 and stdout == text
    mine = tmp_path / "mine.yaml"
    mine.write_text("data: {sources: [{path: a.extxyz}]}\n")
    fails(["config", "--out", mine], capsys, f"{mine}: exists; not replaced (--force replaces it)")
    assert mine.read_text().startswith("data: {sources")
    assert run(["config", "--out", mine, "--force"], capsys)[0] == 0 and mine.read_text() == text


def test_dry_run_checks_and_plans_without_writing(write_config, tmp_path, capsys, caplog):
    with caplog.at_level("INFO", logger="multifi"):
        assert run(["train", write_config(), "--dry-run"], capsys)[0] == 0
    assert not (tmp_path / "run").exists()
    assert "train: lo=" in caplog.text and "parameters" in caplog.text and "5 steps per epoch" in caplog.text
    caplog.clear()  # one step per epoch, one epoch: said in the singular
    with caplog.at_level("INFO", logger="multifi"):
        argv = ["train", write_config(), "--dry-run", "--set", "train.batch_size=512", "--set", "train.epochs=1"]
        assert run(argv, capsys)[0] == 0
    assert re.search(r"1 step per epoch, 1 epoch, at most 1 step$", caplog.text, re.M)
    assert re.search(r"sampling per epoch: every training sample once \(lo \d+\.\d %, hi \d+\.\d %\)", caplog.text)
    fails(["train", write_config(), "--dry-run", "--set", "data.sources.0.fidelity=LJ"], capsys, "names fidelity 'lo'")
    # over a finished run's folder the dry run still checks config and data (it stopped at the folder before),
    # then says the run could not start there
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_text("")
    fails(["train", write_config(), "--dry-run", "--set", "model.n_rbf=-1"], capsys, "model.n_rbf")
    fails(["train", write_config(), "--dry-run", "--set", "data.sources.0.fidelity=LJ"], capsys, "names fidelity 'lo'")
    caplog.clear()
    with caplog.at_level("INFO", logger="multifi"):
        fails(
            ["train", write_config(), "--dry-run"],
            capsys,
            "run directory exists and is not empty; use another output_dir (config and data are valid)",
        )
    assert "nothing written (the run would go to" not in caplog.text  # not said before the error that it can't


def test_a_run_without_test_structures_says_so_instead_of_an_empty_table(write_config, tmp_path, capsys):
    code, out, _ = run(["train", write_config(), "--set", "data.split.test=0", "--set", "train.epochs=1"], capsys)
    assert code == 0 and "no test structures (data.split.test: 0 or no test file): no test metrics" in out
    assert "E MAE" not in out


def test_data_info_describes_a_file_without_labels(tmp_path, capsys):
    """An unlabelled file (a pool for select/predict) is described, not refused for lacking a fidelity; a file
    with labels but no fidelity still is."""
    path = tmp_path / "pool.extxyz"
    ase.io.write(path, [rattled_molecule("CH4", 0), rattled_molecule("NH3", 1)])
    code, out, _ = run(["data", "info", path], capsys)
    assert code == 0 and "structures: 2" in out and "elements: H C N" in out and "labels: none" in out
    labelled = tmp_path / "labelled.extxyz"
    ase.io.write(labelled, [emt_labelled(rattled_molecule("CH4", 0), "lo")])
    frame = ase.io.read(labelled)
    frame.info.pop("fidelity")
    ase.io.write(labelled, frame)
    fails(["data", "info", labelled], capsys, "no fidelity")


def test_a_warmup_as_long_as_the_run_is_warned(write_config, capsys, caplog):
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["train", write_config(), "--dry-run", "--set", "train.warmup_steps=100"], capsys)[0] == 0
    assert re.search(r"train.warmup_steps=100 is longer than the run \(10 steps\)", caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["train", write_config(), "--dry-run", "--set", "train.warmup_steps=5"], capsys)[0] == 0
    assert "warmup_steps" not in caplog.text


def test_dry_run_shows_the_sampling_shares_and_warns_of_unused_labels(write_config, capsys, caplog):
    """A partial train.fidelity_sampling is explained before training: each fidelity's share of an epoch beside
    its share of the labels; a weight of 0 on a fidelity with labels is a warning, not silence."""
    with caplog.at_level("INFO", logger="multifi"):
        assert run(["train", write_config(), "--dry-run", "--set", "train.fidelity_sampling={hi: 0.5}"], capsys)[0] == 0
    assert re.search(r"sampling per epoch .*: lo 50\.0 % \(labels \d+\.\d %\), hi 50\.0 %", caplog.text)
    caplog.clear()
    with caplog.at_level("INFO", logger="multifi"):
        assert run(["train", write_config(), "--dry-run", "--set", "train.fidelity_sampling={lo: 0}"], capsys)[0] == 0
    assert re.search(r"lo has weight 0: its \d+ training labels are never trained on", caplog.text)
    assert "lo 0.0 %" in caplog.text and "hi 100.0 %" in caplog.text


def test_an_output_that_is_an_input_is_refused_before_anything_runs(model, tmp_path, capsys, tiny_extxyz):
    """--out or --plot naming one of the command's inputs would overwrite it (data replaced by metrics JSON, a
    model by a deployed file): a one-line error, the input unchanged. A run directory stands for its model.pt."""
    import shutil

    data = tmp_path / "data.extxyz"
    shutil.copy(tiny_extxyz, data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(model, run_dir / "model.pt")
    before = data.read_bytes(), (run_dir / "model.pt").read_bytes()
    fails(["evaluate", model, data, "--out", data], capsys, f"{data}: --out is also an input", "overwritten")
    fails(["evaluate", model, data, "--plot", data], capsys, f"{data}: --plot is also an input")
    fails(["predict", model, data, "--fidelity", "hi", "--out", data], capsys, "--out is also an input")
    fails(["deploy", run_dir, "--fidelity", "hi", "--out", run_dir / "model.pt"], capsys, f"({run_dir})")
    assert (data.read_bytes(), (run_dir / "model.pt").read_bytes()) == before


# ------------------------------------------------------------------------------------ friendliness
def test_label_keys_per_source(write_config, tmp_path, capsys):
    """MACE-style REF_energy/REF_forces: a one-line hint without the keys, read with them (CLI and config)."""
    frames = []
    for i, name in enumerate(("CH4", "NH3", "H2O")):
        a = emt_labelled(rattled_molecule(name, i), "DFT")
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        a.calc = None
        frames.append(a)
    path = tmp_path / "mace.extxyz"
    ase.io.write(path, frames)
    fails(
        ["data", "info", path],
        capsys,
        "frame 0",
        "no energy/forces/stress label",
        "REF_energy (set energy_key: REF_energy)",
        "REF_forces (set forces_key: REF_forces)",
    )
    code, out, _ = run(["data", "info", path, "--energy-key", "REF_energy", "--forces-key", "REF_forces"], capsys)
    assert code == 0 and "DFT" in out and out.count(" 3") >= 2
    from multifi.config import SourceConfig
    from multifi.data.sources import read_source

    ds = read_source(SourceConfig(path=str(path), energy_key="REF_energy", forces_key="REF_forces"))
    assert ds.energy[:, 0] == pytest.approx([f.info["REF_energy"] for f in frames])
    np.testing.assert_allclose(ds.forces[:, 0], np.concatenate([f.arrays["REF_forces"] for f in frames]), atol=1e-6)
    with pytest.raises(MultifiError, match="energy_key applies to files ASE reads"):
        read_source(SourceConfig(path=str(path), format="matpes", energy_key="REF_energy"))
    with pytest.raises(MultifiError, match=r"index ':2' picks frames of files ASE reads, not of matpes files"):
        read_source(SourceConfig(path=str(path), format="matpes", index=":2"))  # was ignored: every structure read


def test_predict_several_fidelities_keeps_reference_labels(model, tmp_path, capsys):
    mols = [emt_labelled(rattled_molecule("CH4", 1), "lo"), emt_labelled(rattled_molecule("NH3", 2), "lo")]
    src = tmp_path / "in.extxyz"
    ase.io.write(src, mols)
    out = tmp_path / "pred.extxyz"
    code, stdout, _ = run(
        ["predict", model, src, "--fidelity", "lo", "--fidelity", "hi", "--out", out, "--device", "cpu"], capsys
    )
    assert code == 0 and "lo, hi" in stdout
    from multifi.models.registry import load_potential
    from multifi.predict import predict_atoms

    pot = load_potential(model)
    e_lo, f_lo, _ = predict_atoms(pot, mols, "lo")
    e_hi, _, _ = predict_atoms(pot, mols, "hi")
    for a, m, lo, hi, f in zip(ase.io.read(out, ":"), mols, e_lo, e_hi, f_lo):
        assert a.info["ref_energy"] == pytest.approx(m.get_potential_energy())
        np.testing.assert_allclose(a.arrays["ref_forces"], m.get_forces(), atol=1e-6)
        assert a.info["ref_fidelity"] == "lo" and a.info["fidelity"] == "lo"
        assert a.get_potential_energy() == pytest.approx(lo, rel=1e-6) and a.info["energy_lo"] == pytest.approx(lo)
        assert a.info["energy_hi"] == pytest.approx(hi, rel=1e-6) and a.info["energy_hi"] != a.info["energy_lo"]
        np.testing.assert_allclose(a.arrays["forces_lo"], f, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["predict", str(model), str(src), "--fidelity", "lo", "--out", str(out), "--device", "nonsense"])
    assert "not a device" in capsys.readouterr().err


def test_a_predict_output_is_not_read_as_labels_and_chaining_keeps_the_references(model, tmp_path, capsys):
    """Predicting on a predict output keeps the original ref_* labels (not the first run's predictions);
    evaluate/train on a predict output is a one-line error unless keys are named; ref_energy read from it
    comes with its ref_fidelity."""
    mols = [emt_labelled(rattled_molecule("CH4", 1), "hi"), emt_labelled(rattled_molecule("NH3", 2), "hi")]
    src, first, second = tmp_path / "in.extxyz", tmp_path / "p1.extxyz", tmp_path / "p2.extxyz"
    ase.io.write(src, mols)
    assert run(["predict", model, src, "--fidelity", "lo", "--fidelity", "hi", "--out", first], capsys)[0] == 0
    assert run(["predict", model, first, "--fidelity", "hi", "--out", second], capsys)[0] == 0
    for a, m in zip(ase.io.read(second, ":"), mols):
        assert a.info["ref_energy"] == pytest.approx(m.get_potential_energy()) and a.info["ref_fidelity"] == "hi"
        np.testing.assert_allclose(a.arrays["ref_forces"], m.get_forces(), atol=1e-6)
        assert a.info["fidelity"] == "hi" and "energy_lo" not in a.info and "forces_lo" not in a.arrays
        assert a.info["predicted_by"].startswith("multifi ")
    fails(["evaluate", model, second], capsys, str(second), "holds predictions of `multifi predict`", "ref_energy")
    code, out, _ = run(["evaluate", model, second, "--energy-key", "ref_energy", "--forces-key", "ref_forces"], capsys)
    assert code == 0
    direct, _, _ = run(["evaluate", model, src], capsys), None, None
    assert direct[0] == 0 and direct[1].split("\n")[1:] == out.split("\n")[1:]  # same table but the title
    both = emt_labelled(rattled_molecule("CH4", 1), "hi")
    both.info["ref_energy"] = -1.0
    ase.io.write(tmp_path / "both.extxyz", [both])
    fails(
        ["predict", model, tmp_path / "both.extxyz", "--fidelity", "hi", "--out", tmp_path / "x.extxyz"],
        capsys,
        "structure 0 has both energy and ref_energy",
    )
    assert not (tmp_path / "x.extxyz").exists()


def test_output_names_compression_key_collisions_and_structure_names(model, tmp_path, capsys, caplog, monkeypatch):
    """.gz outputs are compressed (readable back), other formats than extxyz refused, colliding keys refused;
    nothing is written on an error."""
    src = tmp_path / "in.extxyz"
    ase.io.write(src, [emt_labelled(rattled_molecule("CH4", 1), "lo")])
    gz = tmp_path / "pred.extxyz.gz"
    assert run(["predict", model, src, "--fidelity", "lo", "--out", gz], capsys)[0] == 0
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    plain = tmp_path / "pred.extxyz"
    assert run(["predict", model, src, "--fidelity", "lo", "--out", plain], capsys)[0] == 0
    assert ase.io.read(gz).get_potential_energy() == ase.io.read(plain).get_potential_energy()
    fails(
        ["predict", model, src, "--fidelity", "lo", "--out", tmp_path / "p.traj"], capsys, "p.traj", "written as extxyz"
    )
    fails(
        ["predict", model, src, "--fidelity", "PBE-D3", "--fidelity", "PBE_D3", "--out", tmp_path / "c.extxyz"],
        capsys,
        "'PBE-D3' and 'PBE_D3' would both be written as 'energy_PBE_D3'",
    )
    assert not (tmp_path / "p.traj").exists() and not (tmp_path / "c.extxyz").exists()
    ev = tmp_path / "metrics.json.gz"
    assert run(["evaluate", model, src, "--out", ev], capsys)[0] == 0
    import gzip

    assert "lo" in json.loads(gzip.decompress(ev.read_bytes()))["fidelities"]
    fails(["train", "--resume", tmp_path / "never"], capsys, "never: no such run directory")
    (tmp_path / "half").mkdir()
    fails(["train", "--resume", tmp_path / "half"], capsys, "half: not a run directory (no config.yaml")
    cu = Atoms("CuH", positions=[[0, 0, 0], [0, 0, 1.5]])
    ase.io.write(tmp_path / "cu.extxyz", [emt_labelled(rattled_molecule("CH4", 1), "lo"), emt_labelled(cu, "lo")])
    # a structure with an element the model never saw is left out of the errors (as in a run's test report),
    # warned; a file of nothing but such structures is an error
    out = tmp_path / "cu.json"
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["evaluate", model, tmp_path / "cu.extxyz", "--out", out], capsys)[0] == 0
    assert "lo: 1 evaluated structure(s) contain Cu, which no training label contained: left out" in caplog.text
    scored = json.loads(out.read_text())["fidelities"]["lo"]
    assert scored["n"] == 1 and scored["n_unseen_elements"] == 1, scored
    import multifi.plots

    drawn = []
    monkeypatch.setattr(multifi.plots, "parity_plot", lambda path, names, ref, pred, *a, **k: drawn.append(len(pred)))
    assert run(["evaluate", model, tmp_path / "cu.extxyz", "--plot", tmp_path / "p.png"], capsys)[0] == 0
    assert drawn == [1]  # the parity plot leaves it out too
    ase.io.write(tmp_path / "cu_only.extxyz", [emt_labelled(cu, "lo")])
    fails(["evaluate", model, tmp_path / "cu_only.extxyz"], capsys, "cu_only.extxyz: element Cu was not seen")


def test_evaluate_parity_plot_and_learning_curve(write_config, tmp_path, capsys, caplog, tiny_extxyz):
    run_dir = tmp_path / "run"
    assert run(["train", write_config()], capsys)[0] == 0
    png = b"\x89PNG"
    code, out, _ = run(["evaluate", run_dir / "model.pt", tiny_extxyz, "--plot", tmp_path / "parity.png"], capsys)
    assert code == 0 and (tmp_path / "parity.png").read_bytes()[:4] == png
    assert run(["plot", run_dir], capsys)[0] == 0 and (run_dir / "learning_curve.png").read_bytes()[:4] == png
    fails(["plot", tmp_path], capsys, "no metrics.csv")
    fails(["plot", run_dir, "--out", tmp_path / "curve.txt"], capsys, "curve.txt: cannot write a .txt image")
    fails(["evaluate", run_dir / "model.pt", tiny_extxyz, "--plot", tmp_path / "p.txt"], capsys, "cannot write a .txt")
    assert not (tmp_path / "curve.txt").exists() and not (tmp_path / "p.txt").exists()
    code, _, _ = run(["plot", run_dir, "--out", tmp_path / "curve.pdf"], capsys)
    assert code == 0 and (tmp_path / "curve.pdf").read_bytes()[:4] == b"%PDF"
    fails(["plot", run_dir, "--out", tmp_path / "parity.png"], capsys, "parity.png: exists; not replaced (--force")
    assert run(["plot", run_dir, "--out", tmp_path / "parity.png", "--force"], capsys)[0] == 0
    assert run(["plot", run_dir], capsys)[0] == 0  # the run's own learning_curve.png is redrawn
    fails(["plot", run_dir, "--metric", "stress_mae_GPa"], capsys, "no validation stress_mae_GPa (its validation")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["n_train"]["xx"] = 5  # a trained fidelity without a validation curve is named, not dropped silently
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert run(["plot", run_dir], capsys)[0] == 0
    assert "no validation energy_mae_meV curve for xx" in caplog.text


def test_outputs_follow_the_umask_and_the_run_directory_is_announced(write_config, tmp_path, capsys, caplog):
    old = os.umask(0o002)
    try:
        with caplog.at_level("INFO", logger="multifi"):
            assert run(["train", write_config()], capsys)[0] == 0
    finally:
        os.umask(old)
    run_dir = tmp_path / "run"
    assert f"run directory: {run_dir.resolve()}" in caplog.text
    for p in [run_dir, *run_dir.rglob("*")]:
        want = 0o775 if p.is_dir() else 0o664
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_label_table_points_to_the_qm9_form(tmp_path, capsys):
    table = tmp_path / "GFN2.csv.gz"
    table.write_bytes(b"")
    fails(["data", "info", table], capsys, str(table), f"qm9:{table}", "qm9: {labels:")
    fails(["evaluate", "missing.pt", table], capsys, "missing.pt: no such checkpoint")


def test_messages_speak_cli_words(tmp_path, capsys):
    a = rattled_molecule("H2O", 0)
    a.calc = SinglePointCalculator(a, energy=float("nan"))
    path = tmp_path / "nan.extxyz"
    ase.io.write(path, [a], format="extxyz")
    line = fails(["data", "info", path, "--fidelity", "lo"], capsys, "non-finite")
    assert "--set data.skip_invalid=true" in line and "--skip-invalid" in line and "=True" not in line


def test_hartree_crystals_warned(caplog):
    from ase.build import bulk

    from multifi.data.checks import check_energy_units
    from multifi.data.dataset import FidelityDataset

    recs = []
    for i in range(24):
        a = bulk("Si", "diamond", a=5.43) * (1, 1, 1 + i % 2)
        a.rattle(0.02, seed=i)
        e = len(a) * (-0.198 + 0.001 * i)  # Hartree per atom (Si with a pseudopotential: about -5.4 eV)
        recs.append(
            {
                "numbers": a.numbers,
                "positions": a.positions,
                "cell": a.cell.array,
                "pbc": a.pbc,
                "labels": {"PBE": {"energy": e}},
            }
        )
    ds = FidelityDataset.from_records(recs, source="si.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), int)], 1)
    ref, scale = np.zeros((119, 1)), np.ones(1)
    with caplog.at_level("WARNING", logger="multifi"):
        assert check_energy_units(ds, pairs, ref, scale) == ["PBE"]
    assert "crystals' median |energy| per atom 0.18" in caplog.text
    ds.energy *= 27.211386
    assert check_energy_units(ds, pairs, ref, scale) == []


@pytest.mark.parametrize(
    "unit, flagged",
    [(1.0, False), (23.0605, True), (96.485, True), (1000.0, True), ("all-electron", False), ("absolute", False)],
)
def test_crystal_energies_in_kcal_kj_or_mev_are_warned(unit, flagged, caplog):
    """Without hydrogen the hydrogen-reference check cannot see kcal/mol or meV: large element references with a
    spread of per-atom energies no eV data has can (VASP-style eV: references 1-16; all-electron ~0.6 Z^(7/3)
    Hartree and absolute pseudopotential energies as Quantum ESPRESSO gives are large too, but spread as eV)."""
    from ase.build import bulk

    from multifi.data.checks import check_energy_units
    from multifi.data.dataset import FidelityDataset
    from multifi.data.stats import fit_baseline

    per_atom = {"Si": -5.42, "C": -9.22, "Ge": -4.5}  # eV, PBE with pseudopotentials
    if unit == "all-electron":
        per_atom = {"Si": -7880.0, "C": -1030.0, "Ge": -57600.0}
    if unit == "absolute":  # Quantum ESPRESSO-style total energies per atom
        per_atom = {"Si": -108.0, "C": -155.0, "Ge": -2900.0}
    rng = np.random.default_rng(0)
    recs = []
    for i in range(30):
        a = bulk(["Si", "C", "Ge"][i % 3], "diamond", a=[5.43, 3.57, 5.66][i % 3]) * (1, 1, 1 + i % 2)
        a.rattle(0.02, seed=i)
        e = sum(per_atom[s] for s in a.get_chemical_symbols()) + len(a) * rng.normal(0, 0.15)
        recs.append(
            {
                "numbers": a.numbers,
                "positions": a.positions,
                "cell": a.cell.array,
                "pbc": a.pbc,
                "labels": {"PBE": {"energy": e * (unit if isinstance(unit, float) else 1.0)}},
            }
        )
    ds = FidelityDataset.from_records(recs, source="c.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), int)], 1)
    ref, scale = fit_baseline(ds, pairs)
    with caplog.at_level("WARNING", logger="multifi"):
        assert check_energy_units(ds, pairs, ref, scale) == (["PBE"] if flagged else [])
    assert ("look like kcal/mol, kJ/mol or meV" in caplog.text) == flagged


def test_evaluate_takes_the_qm9_source_form(model, tmp_path, capsys, monkeypatch, small_csv):
    """`evaluate MODEL qm9:LABELS.csv --fidelity lo`, as `data info` and a config's data.sources."""
    from multifi.data.readers import qm9

    monkeypatch.setattr(qm9, "qm9_csv_paths", lambda: [small_csv])
    monkeypatch.setattr(qm9, "_MEMO", {})
    monkeypatch.setenv("MULTIFI_CACHE", str(tmp_path / "cache"))
    labels = tmp_path / "lo.csv"
    labels.write_text("index,energy_eV\n1,-20.0\n2,-15.0\n3,-12.0\n")  # CH4, NH3, H2O
    out = tmp_path / "m.json"
    assert run(["evaluate", model, f"qm9:{labels}", "--fidelity", "lo", "--out", out], capsys)[0] == 0
    assert json.loads(out.read_text())["fidelities"]["lo"]["n"] == 3
    # predict, calibrate and extend take it too (they said "qm9:…: no such file")
    pred = tmp_path / "p.extxyz"
    code, _, stderr = run(["predict", model, f"qm9:{labels}", "--fidelity", "lo", "--out", pred], capsys)
    assert code == 0, stderr
    got = ase.io.read(pred, ":")
    assert [a.info["key"] for a in got] == ["qm9:1", "qm9:2", "qm9:3"] and got[2].info["ref_energy"] == -12.0
    # the table names no fidelity: its labels stay references of none, not of the fidelity predicted at
    assert not any("ref_fidelity" in a.info for a in got)
    # a table its manifest names, with an error of its own: that error (not a conflict with a placeholder name)
    named = tmp_path / "named"
    named.mkdir()
    (named / "t.csv").write_text("index,energy_eV\n1,-20.0\n99999999,-12.0\n")
    (named / "manifest.json").write_text(json.dumps({"files": [{"file": "t.csv", "fidelity": "lo"}]}))
    argv = ["predict", model, f"qm9:{named / 't.csv'}", "--fidelity", "lo", "--out", tmp_path / "n.extxyz"]
    fails(argv, capsys, "index 99999999")
    (named / "manifest.json").write_text("{")  # a damaged manifest: said, not taken for none
    fails(argv, capsys, "malformed manifest")
    held_out = tmp_path / "held.csv"
    held_out.write_text("index,energy_eV\n4,-13.0\n5,-14.0\n")
    # labels the model's energies come near (calibrate refuses labels it misses by > 1 eV/atom)
    assert (
        run(["predict", model, f"qm9:{held_out}", "--fidelity", "lo", "--out", tmp_path / "h.extxyz"], capsys)[0] == 0
    )
    near = [a.get_potential_energy() + 0.05 for a in ase.io.read(tmp_path / "h.extxyz", ":")]
    held_out.write_text(f"index,energy_eV\n4,{near[0]}\n5,{near[1]}\n")
    argv = ["calibrate", model, "--train", f"qm9:{labels}", "--val", f"qm9:{held_out}", "--fidelity", "lo"]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    argv = ["extend", model, "--data", f"qm9:{labels}", "--fidelity", "new", "--out", tmp_path / "ext", "--dry-run"]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr


def test_verbose_without_third_party_debug_logs(tmp_path, capsys, monkeypatch):
    import logging

    path = tmp_path / "a.extxyz"
    ase.io.write(path, [emt_labelled(rattled_molecule("CH4", 0), "lo")])
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh process: main configures logging
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    monkeypatch.setattr(logging.getLogger("multifi"), "level", logging.NOTSET)
    assert run(["-v", "data", "info", path], capsys)[0] == 0
    assert logging.getLogger("multifi").getEffectiveLevel() == logging.DEBUG
    for name in ("matplotlib", "PIL", "fsspec", "torch", "urllib3"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name


def test_monitoring_a_fidelity_without_validation_structures_names_the_config(write_config, tmp_path, capsys):
    """train.monitor on a split without validation structures: one line naming the config file and the key."""
    config = write_config(train={"epochs": 1, "monitor": "hi"}, data={"split": {"val": 0.0, "test": 0.2, "seed": 0}})
    fails(
        ["train", config, "--dry-run"], capsys, f"{config}: train.monitor: fidelity 'hi' has no validation structures"
    )
    assert not (tmp_path / "run").exists()


def test_evaluate_warns_of_forces_in_mev_per_angstrom(model, tmp_path, capsys, caplog):
    """evaluate runs the force unit check training runs: forces of thousands of eV/Å are named as meV/Å numbers,
    not reported as an error of 10⁶ meV/Å without a word."""
    frames = []
    for i in range(6):
        a = rattled_molecule("CH4", i)
        a.calc = SinglePointCalculator(a, energy=-10.0, forces=np.full((len(a), 3), 800.0))
        a.info["fidelity"] = "lo"
        frames.append(a)
    ase.io.write(tmp_path / "mev.extxyz", frames)
    with caplog.at_level("WARNING", logger="multifi"):
        assert run(["evaluate", model, tmp_path / "mev.extxyz"], capsys)[0] == 0
    assert "mev.extxyz: forces at fidelity 'lo' look like numbers in another unit read as eV/Å" in caplog.text


@pytest.mark.parametrize("factor, flagged", [(1.0, False), (1000.0, True)])
def test_mev_energies_whose_references_look_all_electron_are_warned(factor, flagged, caplog):
    """Al, Si and P in meV lie within 0.57-0.69 of their all-electron energies, so such data was taken for
    all-electron eV and its spread (378 'eV' per atom) never checked; all-electron eV data spreads as eV does."""
    from ase.build import bulk

    from multifi.data.checks import check_energy_units
    from multifi.data.dataset import FidelityDataset
    from multifi.data.stats import fit_baseline

    per_atom = {"Al": -3.75, "Si": -5.42, "P": -5.41, "C": -9.22}  # eV, PBE with pseudopotentials
    crystals = [bulk("Al", "fcc", a=4.05), bulk("Si", "diamond", a=5.43), bulk("P", "sc", a=2.3), bulk("C", a=3.57)]
    rng = np.random.default_rng(0)
    recs = []
    for i in range(32):
        a = crystals[i % 4] * (1, 1, 1 + i % 3)
        a.rattle(0.02, seed=i)
        e = sum(per_atom[s] for s in a.get_chemical_symbols()) + len(a) * rng.normal(0, 0.15)
        recs.append(
            {"numbers": a.numbers, "positions": a.positions, "cell": a.cell.array, "pbc": a.pbc,
             "labels": {"PBE": {"energy": e * factor}}}
        )  # fmt: skip
    ds = FidelityDataset.from_records(recs, source="mev.extxyz")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), int)], 1)
    ref, scale = fit_baseline(ds, pairs)
    with caplog.at_level("WARNING", logger="multifi"):
        assert check_energy_units(ds, pairs, ref, scale) == (["PBE"] if flagged else [])
    assert ("look like kcal/mol, kJ/mol or meV" in caplog.text) == flagged


def test_verbose_after_the_command_and_leftover_arguments_name_the_command(tmp_path, capsys):
    """`multifi train c.yaml -v` was a usage error (only `multifi -v train` worked); arguments left over after a
    command's options were reported as the top-level parser's, pointing to `multifi --help`."""
    from multifi.cli.main import main
    from multifi.errors import MultifiError

    with pytest.raises(MultifiError, match="no such"):  # -v: the error is raised (traceback), not printed
        main(["data", "info", str(tmp_path / "missing.extxyz"), "-v"])
    assert main(["data", "info", str(tmp_path / "missing.extxyz")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path), "a.extxyz", "--fidelity", "R2SCAN", "PBE", "--out", "p.extxyz"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "multifi predict: unrecognized arguments: PBE (see multifi predict --help)" in err
    with pytest.raises(SystemExit):
        main(["data", "info", "x.extxyz", "--bogus"])
    assert (
        "multifi data info: unrecognized arguments: --bogus (see multifi data info --help)" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["inspect"])  # the top-level parser's own error: 'multifi' once (was 'multifi: error: multifi: …')
    assert capsys.readouterr().err.startswith("multifi: error: argument command: invalid choice: 'inspect'")


def test_evaluate_names_its_own_option_for_nan_labels(model, tmp_path, capsys, caplog):
    """A NaN energy label: evaluate's error names the option evaluate has (--skip-invalid), which leaves that label
    out of the errors and says so; the other structures' errors are those of the clean file."""
    good = [emt_labelled(rattled_molecule("H2O", seed), "lo") for seed in range(3)]
    broken = emt_labelled(rattled_molecule("H2O", 9), "lo")
    broken.calc.results["energy"] = float("nan")
    src, clean = tmp_path / "nan.extxyz", tmp_path / "clean.extxyz"
    ase.io.write(src, [*good, broken])
    ase.io.write(clean, good)
    fails(["evaluate", model, src], capsys, str(src), "--skip-invalid for multifi data and multifi evaluate")
    with caplog.at_level(logging.WARNING, logger="multifi"):
        code, out, _ = run(["evaluate", model, src, "--skip-invalid", "--out", tmp_path / "a.json"], capsys)
    assert code == 0 and "skipped 1 non-finite" in caplog.text
    assert run(["evaluate", model, clean, "--out", tmp_path / "b.json"], capsys)[0] == 0
    a, b = (json.loads((tmp_path / f).read_text())["fidelities"]["lo"] for f in ("a.json", "b.json"))
    assert a["energy_mae_meV_per_atom"] == pytest.approx(b["energy_mae_meV_per_atom"], rel=1e-6)


def test_a_structure_without_atoms_is_an_error_at_prediction(model, tmp_path, capsys):
    """As in training: no energy 0.0 for an empty structure, from predict or the calculator."""
    import multifi

    src = tmp_path / "with_empty.extxyz"
    ase.io.write(src, [rattled_molecule("H2O", 0), Atoms()])
    out = tmp_path / "pred.extxyz"
    fails(["predict", model, src, "--fidelity", "lo", "--out", out], capsys, str(src), "structure 1: no atoms")
    assert not out.exists()
    empty = Atoms()
    empty.calc = multifi.Calculator(model, fidelity="lo")
    with pytest.raises(MultifiError, match="no atoms"):
        empty.get_potential_energy()


@pytest.mark.parametrize(("values", "at_least"), [((164.0, 130.0, 105.0, 92.0), 3), ((900.0, 120.0, 30.0), 2)])
def test_learning_curve_axis_has_readable_ticks(values, at_least, tmp_path, monkeypatch):
    """A validation curve spanning less than 3× (164 → 92 meV) gets a linear axis with several labelled ticks, not a
    log axis labelled only at 90 and 100; one spanning decades stays logarithmic."""
    import multifi.plots as plots

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = ["step,val/PBE/energy_mae_meV"] + [f"{100 * (i + 1)},{v}" for i, v in enumerate(values)]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    seen = {}

    def keep(fig, path):
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        labels = [t for t in ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels() if t.get_text()]
        seen["scale"] = ax.get_yscale()
        seen["labelled"] = [t for t in labels if lo <= t.get_position()[1] <= hi]
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.learning_curve_plot(run_dir, tmp_path / "curve.png")
    assert seen["scale"] == ("linear" if max(values) < 3 * min(values) else "log")
    assert len(seen["labelled"]) >= at_least


def test_learning_curve_marks_the_step_the_run_kept(tmp_path, monkeypatch):
    from multifi import plots

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = ["step,val/PBE/energy_mae_meV"] + [f"{100 * (i + 1)},{v}" for i, v in enumerate([9.0, 5.0, 6.0])]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.update(lines=fig.axes[0].get_lines()) or path)
    plots.learning_curve_plot(run_dir, tmp_path / "curve.png")
    assert [line.get_label() for line in seen["lines"]] == ["PBE"]  # unfinished: no best step yet
    (run_dir / "metrics.json").write_text(json.dumps({"best_step": 200}))
    plots.learning_curve_plot(run_dir, tmp_path / "curve.png")
    best = [line for line in seen["lines"] if line.get_label() == "best (step 200)"]
    assert len(best) == 1 and list(best[0].get_xdata()) == [200, 200]


def test_predict_names_the_frame_of_a_truncated_file(model, tmp_path, capsys):
    """predict reads structure files as training does: a truncated file is one line naming the frame."""
    src = tmp_path / "trunc.extxyz"
    ase.io.write(src, [rattled_molecule("H2O", s) for s in range(3)])
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[:-2]) + "\n")  # the last frame lacks two atoms
    fails(["predict", model, src, "--fidelity", "lo", "--out", tmp_path / "p.extxyz"], capsys, str(src), "frame 2")


def test_evaluate_reports_the_force_slope_and_warns_of_reversed_labels(model, tiny_extxyz, tmp_path, capsys, caplog):
    """metrics.json holds the least-squares slope of the force labels on the predictions and their cosine; negated
    labels (gradients given as forces) give exactly their negatives, and a cosine below −0.8 is said (in any unit);
    models whose forces do not follow the labels yet (cosine −0.3 or −0.7, slopes −90 or −267) are not suspected."""
    from multifi.evaluation import warn_implausible_errors
    from multifi.keys import FORCES_COSINE, FORCES_SLOPE

    frames = ase.io.read(tiny_extxyz, ":")
    flipped = []
    for a in frames:
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(), forces=-a.get_forces())
        b.info["fidelity"] = a.info["fidelity"]
        flipped.append(b)
    src = tmp_path / "flipped.extxyz"
    ase.io.write(src, flipped)
    slopes, cosines = [], []
    for name, path in (("same", tiny_extxyz), ("flipped", src)):
        assert run(["evaluate", model, path, "--out", tmp_path / f"{name}.json"], capsys)[0] == 0
        lo = json.loads((tmp_path / f"{name}.json").read_text())["fidelities"]["lo"]
        slopes.append(lo[FORCES_SLOPE])
        cosines.append(lo[FORCES_COSINE])
    assert slopes[1] == pytest.approx(-slopes[0], rel=1e-9) and cosines[1] == pytest.approx(-cosines[0], rel=1e-9)
    assert -1 <= cosines[1] < 0 < cosines[0] <= 1
    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_implausible_errors({"lo": {FORCES_SLOPE: -0.95, FORCES_COSINE: -0.9}}, "f.extxyz")
        warn_implausible_errors({"lo": {FORCES_SLOPE: 0.9, FORCES_COSINE: 0.9}}, "g.extxyz")
        warn_implausible_errors({"lo": {FORCES_SLOPE: -90.9, FORCES_COSINE: -0.3}}, "h.extxyz")
        warn_implausible_errors(
            {"lo": {FORCES_SLOPE: -267.3, FORCES_COSINE: -0.71}}, "i.extxyz"
        )  # untrained models' mean
        warn_implausible_errors({"lo": {FORCES_SLOPE: -0.019, FORCES_COSINE: -1.0}}, "j.extxyz")  # gradients in Ha/Bohr
        # a small model's moderate cosine where the slope is −1 or −(a unit's factor) within 3 %: gradients of a small model
        warn_implausible_errors({"lo": {FORCES_SLOPE: -0.98, FORCES_COSINE: -0.73}}, "o.extxyz")
        warn_implausible_errors({"lo": {FORCES_SLOPE: -0.0192, FORCES_COSINE: -0.6}}, "p.extxyz")
        warn_implausible_errors({"lo": {FORCES_SLOPE: -0.9, FORCES_COSINE: -0.73}}, "q.extxyz")  # 10 % off: no
        warn_implausible_errors({"lo": {FORCES_SLOPE: -1.0, FORCES_COSINE: -0.45}}, "r.extxyz")  # cosine too weak
    for name in ("f", "j", "o", "p"):
        assert f"{name}.extxyz: lo force labels point against the model's forces" in caplog.text
    assert "(−dE/dx)? In Hartree/Bohr, too (negate and convert them: multiply by 51.4221)" in caplog.text  # j, p
    assert not any(f"{name}.extxyz" in caplog.text for name in ("g", "h", "i", "q", "r"))
    caplog.clear()  # labels a unit's factor times the model's forces, aligned with them: the unit is named
    with caplog.at_level(logging.WARNING, logger="multifi"):
        warn_implausible_errors({"lo": {FORCES_SLOPE: 0.0195, FORCES_COSINE: 1.0}}, "k.extxyz")  # Ha/Bohr
        warn_implausible_errors({"lo": {FORCES_SLOPE: 23.2, FORCES_COSINE: 0.97}}, "l.extxyz")  # kcal/mol/Å
        warn_implausible_errors({"lo": {FORCES_SLOPE: 0.0195, FORCES_COSINE: 0.5}}, "m.extxyz")  # not aligned
        warn_implausible_errors({"lo": {FORCES_SLOPE: 1.1, FORCES_COSINE: 0.99}}, "n.extxyz")  # eV/Å
        warn_implausible_errors({"lo": {FORCES_SLOPE: 0.01914, FORCES_COSINE: 0.73}}, "s.extxyz")  # within 3 %
        warn_implausible_errors({"lo": {FORCES_SLOPE: 0.0185, FORCES_COSINE: 0.73}}, "t.extxyz")  # 5 % off: no
    assert (
        "k.extxyz: lo force labels are 0.0195 × the model's forces (cosine 1.00): forces in Hartree/Bohr read as "
        "eV/Å? (convert them to eV/Å: multiply by 51.4221)" in caplog.text
    )
    assert "l.extxyz: lo force labels are 23.2 × the model's forces (cosine 0.97): forces in kcal/mol/Å" in caplog.text
    assert (
        "s.extxyz: lo force labels are 0.01914 × the model's forces (cosine 0.73): forces in Hartree/Bohr"
        in caplog.text
    )
    assert not any(f"{name}.extxyz" in caplog.text for name in ("m", "n", "t"))


def test_evaluate_names_the_unit_of_energies_given_in_kj_per_mol(cli_run, tiny_extxyz, tmp_path, capsys, caplog):  # noqa: F811
    """Energies in kJ/mol read as eV: evaluate said only that the error was implausible. Labels that are 96.485×
    what the model predicts (a model that learned these structures, its predictions as the labels) get the unit
    named; the same labels in eV get no warning at all."""
    model = cli_run[1] / "model.pt"
    frames = []
    for fidelity in ("lo", "hi"):  # the model's own energies at each fidelity, as labels
        pred = tmp_path / f"{fidelity}.extxyz"
        assert run(["predict", model, tiny_extxyz, "--fidelity", fidelity, "--out", pred], capsys)[0] == 0
        for a in ase.io.read(pred, ":"):
            a.info = {"fidelity": fidelity}
            frames.append(a)
    exact, scaled = tmp_path / "ev.extxyz", tmp_path / "kjmol.extxyz"
    ase.io.write(exact, frames)
    for a in frames:
        a.calc = SinglePointCalculator(a, energy=96.485 * a.get_potential_energy(), forces=a.get_forces())
    ase.io.write(scaled, frames)
    with caplog.at_level(logging.WARNING, logger="multifi"):
        assert run(["evaluate", model, exact], capsys)[0] == 0
        assert "meV/atom" not in caplog.text and "read as eV" not in caplog.text
        assert run(["evaluate", model, scaled], capsys)[0] == 0
    said = [r.getMessage() for r in caplog.records if "read as eV" in r.getMessage()]
    assert len(said) == 2, caplog.text
    assert all("energies in kJ/mol read as eV? (convert them to eV: divide by 96.485)" in m for m in said)
    assert said[0].startswith(f"{scaled}: ")
    assert "one energy per element" not in caplog.text  # the unit, not the labels' convention


def test_parity_plot_keeps_estimated_references_out_of_the_panel_mae(tmp_path, monkeypatch):
    """Structures with estimated references entered the panel's MAE (800 meV/atom beside 64 in the table):
    drawn apart, their MAE beside the fitted ones'."""
    import multifi.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    names = np.array(["EMT", "EMT", "EMT", "B"], dtype=object)
    ref, pred = np.array([1.0, 2.0, 3.0, 0.0]), np.array([1.01, 2.01, 3.8, 0.002])
    plots.parity_plot(tmp_path / "p.png", names, ref, pred, "t", np.array([False, False, True, False]))
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_visible()]
    assert titles[0] == "EMT  (n = 2, MAE 10.0 meV/atom)\nestimated references: n = 1, MAE 800.0 meV/atom"
    assert titles[1] == "B  (n = 1, MAE 2.0 meV/atom)"


def test_errors_about_frames_of_an_index_say_which_frames_they_count(model, tmp_path, capsys):
    """A bad frame 5 read with --index 3: was 'structure 2' (of the selection, unsaid) in predict and the file's
    frame numbers elsewhere: predict names the selection (the readers name the file's frame: frame_tag's test)."""
    frames = [rattled_molecule("H2O", seed=i) for i in range(8)]
    frames[5] = Atoms("H2O", positions=[[0, 0, 0], [0.02, 0, 0], [0, 0.9, 0]])  # atoms 0.02 Å apart
    for a in frames:
        a.info["fidelity"] = "lo"
    src = tmp_path / "bad5.extxyz"
    ase.io.write(src, frames)
    fails(
        ["predict", model, src, "--index", "3:", "--fidelity", "lo", "--out", tmp_path / "p.xyz"],
        capsys,
        f"{src} (frames '3:'): structure 2",
    )
