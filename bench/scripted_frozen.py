"""The calculator's scripted graph frozen (torch.jit.freeze: weights and what is computed from them held as
constants, as until 2681da7) against not frozen (reading the potential's own tensors at every call, so that a change
of the weights through `p.data` is seen), per model call, interleaved in one process.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/scripted_frozen.py [--calls 200]

PaiNN 128×3 on ethanol (9 atoms) and on the harness's 18-atom MD molecule (ethanol twice, 8 Å apart); M3GNet 64×3 on
a rattled 64-atom Si cell with stress (untrained weights: the timing does not depend on them). Median ms of each
and the median of the per-call ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase.build import bulk, molecule

from multifi.data.batch import graph_from_atoms
from multifi.models.registry import build_potential
from multifi.scripted import ScriptedPotential

args = argparse.ArgumentParser()
args.add_argument("--calls", type=int, default=200)
opts = args.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)

ethanol = molecule("CH3CH2OH")
pair = ethanol.copy()
other = ethanol.copy()
other.translate([8.0, 0, 0])
pair += other
si = bulk("Si", "diamond", 5.43, cubic=True).repeat(2)
si.rattle(0.05, seed=1)
painn = {"backbone": "painn", "features": 128, "interactions": 3, "cutoff": 5.0}
m3gnet = {"backbone": "m3gnet", "features": 64, "interactions": 3, "cutoff": 5.0}
cases = [("PaiNN 128×3", painn, ethanol, False), ("PaiNN 128×3", painn, pair, False), ("M3GNet 64×3", m3gnet, si, True)]

freeze = torch.jit.freeze
for name, config, atoms, stress in cases:
    potential = build_potential(config, ["a", "b"]).eval()
    graph = graph_from_atoms([atoms], potential.cutoff, 0)
    unfrozen = ScriptedPotential(potential, graph, stress)
    frozen_run = freeze(unfrozen._run, optimize_numerics=False)
    frozen = ScriptedPotential.__new__(ScriptedPotential)
    frozen.__dict__.update(unfrozen.__dict__, _run=frozen_run)
    inputs = unfrozen._inputs(graph)
    same = all(torch.equal(a, b) for a, b in zip(frozen._call(inputs).values(), unfrozen._call(inputs).values()))
    times = {"frozen": [], "not frozen": []}
    for _ in range(10):
        frozen._call(inputs), unfrozen._call(inputs)
    for _ in range(opts.calls):
        for label, model in (("frozen", frozen), ("not frozen", unfrozen)):
            t = time.perf_counter()
            model._call(inputs)
            times[label].append(time.perf_counter() - t)
    ratio = np.median(np.array(times["not frozen"]) / np.array(times["frozen"]))
    print(
        f"{name}, {len(atoms)} atoms, {graph.edge_index.shape[1]} edges: frozen {1e3 * np.median(times['frozen']):.3f} ms, "
        f"not frozen {1e3 * np.median(times['not frozen']):.3f} ms, not frozen / frozen {ratio:.3f}, same numbers: {same}"
    )
