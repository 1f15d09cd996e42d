"""Distributed data-parallel training: 2 CPU processes (gloo) equal 1 process with the same global batch."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from multifi.train.sampler import FidelitySampler, epoch_shares

DEMO = Path(__file__).resolve().parents[1] / "src" / "multifi" / "demo_data" / "joint.yaml"


def test_sampler_ranks_partition_the_global_order():
    fid = np.array([0] * 30 + [1] * 7)
    one = FidelitySampler(fid, seed=3)
    ranks = [FidelitySampler(fid, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(4)
    glob = list(one)
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == 19  # 37 padded to 38
    merged = [x for pair in zip(a, b) for x in pair][:37]
    assert merged == glob
    one.set_epoch(5)
    assert list(one) != glob  # a new order every epoch


def test_evaluation_sampler_scores_every_sample_once_over_the_ranks():
    fid = np.zeros(11, np.int64)
    ranks = [FidelitySampler(fid, shuffle=False, rank=r, world_size=2) for r in range(2)]
    a, b = (list(s) for s in ranks)
    assert sorted(a + b) == list(range(11)) and (len(a), len(b)) == (6, 5)  # no padded copy


def test_sampler_keeps_mixing_ratio_and_resumes():
    fid = np.array([0] * 900 + [1] * 100)
    s = FidelitySampler(fid, seed=0, shares={0: 0.5, 1: 0.5})
    order = np.array(list(s))
    assert len(order) == 1000 and (fid[order] == 1).sum() == 500
    # each low-share sample is used 5 times, none more often than another
    assert set(np.unique(order[fid[order] == 1], return_counts=True)[1].tolist()) == {5}
    s.resume(0, 300)
    assert list(s) == order[300:].tolist()
    assert list(s) == order.tolist()  # resume applies once


def test_epoch_shares_relative_weights_or_fractions_with_natural_rest():
    """Every fidelity listed: relative weights; some unlisted: fractions, the rest in proportion to labels."""
    names = ["lo", "mid", "hi", "none"]
    counts = np.array([600, 300, 100, 0])
    assert epoch_shares(np.full(4, np.nan), counts, names) is None
    assert epoch_shares(np.array([1.0, 1.0, 2.0, np.nan]), counts, names) == pytest.approx({0: 0.25, 1: 0.25, 2: 0.5})
    # {hi: 0.5}: hi takes half of each epoch, lo and mid share the other half 2:1 as their labels do
    assert epoch_shares(np.array([np.nan, np.nan, 0.5, 7.0]), counts, names) == pytest.approx(
        {0: 1 / 3, 1: 1 / 6, 2: 0.5}
    )
    # {lo: 0}: lo is never drawn, the others keep their label proportion
    assert epoch_shares(np.array([0.0, np.nan, np.nan, np.nan]), counts, names) == pytest.approx({1: 0.75, 2: 0.25})
    with pytest.raises(ValueError, match=r"sum to 1 but lo, mid \(with training labels\) are not listed"):
        epoch_shares(np.array([np.nan, np.nan, 1.0, np.nan]), counts, names)  # {hi: 1} cannot mean 3x oversampling
    with pytest.raises(ValueError, match="sum to 1 but extra"):  # 0.7 + 0.2 + 0.1 = 0.999… in floats
        epoch_shares(np.array([0.7, 0.2, 0.1, np.nan]), np.array([600, 300, 100, 50]), ["lo", "mid", "hi", "extra"])
    with pytest.raises(ValueError, match="every fidelity with training labels has weight 0"):
        epoch_shares(np.array([0.0, 0.0, 0.0, 1.0]), counts, names)


def _run(out: Path, extra: list[str], printed: list | None = None) -> dict:
    sets = [
        "train.epochs=2",
        "data.train_limits.GFN2-xTB=160",
        "data.train_limits.B3LYP/6-31G(2df,p)=32",
        "train.progress=false",
        "model.features=16",
        "model.interactions=1",
        "train.accelerator=cpu",
        "train.ema_decay=0",
        "train.threads=1",
        f"output_dir={out}",
    ]
    cmd = [sys.executable, "-m", "multifi.cli.main", "train", str(DEMO)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + extra, check=True, env=env, timeout=600, capture_output=True, text=True)
    if printed is not None:
        printed.append(proc.stdout + proc.stderr)
    return json.loads((out / "metrics.json").read_text())["fidelities"]


def _validation_rows(out: Path) -> list[dict]:
    import csv

    with open(out / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("val_loss")]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    """3 processes × batch 4 see the same global batches as 1 process × batch 12; with energy-only labels
    and equal local batch sizes, DDP's average of per-rank mean losses is the global mean loss, so the
    two runs agree up to float32 reduction order (tolerance 1e-3 relative on test MAE)."""
    printed = []
    two = _run(tmp_path / "ddp2", ["--devices", "3", "--set", "train.batch_size=4"], printed)
    # the terminal shows one run, not one per rank
    assert printed[0].count("test metrics (") == 1 and printed[0].count("run directory: ") == 1, printed[0]
    one = _run(tmp_path / "ddp1", ["--set", "train.batch_size=12"])
    for name in one:
        assert two[name]["energy_mae_meV"] == pytest.approx(one[name]["energy_mae_meV"], rel=1e-3)
        assert two[name]["n"] == one[name]["n"]
    # the validation errors logged during training (they pick the checkpoint) too: 400 validation samples do not
    # split evenly over 3 ranks, so a padded second copy on a rank would show
    rows2, rows1 = _validation_rows(tmp_path / "ddp2"), _validation_rows(tmp_path / "ddp1")
    assert len(rows2) == len(rows1) > 0
    columns = [c for c in rows1[0] if c.startswith("val") and rows1[0][c]]
    assert "val_loss" in columns and any("energy_mae" in c for c in columns)
    for r2, r1 in zip(rows2, rows1):
        for c in columns:
            assert float(r2[c]) == pytest.approx(float(r1[c]), rel=1e-3), c


@pytest.mark.slow
def test_two_process_ddp_with_force_labels_equals_one_process(write_config, tmp_path):
    """Force labels fall unevenly on the processes' batches (molecules of 3-9 atoms): each process divides its
    force errors by the force-labelled atoms of all processes' batches, so 2 processes × batch 4 train as 1
    process × batch 8: every validation's errors agree (before, each process divided by its own atoms and the
    errors drifted apart, by 1.5e-3 relative after 45 steps here). Test errors are not compared: with force
    labels the validation loss that picks the checkpoint is a mean of per-batch means (batch size dependent)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    train = {"epochs": 15, "lr": 0.003, "progress": False, "threads": 1, "warmup_steps": 0, "ema_decay": 0}
    train["accelerator"] = "cpu"
    for name, devices, batch in (("two", "2", 4), ("one", "1", 8)):
        limits = {"train_limits": {"lo": 16, "hi": 8}}  # 24 samples: every batch full, no padding on a process
        config = write_config(
            f"{name}.yaml", data=limits, train={**train, "batch_size": batch}, output_dir=str(tmp_path / name)
        )
        cmd = [sys.executable, "-m", "multifi.cli.main", "train", str(config), "--devices", devices]
        subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True, text=True)
    rows2, rows1 = _validation_rows(tmp_path / "two"), _validation_rows(tmp_path / "one")
    columns = [c for c in rows1[0] if c.startswith("val/") and "mae" in c and rows1[0][c]]
    assert len(rows2) == len(rows1) == 15 and any("forces" in c for c in columns), columns
    for r2, r1 in zip(rows2, rows1):
        for c in columns:
            assert float(r2[c]) == pytest.approx(float(r1[c]), rel=1e-4), (r1["step"], c)


