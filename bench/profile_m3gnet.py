"""Where the time of an M3GNet force+stress training step goes: forward parts (module hooks),
force/stress autograd and the double backward, on batches of 32 PBE solids.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/profile_m3gnet.py [--ops [--shapes] [--rows N]]

--ops adds a torch.profiler operator table (self CPU) of 10 whole steps with AdamW (--shapes: by input shapes).
"""

import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
import multifi.models.m3gnet as M
from multifi.config import ModelConfig
from multifi.data.batch import GraphCollator
from multifi.data.neighbors import NeighborCache
from multifi.data.readers.matpes import read_matpes
from multifi.data.stats import fit_references
from multifi.models.registry import build_potential
from multifi.train.loss import MultiFidelityLoss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository

ds = read_matpes(SHARED / "solids" / "PBE.jsonl.gz", stress_order="vasp")
pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
pot = build_potential(ModelConfig(backbone="m3gnet", features=64).model_dump(), list(ds.fidelities.names))
refs = fit_references(ds, pairs)  # as `multifi train` fits and sets them
pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
col = GraphCollator(ds, NeighborCache(ds, 5.0, progress=False))
lf = MultiFidelityLoss()
rng = np.random.default_rng(0)
gs = [col(pairs[rng.choice(len(pairs), 32, replace=False)]) for _ in range(13)]


def training_step_seconds(g) -> float:
    """Thread CPU time of one training step on batch g (energy, forces and stress with create_graph, loss,
    backward): what the probes that run this file (probe_detached_basis.py, denormals.py) compare."""
    t = time.thread_time()
    out = pot(g, forces=True, stress=True, create_graph=True)
    loss, _ = lf(out, g)
    pot.zero_grad()
    loss.backward()
    return time.thread_time() - t


acc = collections.defaultdict(float)
start = {}
rep = pot.representation


def add(name, mod):
    mod.register_forward_pre_hook(lambda m, a, n=name: start.__setitem__(n, time.perf_counter()))
    mod.register_forward_hook(lambda m, a, o, n=name: acc.__setitem__(n, acc[n] + time.perf_counter() - start[n]))


add("rbf (two-body basis)", rep.rbf)
add("edge_embedding", rep.edge_embedding)
for m in rep.three_body:
    add("three_body (x3)", m)
for m in rep.convs:
    add("graph conv (x3)", m)
add("representation total", rep)
add("head", pot.head)
orig = M.ThreeBodyBasis.__init__


def timed(self, *a, **k):
    t = time.perf_counter()
    orig(self, *a, **k)
    acc["ThreeBodyBasis() construction"] += time.perf_counter() - t


M.ThreeBodyBasis.__init__ = timed
orig_index = M.threebody_bonds


def timed_index(*a, **k):
    t = time.perf_counter()
    out = orig_index(*a, **k)
    acc["three-body bond ids (geometry, no grad)"] += time.perf_counter() - t
    return out


M.threebody_bonds = timed_index  # called by M3GNet.geometry, which Potential.forward calls before the representation
tot = collections.defaultdict(float)
for k, g in enumerate(gs):
    t0 = time.perf_counter()
    out = pot(g, forces=True, stress=True, create_graph=True)
    loss, _ = lf(out, g)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if k == 2:
        acc.clear()
    if k >= 3:
        tot["forward incl. force/stress autograd.grad"] += t1 - t0
        tot["backward (double)"] += t2 - t1
n = len(gs) - 3
for k, v in list(acc.items()) + list(tot.items()):
    print(f"{k:45s} {1e3 * v / n:8.1f} ms/step")
print(
    "atoms/batch",
    np.mean([g.numbers.shape[0] for g in gs]),
    "edges/batch",
    np.mean([g.edge_index.shape[1] for g in gs]),
)

if "--ops" in sys.argv:
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(pot.parameters(), 5e-4)
    shapes = "--shapes" in sys.argv  # the table grouped by input shapes too
    rows = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else 40  # rows of the table
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for g in gs[:10]:
            out = pot(g, forces=True, stress=True, create_graph=True)
            loss, _ = lf(out, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total", row_limit=rows))
