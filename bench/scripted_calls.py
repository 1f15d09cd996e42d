"""The calculator's scripted model (multifi.scripted) against the eager model, per call, at several sizes.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/scripted_calls.py [--calls 100]

PaiNN 128×3 (5 Å, 20 rbf; references fitted on 300 QM9 molecules) on the harness's 18-atom MD molecule and on 3
and 6 copies of it 8 Å apart; M3GNet 64×3 (PBE solids) on the harness's rattled 64-atom Si cell (with stress) and
its 128-atom double. Per structure: Potential.forward(graph, forces=True[, stress]) eagerly and through the scripted
graph, interleaved call by call (median ms of each), and whether every output is bit for bit the same. Then whole
ASE calculator calls (neighbour list, checks, model) on the 18-atom molecule, script=False against script=True,
interleaved, and the time of the calculator's geometry check (check_contacts) in such a call. Last, whole NVE runs
of --md-steps steps (VelocityVerlet, 0.5 fs) of that molecule with the default calculator (script=None: eager, then
the scripted model once due) and with script=False: wall time of each and the step at which the default switched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / ".." / "shared" / "data"  # ../shared/data beside the repository
sys.path.insert(0, str(HERE / "peers"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def interleaved(a, b, calls: int) -> tuple[float, float]:
    """Median ms of a() and b(), called in turn (after 10 untimed calls of each)."""
    for _ in range(10):
        a(), b()
    ta, tb = [], []
    for _ in range(calls):
        for f, ts in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ta), 1e3 * statistics.median(tb)


def frozen(potential, dtype=torch.float32):
    potential = potential.to(dtype).eval()
    for p in potential.parameters():
        p.requires_grad_(False)
    return potential


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--md-steps", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ase.io
    from _multifi import build

    from multifi.calculator import Calculator
    from multifi.data.batch import graph_from_atoms
    from multifi.data.readers.matpes import read_matpes
    from multifi.data.readers.qm9 import read_qm9
    from multifi.models.elements import check_contacts
    from multifi.scripted import ScriptedPotential

    qm9 = read_qm9(labels=SHARED / "qm9mf" / "GFN2-xTB.csv.gz", limit=300, seed=0)
    painn = frozen(build(qm9, {"features": 128, "interactions": 3, "cutoff": 5.0, "n_rbf": 20}).potential)
    molecule = ase.io.read(HERE / ".scratch" / "md_molecule.xyz")
    copies = []
    for n in (1, 3, 6):
        atoms = molecule.copy()
        for k in range(1, n):
            other = molecule.copy()
            other.positions += [8.0 * k, 0, 0]
            atoms += other
        copies.append(atoms)
    solids = read_matpes(SHARED / "solids" / "PBE.jsonl.gz", stress_order="vasp")
    m3gnet = frozen(build(solids, {"backbone": "m3gnet", "features": 64}).potential)
    si = ase.io.read(HERE / ".scratch" / "si64.extxyz")
    print("| model | atoms | edges | eager ms | scripted ms | eager / scripted | bit for bit | build s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, pot, systems, stress in (
        ("PaiNN 128×3", painn, copies, False),
        ("M3GNet 64×3", m3gnet, [si, si.repeat((1, 1, 2))], True),
    ):
        graphs = [graph_from_atoms([a], pot.cutoff, 0) for a in systems]
        start = time.perf_counter()
        model = ScriptedPotential(pot, graphs[0], stress)
        built = time.perf_counter() - start
        for atoms, g in zip(systems, graphs):
            eager = lambda pot=pot, g=g, stress=stress: pot(g, forces=True, stress=stress)  # noqa: E731
            scripted = lambda model=model, g=g: model(g)  # noqa: E731
            want, got = eager(), scripted()
            same = all(torch.equal(want[k], got[k]) for k in got)
            te, ts = interleaved(eager, scripted, args.calls)
            print(
                f"| {name} | {len(atoms)} | {g.edge_index.shape[1]} | {te:.2f} | {ts:.2f} | {te / ts:.2f} | "
                f"{'yes' if same else 'NO'} | {built:.1f} |"
            )
    fidelity = qm9.fidelities.names[0]
    rng = np.random.default_rng(0)
    calcs = {s: Calculator(painn, fidelity=fidelity, script=s) for s in (False, True)}
    runs = {s: molecule.copy() for s in calcs}
    for s, atoms in runs.items():
        atoms.calc = calcs[s]
    start = molecule.positions.copy()

    def step(s):
        runs[s].positions = start + rng.normal(0, 0.01, start.shape)
        runs[s].get_forces()

    te, ts = interleaved(lambda: step(False), lambda: step(True), 3 * args.calls)
    print(
        f"\nASE calculator call, {len(molecule)} atoms: script=False {te:.2f} ms, script=True {ts:.2f} ms, ratio {te / ts:.2f}"
    )
    g = graph_from_atoms([molecule], painn.cutoff, 0)
    seen: set = set()
    check, _ = interleaved(lambda: check_contacts(painn, g, seen=seen), lambda: None, 3 * args.calls)
    print(f"check_contacts of that molecule: {1e3 * check:.0f} us")
    from ase import units
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    for script in (None, False):
        atoms = molecule.copy()
        atoms.calc = calc = Calculator(painn, fidelity=fidelity, script=script)
        thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
        md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        switched = []
        md.attach(lambda calc=calc, switched=switched: switched.append(bool(calc._scripted)))
        t = time.perf_counter()
        md.run(args.md_steps)
        seconds = time.perf_counter() - t
        at = switched.index(True) if True in switched else None
        print(f"{args.md_steps} MD steps, script={script}: {seconds:.1f} s; scripted from step {at}")


if __name__ == "__main__":
    main()
