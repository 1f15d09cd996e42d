"""Shared fixtures: small molecules, a periodic cell, a tiny two-fidelity extxyz and a tiny run config."""

from __future__ import annotations

import itertools
import os
import threading

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402

torch.set_num_threads(1)

MOLECULES = ("H2O", "NH3", "CH4", "CH3OH", "C2H4", "HCN", "CO2", "H2CO", "C2H2", "C2H6")
#: a model small enough for tests (features 16, one interaction)
TINY_MODEL = {
    "backbone": "painn",
    "features": 16,
    "interactions": 1,
    "cutoff": 4.0,
    "n_rbf": 8,
    "fidelity_embedding": {"dim": 4, "inject": "both"},
}
#: fidelities of the tiny extxyz: "lo" on all 40 molecules, "hi" on every second one
TINY_FIDELITIES = ("lo", "hi")


def rattled_molecule(name: str, seed: int, stdev: float = 0.05) -> Atoms:
    atoms = molecule(name)
    atoms.rattle(stdev, seed=seed)
    return atoms


def periodic_cell(seed: int = 0) -> Atoms:
    """A rattled, sheared 4-atom rock-salt cell (non-orthogonal lattice, two elements)."""
    atoms = bulk("NaCl", "rocksalt", a=4.6) * (1, 1, 2)
    cell = atoms.cell.array @ (np.eye(3) + np.array([[0.02, 0.03, 0.0], [0.0, -0.01, 0.04], [0.01, 0.0, 0.03]]))
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.08, seed=seed)
    return atoms


def emt_labelled(atoms: Atoms, fidelity: str, scale: float = 1.0, per_atom: float = 0.0) -> Atoms:
    """A copy with EMT energy×scale + per_atom·N and forces×scale as a SinglePointCalculator."""
    a = atoms.copy()
    a.calc = EMT()
    e, f = a.get_potential_energy(), a.get_forces()
    a.calc = SinglePointCalculator(a, energy=scale * e + per_atom * len(a), forces=scale * f)
    a.info["fidelity"] = fidelity
    return a


def tiny_frames(n: int = 40) -> list[Atoms]:
    """n rattled molecules at fidelity 'lo' (EMT) and every second one also at 'hi' (1.1·EMT + 0.3 eV/atom)."""
    frames = []
    for i in range(n):
        a = rattled_molecule(MOLECULES[i % len(MOLECULES)], seed=i)
        frames.append(emt_labelled(a, "lo"))
        if i % 2 == 0:
            frames.append(emt_labelled(a, "hi", scale=1.1, per_atom=0.3))
    return frames


@pytest.fixture
def molecules() -> list[Atoms]:
    return [rattled_molecule(n, seed=i) for i, n in enumerate(("H2O", "CH3OH", "NH3"))]


@pytest.fixture
def periodic() -> Atoms:
    return periodic_cell()


@pytest.fixture(scope="session")
def tiny_extxyz(tmp_path_factory):
    """Path of an extxyz written by ASE: 40 molecules, 60 frames, two fidelities in one file."""
    path = tmp_path_factory.mktemp("data") / "tiny.extxyz"
    ase.io.write(path, tiny_frames(), format="extxyz")
    return path


