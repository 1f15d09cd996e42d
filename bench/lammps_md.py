"""MD steps per second: LAMMPS with pair_style multifi (1 and 2 MPI ranks) vs the ASE calculator (1 and 2 threads).

Si diamond supercells of 64 … 4096 atoms, NVE, 1 fs, velocities for 300 K; a deployed model (float64)
against multifi.Calculator(dtype="float64") on the same model; each measurement after warm-up steps
(TorchScript optimises its graph during the first calls). Needs `make lammps`.
    python bench/lammps_md.py [--model tests/data/solids_painn.pt] [--fidelity R2SCAN] [--sizes 2 4 8]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from lammps_run import BIN, PLUGIN, write_data  # noqa: E402


def lammps_steps_per_s(workdir: Path, atoms, model: Path, steps: int, nprocs: int, warmup: int = 3) -> float:
    v = atoms.get_velocities() * units.fs * 1000.0  # Å/ps
    write_data(workdir / "data.lmp", atoms, ["Si"], v)
    (workdir / "in.lmp").write_text(f"""units metal
atom_style atomic
boundary p p p
read_data data.lmp
plugin load {PLUGIN}
pair_style multifi {model}
pair_coeff * * Si
timestep 0.001
thermo 1000
fix nve all nve
run {warmup}
run {steps}
""")
    cmd = [str(BIN / "lmp"), "-in", "in.lmp", "-log", "log.lammps", "-screen", "none"]
    if nprocs > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(nprocs)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    subprocess.run(cmd, cwd=workdir, check=True, env=env, capture_output=True)
    loops = re.findall(r"Loop time of ([0-9.e+-]+) on \d+ procs for (\d+) steps", (workdir / "log.lammps").read_text())
    seconds, n = float(loops[-1][0]), int(loops[-1][1])
    return n / seconds


def ase_steps_per_s(atoms, model: Path, fidelity: str, steps: int, threads: int, warmup: int = 2) -> float:
    import multifi

    torch.set_num_threads(threads)
    a = atoms.copy()
    a.calc = multifi.Calculator(model, fidelity=fidelity, dtype="float64")
    dyn = VelocityVerlet(a, timestep=1.0 * units.fs)
    dyn.run(warmup)
    t0 = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "tests" / "data" / "solids_painn.pt"))
    parser.add_argument("--fidelity", default="R2SCAN")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], help="supercell repeats of the 8-atom cell")
    args = parser.parse_args()
    from multifi.deploy import deploy

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deployed = tmp / "model.pt"
        meta = deploy(args.model, args.fidelity, deployed)
        print(
            f"model {Path(args.model).name} at {args.fidelity}: {meta['backbone']}, cutoff {meta['cutoff']} Å, "
            f"ghost cutoff {meta['ghost_cutoff']} Å, float64"
        )
        print("| atoms | ASE 1 thread | LAMMPS 1 rank | ratio | ASE 2 threads | LAMMPS 2 ranks | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for k in args.sizes:
            atoms = bulk("Si", "diamond", 5.43, cubic=True) * (k, k, k)
            MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
            steps = max(3, int(1280 / len(atoms)))
            row = [len(atoms)]
            for par in (1, 2):
                work = tmp / f"{k}_{par}"
                work.mkdir()
                a = ase_steps_per_s(atoms, Path(args.model), args.fidelity, steps, par)
                lmp = lammps_steps_per_s(work, atoms, deployed, steps, par)
                row += [f"{a:.3g}", f"{lmp:.3g}", f"{lmp / a:.2f}"]
            print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


if __name__ == "__main__":
    main()
