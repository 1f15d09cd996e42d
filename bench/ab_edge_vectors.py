"""In-process A/B (M3GNet force+stress training steps): Potential edge vectors by advanced indexing (as in
models/potential.py) vs index_select + bmm. Result in bench/RESULTS.md (no gain, 1.01x; measured when
forces were position derivatives, before the energy was differentiated by the edge vectors, response.py).

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
from multifi.data.stats import fit_references
from multifi.models.potential import Potential, _energy_and_grad
from multifi.models.registry import build_potential
from multifi.models.response import forces_from_edge_gradient, stress_from_edge_gradient
from multifi.nn import scatter_sum
from multifi.train.loss import MultiFidelityLoss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository


def fwd_sel(self, graph, forces=False, stress=False, create_graph=False):
    """Potential.forward (eager) with the edge vectors by index_select + bmm instead of advanced indexing."""
    B = graph.num_graphs
    stress = stress and bool((graph.cell.abs().sum((1, 2)) > 0).any())
    i, j = graph.edge_index
    bi = graph.batch.index_select(0, i)
    shift = torch.bmm(graph.shifts.unsqueeze(1), graph.cell.index_select(0, bi)).squeeze(1)
    vec = (graph.positions.index_select(0, j) - graph.positions.index_select(0, i) + shift).detach()
    geometry = self.representation.geometry(graph.edge_index, vec)
    args = (graph.numbers, graph.edge_index, geometry, graph.fidelity[graph.batch])
    atom_energy, g = _energy_and_grad(self, vec.requires_grad_(True), *args, create_graph=create_graph)
    out = {"energy": scatter_sum(atom_energy, graph.batch, B)}
    if forces:
        out["forces"] = forces_from_edge_gradient(g, graph.edge_index, graph.positions.shape[0])
    if stress:
        out["stress"] = stress_from_edge_gradient(g, vec, bi, graph.volume())
    return out if create_graph else {k: v.detach() for k, v in out.items()}


ds = read_matpes(SHARED / "solids" / "PBE.jsonl.gz", stress_order="vasp")
pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
pot = build_potential(ModelConfig(backbone="m3gnet", features=64), list(ds.fidelities.names))
refs = fit_references(ds, pairs)  # as `multifi train` fits and sets them
pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
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
    d = max(d, float((res[0]["forces"] - res[1]["forces"]).detach().abs().max()))
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
