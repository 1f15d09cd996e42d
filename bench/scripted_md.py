"""Steps/s of M3GNet MD through the calculator's scripted model, in whichever multifi is imported: the harness's
MD task (64-atom Si cell, VelocityVerlet 0.5 fs, 20 warm-up and --steps timed steps, script=True) repeated in one
process, to compare revisions in alternating processes (eager for reference with --eager):

    git worktree add /tmp/wt_old REV
    PYTHONPATH=/tmp/wt_old/src OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/scripted_md.py
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/scripted_md.py     (repeat both, in turn)
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

import _common as C  # noqa: E402
import ase.io  # noqa: E402
import torch  # noqa: E402
from _multifi import build  # noqa: E402

import multifi  # noqa: E402
from multifi.calculator import Calculator  # noqa: E402
from multifi.data.readers.matpes import read_matpes  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--runs", type=int, default=2)
ap.add_argument("--eager", action="store_true")
opts = ap.parse_args()
torch.set_num_threads(1)
solids = read_matpes(HERE.parent / ".." / "shared" / "data" / "solids" / "PBE.jsonl.gz", stress_order="vasp")
pot = build(solids, {"backbone": "m3gnet", "features": 64}).potential
rates = []
for _ in range(opts.runs):
    calc = Calculator(pot, fidelity=solids.fidelities.names[0], script=not opts.eager)
    rates.append(
        round(C.time_md(ase.io.read(HERE / ".scratch" / "si64.extxyz"), calc, opts.steps)["md_steps_per_s"], 1)
    )
print(f"{multifi.__file__} {'eager' if opts.eager else 'scripted'}: MD steps/s {rates}")
