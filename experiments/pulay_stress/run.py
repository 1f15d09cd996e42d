"""Stress labels with a Pulay stress: what `data.pulay_stress` (keep, correct, drop) does to cells a model relaxes.

The shared PBE solids (../shared/data/solids, MatPES schema) carry pressures their own energies contradict in six
compositions (LiF, MgO, BN, AlN; training warns: −64 to −248 GPa against −dE/dV of 9-39 GPa). M3GNet 32×2, PBE +
r2SCAN, embedding at input and readout, loss.stress 0.1 (the weight for cell relaxations), STEPS steps, per seed
and variant; a baseline with loss.stress 0 (stresses not trained). Each model relaxes LiF and MgO (rocksalt), Si
(diamond) and Cu (fcc) at PBE (FrechetCellFilter + BFGS, fmax 0.005 eV/Å) from their experimental lattice
constants; the yardstick for LiF and MgO is the data's own mean PBE cell (data_lattice_constants). Validation
errors from each run's metrics.json (no test set used).

    .venv/bin/python experiments/pulay_stress/run.py [--steps 1500] [--seeds 0 1] [--out results/pulay_stress]

Resumable: a finished run (model.pt) is skipped, an unfinished one resumes from its last checkpoint; the report
(results/pulay_stress/README.md, summary.json) is rewritten from every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
SOLIDS = ROOT / ".." / "shared" / "data" / "solids"
OUT = ROOT / "results" / "pulay_stress"
#: (variant name, data.pulay_stress, loss.stress)
VARIANTS = (("keep", "keep", 0.1), ("correct", "correct", 0.1), ("drop", "drop", 0.1), ("no_stress", "keep", 0.0))
#: crystal, ASE bulk structure, experimental lattice constant Å (the relaxation's start)
CRYSTALS = (("LiF", "rocksalt", 4.03), ("MgO", "rocksalt", 4.21), ("Si", "diamond", 5.43), ("Cu", "fcc", 3.61))


def config(variant: str, pulay: str, stress: float, seed: int, steps: int, out: Path) -> dict:
    return {
        "data": {
            "sources": [
                {"path": os.path.relpath(SOLIDS / f"{n}.jsonl.gz", out), "stress_order": "vasp"}
                for n in ("PBE", "R2SCAN")
            ],
            "split": {"val": 0.1, "test": 0.1, "seed": 0},
            "pulay_stress": pulay,
        },
        "model": {
            "backbone": "m3gnet",
            "features": 32,
            "interactions": 2,
            "cutoff": 5.0,
            "fidelity_embedding": {"dim": 8, "inject": "both"},
        },
        "loss": {"stress": stress},
        "train": {
            "epochs": 100000,
            "max_steps": steps,
            "batch_size": 16,
            "seed": seed,
            "threads": 1,
            "progress": False,
            "val_every_n_steps": max(steps // 10, 1),
        },
        "output_dir": f"{variant}_seed{seed}",
    }


def train(cfg: dict, out: Path) -> Path:
    """Train (or resume) the run of `cfg` in out/work (git-ignored); its run directory."""
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    run = work / cfg["output_dir"]
    if (run / "model.pt").exists():
        return run
    path = work / f"{cfg['output_dir']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(ROOT / ".venv" / "bin" / "multifi"), "train", path.name]
    if (run / "checkpoints").exists():
        command += ["--resume"]
    subprocess.run(command, cwd=work, env=env, check=True)
    return run


def relaxed(run: Path) -> dict[str, float]:
    """Cube root of the relaxed conventional cell's volume, Å, per crystal (PBE)."""
    import warnings

    from ase.build import bulk
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    import multifi

    out = {}
    for name, kind, a in CRYSTALS:
        atoms = bulk(name, kind, a=a, cubic=True)
        atoms.calc = multifi.Calculator(str(run / "model.pt"), fidelity="PBE")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=0.005, steps=300)
        out[name] = float(np.cbrt(atoms.get_volume()))
    return out


def data_lattice_constants() -> tuple[dict[str, float], dict[str, dict]]:
    """LiF and MgO: the conventional lattice constant (Å) of the mean volume of the data's 2-atom primitive cells
    (rocksalt: 4 formula units per conventional cell), and why that mean stands for the PBE equilibrium here rather
    than the labels or the energies: per material the slope dP/d ln V of the label pressures (GPa; about −B for
    labels that follow the volume) and the curvature of a quadratic E(V) through the energies (eV/Å⁶; negative:
    no minimum). MatPES-style structures scatter around the functional's relaxed structure."""
    from multifi.config import SourceConfig
    from multifi.data.sources import read_sources

    ds = read_sources([SourceConfig(path=str(SOLIDS / "PBE.jsonl.gz"), stress_order="vasp")])
    out, why = {}, {}
    for name, pair in (("LiF", (3, 9)), ("MgO", (8, 12))):
        s = [
            i
            for i in range(len(ds))
            if ds.n_atoms[i] == 2 and sorted(ds.numbers[ds.offsets[i] : ds.offsets[i + 1]].tolist()) == list(pair)
        ]
        volume = np.abs(np.linalg.det(ds.cells[s]))
        pressure = -np.trace(ds.stress[s, 0], axis1=1, axis2=2) / 3  # GPa
        out[name] = float(np.cbrt(4 * volume.mean()))
        why[name] = {
            "cells": len(s),
            "label_dP_dlnV_GPa": float(np.polyfit(np.log(volume), pressure, 1)[0]),
            "energy_curvature_eV_per_A6": float(np.polyfit(volume, ds.energy[s, 0], 2)[0]),
        }
    return out, why


def val_metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())["val_fidelities"]["PBE"]
    return {k: m[k] for k in ("energy_mae_meV_per_atom", "forces_mae_meV_per_A", "stress_mae_GPa")}


def report(out: Path, rows: list[dict], yardstick: dict, why: dict, command: str) -> None:
    (out / "summary.json").write_text(
        json.dumps({"command": command, "data_lattice": yardstick, "data_cells": why, "runs": rows}, indent=1)
    )
    lines = [
        "| variant | seed | LiF Å | MgO Å | Si Å | Cu Å | val PBE E MAE meV/atom | F MAE meV/Å | S MAE GPa |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, v = r["relaxed"], r["val"]
        lines.append(
            f"| {r['variant']} | {r['seed']} | {a['LiF']:.3f} | {a['MgO']:.3f} | {a['Si']:.3f} | {a['Cu']:.3f} | "
            f"{v['energy_mae_meV_per_atom']:.1f} | {v['forces_mae_meV_per_A']:.0f} | {v['stress_mae_GPa']:.2f} |"
        )
    lines.append(f"| the data's mean PBE cell | | {yardstick['LiF']:.3f} | {yardstick['MgO']:.3f} | | | | | |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/pulay_stress/run.py " + " ".join(
        [f"--steps {args.steps}", "--seeds " + " ".join(map(str, args.seeds))]
    )
    yardstick, why = data_lattice_constants()
    rows = []
    for seed in args.seeds:
        for variant, pulay, stress in VARIANTS:
            run = train(config(variant, pulay, stress, seed, args.steps, out / "work"), out)
            rows.append({"variant": variant, "seed": seed, "relaxed": relaxed(run), "val": val_metrics(run)})
            report(out, rows, yardstick, why, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
