"""Large data without running out of memory: a 10-million-atom dataset, memory-mapped, trained lazily.

    python bench/large_data.py [--atoms 10_000_000] [--out /tmp/multifi_large] [--steps 30]

1. Builds a dataset of ≥ `--atoms` atoms by replicating the shared solids (PBE + r2SCAN, MatPES
   schema) with random perturbations (rattle σ = 0.03 Å, strain |ε| ≤ 1 %), and saves it as a
   directory of .npy arrays (FidelityDataset.save to a directory path).
2. Starts `multifi train` on it (memory-mapped, neighbour lists built per batch in 2 DataLoader
   workers) for `--steps` optimisation steps, polling the resident memory of the whole process tree.
Reports the time until training starts (metrics.csv appears when the first 10 training steps are
logged, so this is an upper bound), the total time and the peak RSS of main process + workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build(out: Path, atoms: int, shared: Path) -> dict:
    from multifi.config import SourceConfig
    from multifi.data.dataset import FidelityDataset, ranges
    from multifi.data.sources import read_sources

    t0 = time.perf_counter()
    base = read_sources(
        [SourceConfig(path=str(shared / "solids" / f"{n}.jsonl.gz"), stress_order="vasp") for n in ("PBE", "R2SCAN")]
    )
    reps = int(np.ceil(atoms / base.n_atoms.sum()))
    S = len(base)
    rng = np.random.default_rng(0)
    struct = np.tile(np.arange(S), reps)  # [S·reps]
    n_atoms = base.n_atoms[struct]
    offsets = np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)
    atom_src = ranges(base.offsets[struct], n_atoms)  # source atom of every new atom
    strain = np.eye(3) + rng.uniform(-0.01, 0.01, (len(struct), 3, 3))
    strain = 0.5 * (strain + strain.transpose(0, 2, 1))
    owner = np.repeat(np.arange(len(struct)), n_atoms)
    positions = np.einsum("na,nab->nb", base.positions[atom_src], strain[owner]) + rng.normal(
        0, 0.03, (len(atom_src), 3)
    )
    cells = np.einsum("sab,sbc->sac", base.cells[struct], strain)
    keys = np.char.add(np.char.add(np.repeat(np.arange(reps), S).astype(str), ":"), base.keys[struct].astype(str))
    ds = FidelityDataset(
        numbers=base.numbers[atom_src],
        positions=positions,
        offsets=offsets,
        cells=cells,
        pbc=base.pbc[struct],
        keys=keys,
        fidelities=base.fidelities,
        energy=base.energy[struct] + rng.normal(0, 0.01, (len(struct), len(base.fidelities))),
        forces=base.forces[atom_src],
        forces_mask=base.forces_mask[struct],
        stress=base.stress[struct] if base.stress is not None else None,
        stress_mask=base.stress_mask[struct] if base.stress_mask is not None else None,
        source="large",
    )
    ds.save(out)
    return {
        "structures": len(ds),
        "atoms": int(offsets[-1]),
        "replicas": reps,
        "build_s": round(time.perf_counter() - t0, 1),
        "disk_MB": round(sum(f.stat().st_size for f in out.glob("*.npy")) / 2**20),
    }


def tree_memory_mb(pid: int, field: str) -> float:
    """Memory of a process and all its descendants, MB: field "Rss:" (shared pages counted in every
    process) or "Pss:" (shared pages split between the processes sharing them: the honest total)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(field))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
    return total / 1024


def train(data: Path, run: Path, steps: int) -> dict:
    cfg = run.parent / "large.yaml"
    cfg.write_text(
        f"data:\n  sources: [{{path: {data}}}]\n  split: {{val: 0.0005, test: 0.0005, seed: 0}}\n"
        "  neighbor_lists: auto\n"
        "model: {backbone: painn, features: 64, interactions: 2, cutoff: 5.0, fidelity_embedding: {dim: 4, inject: readout}}\n"
        f"train: {{epochs: 1, max_steps: {steps}, batch_size: 32, num_workers: 2, progress: false, threads: 2,"
        " val_every_n_steps: 1000000}\n"
        f"output_dir: {run}\n"
    )
    t0 = time.perf_counter()
    log = open(run.parent / f"{run.name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "multifi.cli.main", "train", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
    )
    peak, peak_pss, first_step = 0.0, 0.0, None
    while proc.poll() is None:
        peak = max(peak, tree_memory_mb(proc.pid, "Rss:"))
        peak_pss = max(peak_pss, tree_memory_mb(proc.pid, "Pss:"))
        if first_step is None and (run / "metrics.csv").exists():
            first_step = time.perf_counter() - t0
        time.sleep(0.2)
    log.close()
    if proc.returncode:
        raise SystemExit((run.parent / f"{run.name}.log").read_text()[-3000:])
    return {
        "train_start_s_upper_bound": round(first_step, 1) if first_step else None,
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_tree_MB": round(peak),
        "peak_pss_tree_MB": round(peak_pss),
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--atoms", type=int, default=10_000_000)
    ap.add_argument("--out", default="/tmp/multifi_large")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shared", default=str(SHARED))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "dataset"
    info = (
        build(data, args.atoms, Path(args.shared))
        if not (data / "multifi_dataset.json").exists()
        else {"reused": str(data)}
    )
    run = out / f"run_{int(time.time())}"
    result = {"dataset": info, "training": train(data, run, args.steps), "command": " ".join(sys.argv)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