@pytest.mark.slow
def test_two_processes_where_one_never_sees_a_force_label_finish(write_config, tmp_path):
    """One structure of 24 has force labels: a whole epoch of one process's batches holds none, so that process
    had no train_forces to log while the other had; syncing the epoch means name by name then waited forever."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from conftest import tiny_frames

    frames = [a for a in tiny_frames() if a.info["fidelity"] == "lo"][:30]
    for a in frames[1:]:
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy())  # energy only
    ase.io.write(tmp_path / "one_force.extxyz", frames, format="extxyz")
    train = {"epochs": 3, "batch_size": 4, "progress": False, "threads": 1, "warmup_steps": 0, "accelerator": "cpu"}
    data = {"sources": [{"path": str(tmp_path / "one_force.extxyz")}], "split": {"val": 0.1, "test": 0.1, "seed": 0}}
    config = write_config("c.yaml", data=data, train=train, output_dir=str(tmp_path / "run"))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "multifi.cli.main", "train", str(config), "--devices", "2"]
    proc = subprocess.run(cmd, check=True, env=env, timeout=240, capture_output=True, text=True)
    assert "Grad strides do not match" not in proc.stderr  # torch's layout quirk of a one-output layer, harmless
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r.get("train_loss_epoch")]
    assert len(rows) == 3 and all(r.get("train_forces") not in (None, "") for r in rows)
    assert {float(r["train_samples"]) for r in rows} == {24.0}  # 30 − 3 validation − 3 test, both processes


@pytest.mark.parametrize(
    "env, leader",
    [
        ({}, True),
        ({"RANK": "1", "WORLD_SIZE": "2"}, False),  # torchrun
        ({"RANK": "0", "WORLD_SIZE": "2"}, True),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train"}, False),  # one training over 4 tasks
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train"}, True),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "bash"}, True),  # interactive: own runs
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}, True),
        ({"LOCAL_RANK": "1"}, False),  # started by Lightning's launcher
    ],
)
def test_leader_process_under_torchrun_slurm_and_independent_tasks(monkeypatch, env, leader):
    """Ranks after the first of one distributed training keep quiet; independent SLURM tasks each report."""
    from multifi.logs import is_leader_process

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NAME", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_leader_process() is leader


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_further_rank_ends_when_its_launcher_is_killed(tmp_path):
    """A launcher killed outright (SIGKILL) left rank 1 orphaned in a collective until the 30-minute timeout;
    end_with_parent (called by the CLI in every further rank) makes the kernel end it with its parent."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = (
        "import os, time, pathlib; from multifi.ranks import end_with_parent; "
        f"assert end_with_parent(); pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)"
    )
    launcher = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    os.kill(pid, 0)  # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):  # ended; a container's init may not reap it
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the child outlived its killed parent by 10 s")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for a PID namespace")
def test_a_further_rank_of_a_launcher_that_is_pid_1_lives(tmp_path):
    """In a container without an init the launcher is PID 1: its ranks must not take that parent for a dead one."""
    code = (
        "import subprocess, sys; r = subprocess.run([sys.executable, '-c', 'from multifi.ranks import end_with_parent;"
        " print(end_with_parent())'], capture_output=True, text=True); print(r.returncode, r.stdout.strip())"
    )
    proc = subprocess.run(["unshare", "-Urpf", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"no user/PID namespaces here: {proc.stderr.strip()}")
    assert proc.stdout.split() == ["0", "True"], (proc.stdout, proc.stderr)


@pytest.mark.slow
def test_two_processes_resumed_inside_an_epoch_log_the_epoch_means_of_a_run_that_never_stopped(write_config, tmp_path):
    """Each process restores its own training-loss sums from a checkpoint inside an epoch: every process took
    rank 0's before, and the interrupted epoch's train_loss_epoch differed (0.000587 against 0.000566)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    train = {"epochs": 100, "batch_size": 4, "progress": False, "threads": 1, "warmup_steps": 0}
    train.update(accelerator="cpu", schedule="constant", ema_decay=0)
    runs = {"cut": 8, "straight": 18}  # 6 steps per epoch: the cut falls inside the second epoch
    for name, steps in runs.items():
        cfg = write_config(f"{name}.yaml", train={**train, "max_steps": steps}, output_dir=str(tmp_path / name))
        cmd = [sys.executable, "-m", "multifi.cli.main", "train", str(cfg), "--devices", "2"]
        subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True, text=True)
    cmd = [sys.executable, "-m", "multifi.cli.main", "train", "--resume", str(tmp_path / "cut")]
    subprocess.run([*cmd, "--set", "train.max_steps=18"], check=True, env=env, timeout=600, capture_output=True)

    def means(name):
        rows = csv.DictReader(open(tmp_path / name / "metrics.csv"))
        return [(r["epoch"], float(r["train_loss_epoch"])) for r in rows if r.get("train_loss_epoch")]

    got, want = means("cut"), means("straight")
    assert [e for e, _ in got] == [e for e, _ in want] == ["1", "2", "3", "4"]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)


def _epoch_loss_of_rank(rank: int, port: int, losses: list, out: str) -> None:
    """One process of test_the_log_lines_train_loss_is_every_processs: its _epoch_train_loss."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from multifi.keys import TRAIN_LOSS_EPOCH
    from multifi.train.logger import _epoch_train_loss
    from multifi.train.module import EpochSums

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sums = EpochSums()
        for value, n in losses[rank]:
            sums.add({TRAIN_LOSS_EPOCH: torch.tensor(value)}, n)
        module = SimpleNamespace(epoch_sums=sums, device=torch.device("cpu"))
        loss = _epoch_train_loss(SimpleNamespace(world_size=2), module)
        Path(out, f"rank{rank}").write_text(repr(loss))
    finally:
        dist.destroy_process_group()


def test_the_log_lines_train_loss_is_every_processs(tmp_path):
    """The per-validation log line's training loss with 2 processes: the mean of their means, as metrics.csv's
    train_loss_epoch (it showed process 0's alone)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    losses = [[(1.0, 4), (3.0, 4)], [(10.0, 8)]]  # process means 2.0 and 10.0
    mp.spawn(_epoch_loss_of_rank, args=(port, losses, str(tmp_path)), nprocs=2)
    assert [float((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [6.0, 6.0]