@pytest.fixture
def write_config(tmp_path, tiny_extxyz):
    """write_config(**sections) → path of a YAML run config on the tiny extxyz with a tiny model."""

    def write(name: str = "config.yaml", **sections):
        raw = {
            "data": {"sources": [{"path": str(tiny_extxyz)}], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
            "model": TINY_MODEL,
            "train": {"epochs": 2, "batch_size": 8, "progress": False, "threads": 1, "warmup_steps": 0},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


#: keys of a fidelity's entry in a run's evaluation metrics (metrics.json, `multifi evaluate --json`)
METRIC_KEYS = {
    "n",
    "energy_mae_meV",
    "energy_rmse_meV",
    "energy_mae_meV_per_atom",
    "energy_rmse_meV_per_atom",
    "forces_mae_meV_per_A",
    "forces_rmse_meV_per_A",
    "stress_mae_GPa",
    "forces_label_slope",  # present where there are force labels (all data of these tests)
    "forces_label_cosine",
    "n_forces",  # structures with force labels (all of these tests')
}
N_SMALL = 199  # molecules in the small QM9 CSV (fixture small_csv)


# ---------------------------------------------------------------------------------------------- structures
def si64(shear=None, rattle: float = 0.0, seed: int = 1) -> Atoms:
    """64-atom diamond Si (2×2×2 cubic cells); `shear` [3, 3]: cell @ (1 + shear), atoms scaled; then rattled."""
    atoms = bulk("Si", "diamond", 5.43, cubic=True) * (2, 2, 2)
    if shear is not None:
        atoms.set_cell(atoms.cell @ (np.eye(3) + np.asarray(shear)), scale_atoms=True)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


# ---------------------------------------------------------------------------------------------- models
def tiny_m3gnet(
    seed: int = 0,
    cutoff: float = 4.5,
    threebody_cutoff: float = 3.5,
    inject: str = "both",
    scale: tuple[float, float] = (0.1, 0.3),
):
    """A tiny random-weight two-fidelity (PBE, R2SCAN) M3GNet with distinct Si references per fidelity."""
    from multifi.models.registry import build_potential

    torch.manual_seed(seed)
    model = {
        "backbone": "m3gnet",
        "features": 16,
        "interactions": 2,
        "cutoff": cutoff,
        "threebody_cutoff": threebody_cutoff,
        "max_n": 3,
        "max_l": 3,
        "n_rbf": 9,
        "fidelity_embedding": {"dim": 4, "inject": inject},
    }
    pot = build_potential(model, ["PBE", "R2SCAN"])
    ref = np.zeros((119, 2))
    ref[14] = [-5.4, -6.1]
    pot.head.set_baseline(ref, np.array(scale))
    return pot


def tiny_painn_lo_hi():
    """A tiny random-weight two-fidelity (lo, hi) PaiNN with distinct H, C, O references per fidelity."""
    from multifi.models.registry import build_potential

    torch.manual_seed(0)
    model = {
        "backbone": "painn",
        "features": 16,
        "interactions": 2,
        "cutoff": 4.0,
        "n_rbf": 8,
        "fidelity_embedding": {"dim": 4, "inject": "both"},
    }
    pot = build_potential(model, ["lo", "hi"])
    ref = np.zeros((119, 2))
    ref[[1, 6, 8]] = [[-13.0, -13.6], [-1020.0, -1030.0], [-2040.0, -2050.0]]
    pot.head.set_baseline(ref, np.array([0.5, 0.7]))
    return pot


# ---------------------------------------------------------------------------------------------- files
def fifo_and_target(tmp_path, via_symlink: bool):
    """(FIFO tmp_path/pipe, the path to write to: the FIFO itself, or a symlink tmp_path/link to it)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    if not via_symlink:
        return fifo, fifo
    link = tmp_path / "link"
    link.symlink_to(fifo)
    return fifo, link


def drain_fifo(path, into: list) -> threading.Thread:
    """Read a FIFO in a thread (opening it for writing blocks until a reader is there)."""

    def read():
        with open(path, "rb") as f:
            into.append(f.read())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------------------------------- QM9
@pytest.fixture(scope="session")
def small_csv(tmp_path_factory):
    """Header + first N_SMALL molecules of qm9pack's qm9_part1.csv (skipped without the QM9 files)."""
    from multifi.data.readers import qm9
    from multifi.errors import MultifiError

    try:
        part1 = qm9.qm9_csv_paths()[0]
    except MultifiError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("qm9") / "qm9_part1.csv"
    with open(part1, encoding="utf-8") as f:
        out.write_text("".join(itertools.islice(f, N_SMALL + 1)), encoding="utf-8")
    return out


@pytest.fixture
def small_qm9(monkeypatch, small_csv, tmp_path):
    """multifi's QM9 reader reduced to the small CSV, with a fresh cache directory in tmp_path."""
    from multifi.data.readers import qm9

    monkeypatch.setattr(qm9, "qm9_csv_paths", lambda: [small_csv])
    monkeypatch.setattr(qm9, "_MEMO", {})
    monkeypatch.setenv("MULTIFI_CACHE", str(tmp_path / "cache"))
    return qm9


# ---------------------------------------------------------------------------------------------- experiments
def fake_train(calls: list, validation: bool = True):
    """multifi.train.run.train without Lightning: the data, an untrained model (initialised from init_from when
    asked) with reference energies fitted as the trainer fits them, model.pt and metrics.json (test errors as
    the real trainer evaluates them; with `validation` also validation errors and step counts). Records
    (run dir, resume) in `calls`; a run starts in an empty directory unless it resumes."""
    import json
    from pathlib import Path

    from multifi.data.stats import fit_baseline
    from multifi.models.registry import build_potential, save_potential
    from multifi.train.evaluate import evaluate_pairs
    from multifi.train.init import init_from_potential
    from multifi.train.prepare import prepare_data

    def train(cfg, resume=False, config_source=""):
        run_dir = Path(cfg.output_dir)
        calls.append((run_dir, resume))
        assert resume or not run_dir.exists() or not any(run_dir.iterdir())
        run_dir.mkdir(parents=True, exist_ok=True)
        prep = prepare_data(cfg)
        potential = build_potential(cfg.model.model_dump(), list(prep.dataset.fidelities.names))
        if cfg.train.init_from:
            init_from_potential(potential, cfg.train.init_from, cfg.train.init_fidelities)
        pooled, shared_scale = potential.head.shared_baseline, cfg.model.energy_scale == "shared"
        potential.head.set_baseline(
            *fit_baseline(prep.dataset, prep.pairs["train"], pooled=pooled, shared_scale=shared_scale)
        )
        save_potential(potential, run_dir / "model.pt")
        metrics = {"fidelities": evaluate_pairs(potential, prep.dataset, None, prep.pairs["test"]), "n_train": {}}
        if validation:
            val = prep.pairs["val"]
            metrics["val_fidelities"] = evaluate_pairs(potential, prep.dataset, None, val) if len(val) else {}
            metrics.update(steps=7, best_step=5, stopped_early=True)  # stopped by its patience (convergence rule)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return run_dir

    return train


@pytest.fixture
def fake(monkeypatch):
    """multifi.train.run.train replaced by fake_train; the list of its calls (run dir, resume)."""
    import multifi.train.run as train_run

    calls: list = []
    monkeypatch.setattr(train_run, "train", fake_train(calls))
    return calls


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """model.pt of an untrained tiny PaiNN with fidelities lo and hi (H, C, N, O reference energies)."""
    from multifi.models.registry import build_potential, save_potential

    torch.manual_seed(0)
    pot = build_potential(TINY_MODEL, ["lo", "hi"])
    ref = np.zeros((119, 2))
    ref[[1, 6, 7, 8], :] = [[-0.5, -0.6], [-3.0, -3.1], [-1.0, -1.2], [-2.0, -2.5]]
    pot.head.set_baseline(ref, np.ones(2))
    return save_potential(pot, tmp_path_factory.mktemp("model") / "model.pt")
