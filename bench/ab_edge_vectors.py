"""In-process A/B (M3GNet force+stress training steps): Potential edge vectors by advanced indexing (as in
models/potential.py) vs index_select + bmm. Result in bench/RESULTS.md (no gain, 1.01x).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ab_edge_vectors.py
"""

import statistics
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
from multifi.config import ModelConfig
from multifi.data.batch import GraphCollator
from multifi.data.neighbors import NeighborCache
from multifi.data.readers.matpes import read_matpes
from multifi.models.head import fit_baseline
from multifi.models.potential import Potential
from multifi.models.registry import build_potential
from multifi.models.response import derivatives, strained
from multifi.nn import scatter_sum
from multifi.train.loss import MultiFidelityLoss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository


def fwd_sel(self, graph, forces=False, stress=False, create_graph=False):
    B = graph.num_graphs
    stress = stress and bool((graph.cell.abs().sum((1, 2)) > 0).any())
    need_grad = forces or stress
    with torch.set_grad_enabled(need_grad or torch.is_grad_enabled()):
        positions = graph.positions
        if need_grad:
            positions = positions.detach().requires_grad_(True)
        pos, cell, eps = strained(positions, graph.cell, graph.batch, B, stress)
        i, j = graph.edge_index
        bi = graph.batch.index_select(0, i)
        shift = torch.bmm(graph.shifts.unsqueeze(1), cell.index_select(0, bi)).squeeze(1)
        edge_vec = pos.index_select(0, j) - pos.index_select(0, i) + shift
        fid_atom = graph.fidelity[graph.batch]
        s = self.representation(graph.numbers, graph.edge_index, edge_vec, self.conditioning.input_condition(fid_atom))
        atom_energy = self.head(s, self.conditioning.readout_condition(fid_atom), graph.numbers, fid_atom)
        energy = scatter_sum(atom_energy, graph.batch, B)
        out = {"energy": energy}
        if need_grad:
            f, st = derivatives(energy, positions, eps, graph.volume(), create_graph)
            if forces:
                out["forces"] = f
            if st is not None:
                out["stress"] = st
        if not create_graph and need_grad:
            out = {k: v.detach() for k, v in out.items()}
    return out


ds = read_matpes(SHARED / "solids" / "PBE.jsonl.gz")
pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
pot = build_potential(ModelConfig(backbone="m3gnet", features=64).model_dump(), list(ds.fidelities.names))
pot.head.set_baseline(*fit_baseline(ds, pairs))
col = GraphCollator(ds, NeighborCache(ds, 5.0, progress=False))
lf = MultiFidelityLoss()
rng = np.random.default_rng(0)
gs = [col(pairs[rng.choice(len(pairs), 32, replace=False)]) for _ in range(33)]


def step(f, g):
    out = f(pot, g, forces=True, stress=True, create_graph=True)
    loss, _ = lf(out, g)
    pot.zero_grad()
    loss.backward()
    return out


ta, tb, d = [], [], 0
for k, g in enumerate(gs):
    order = [(Potential.forward, ta), (fwd_sel, tb)] if k % 2 == 0 else [(fwd_sel, tb), (Potential.forward, ta)]
    res = []
    for f, ts in order:
        t = time.perf_counter()
        res.append(step(f, g))
        ts.append(time.perf_counter() - t)
    d = max(d, float((res[0]["forces"] - res[1]["forces"]).abs().max()))
ta, tb = ta[3:], tb[3:]
print(
    "indexing",
    1e3 * statistics.median(ta),
    "index_select",
    1e3 * statistics.median(tb),
    "speed-up",
    statistics.median([a / b for a, b in zip(ta, tb)]),
    "max dF",
    d,
)
