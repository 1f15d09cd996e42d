"""Training throughput of small PaiNN models on QM9 (energy only), to size experiment specs.

    OMP_WAIT_POLICY=PASSIVE python bench/experiment_throughput.py [--threads 2] [--n 2000]

Times optimisation steps (forward + backward + AdamW, batch 32) outside Lightning, and eval forwards,
for a few model sizes; prints molecules/s. Measured on the 2-core dev machine (2026-11-24, QM9,
batch 32, cutoff 5 Å, ~282 edges/molecule), PaiNN 32×2: 1 thread 32 ms/step (988 mol/s) when the
machine was quiet, 39 ms/step with other jobs running; 2 threads 49 ms/step (655 mol/s), i.e. slower
than one. PaiNN 64×2 68 ms, 64×3 116 ms, 128×3 190 ms per step (2 threads). These numbers size
experiments/qm9_small.yaml (see its comments).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from multifi.data.batch import GraphCollator
from multifi.data.neighbors import NeighborCache
from multifi.data.readers.qm9 import read_qm9
from multifi.data.stats import fit_references
from multifi.models.registry import build_potential


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sizes", default="32x2,64x2,64x3,128x3")
    ap.add_argument("--cutoff", type=float, default=5.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = read_qm9(limit=args.n, seed=0)
    t0 = time.perf_counter()
    nl = NeighborCache(ds, args.cutoff, progress=False)
    t_nl = time.perf_counter() - t0
    print(
        f"{len(ds)} molecules, {ds.n_atoms.mean():.1f} atoms, {nl.n_edges.mean():.0f} edges/molecule; "
        f"neighbour lists {len(ds) / t_nl:.0f} mol/s"
    )
    collate = GraphCollator(ds, nl)
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    for size in args.sizes.split(","):
        F, L = map(int, size.split("x"))
        model = {
            "backbone": "painn",
            "features": F,
            "interactions": L,
            "cutoff": args.cutoff,
            "n_rbf": 20,
            "readout_hidden": None,
            "fidelity_embedding": {"dim": 16, "inject": "both", "onehot_at": "both"},
        }
        pot = build_potential(model, list(ds.fidelities.names))
        refs = fit_references(ds, pairs)  # as `multifi train` fits and sets them
        pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
        opt = torch.optim.AdamW(pot.parameters(), lr=5e-4)
        rng = np.random.default_rng(0)
        batches = [collate(pairs[rng.choice(len(pairs), args.batch, replace=False)]) for _ in range(args.steps + 5)]
        for i, g in enumerate(batches):
            if i == 5:
                t0 = time.perf_counter()
            out = pot(g)
            loss = (((out["energy"] - g.energy) / g.n_atoms) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        dt = (time.perf_counter() - t0) / args.steps
        with torch.no_grad():
            t0 = time.perf_counter()
            for g in batches[:20]:
                pot(g)
            de = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()
        for _ in range(20):
            collate(pairs[rng.choice(len(pairs), args.batch, replace=False)])
        dc = (time.perf_counter() - t0) / 20
        n_par = sum(p.numel() for p in pot.parameters())
        print(
            f"PaiNN F={F} L={L} ({n_par / 1e3:.0f}k params): train {dt * 1e3:.1f} ms/step = "
            f"{args.batch / dt:.0f} mol/s; eval {args.batch / de:.0f} mol/s; collate {dc * 1e3:.1f} ms/batch"
        )


if __name__ == "__main__":
    main()
