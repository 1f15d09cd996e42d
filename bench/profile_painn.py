"""Where the time of a PaiNN training step goes (torch.profiler), on the benchmark's QM9 batches.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/profile_painn.py [--threads 1] [--steps 20] [--forces]
        [--sort self_cpu_time_total] [--rows 30] [--phases]

Model: PaiNN 128×3, 5 Å, 20 rbf, batch 32 (as bench/harness.py), GFN2-xTB energies of 2000 QM9
molecules. --phases prints the wall-clock split of one whole step (collate / forward / backward /
optimizer), median over steps; otherwise a torch.profiler operator table of model-only steps.
--forces adds a force loss (double backward), as for periodic training data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LABELS = SHARED / "qm9mf" / "GFN2-xTB.csv.gz"


def setup(n: int = 2000, seed: int = 0, batch: int = 32, features: int = 128, interactions: int = 3):
    import numpy as np

    from multifi.config import ModelConfig
    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import NeighborCache
    from multifi.data.readers.qm9 import read_qm9
    from multifi.data.stats import fit_references
    from multifi.models.registry import build_potential
    from multifi.train.loss import MultiFidelityLoss

    ds = read_qm9(labels=LABELS, limit=n, seed=0)
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    cfg = ModelConfig(features=features, interactions=interactions).model_dump()
    pot = build_potential(cfg, list(ds.fidelities.names))
    refs = fit_references(ds, pairs)  # as `multifi train` fits and sets them
    pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    collate = GraphCollator(ds, NeighborCache(ds, 5.0, progress=False))
    rng = np.random.default_rng(seed)
    batches = lambda k: [pairs[rng.choice(len(pairs), batch, replace=False)] for _ in range(k)]  # noqa: E731
    return pot, collate, batches, MultiFidelityLoss()


def train_step(pot, opt, loss_fn, forces: bool):
    """step(g): one optimiser step on a collated batch — the energy loss, or with `forces` an energy-per-atom +
    force loss with forces by autograd (create_graph, double backward)."""

    def step(g):
        if forces:
            out = pot(g, forces=True, create_graph=True)
            loss = ((out["energy"] - g.energy) / g.n_atoms).pow(2).mean().float() + out["forces"].pow(2).mean()
        else:
            loss, _ = loss_fn(pot(g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--forces", action="store_true")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--sort", default="self_cpu_time_total")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="molecules per batch (1 shows the fixed per-step overhead)")
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--interactions", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pot, collate, batches, loss_fn = setup(batch=args.batch, features=args.features, interactions=args.interactions)
    opt = torch.optim.AdamW(pot.parameters(), lr=5e-4, fused=True)  # as PotentialModule

    step = train_step(pot, opt, loss_fn, args.forces)

    for p in batches(3):
        step(collate(p))
    if args.phases:
        phases = {"collate": [], "forward+loss": [], "backward": [], "optimizer": []}
        cpu = []  # thread CPU time of forward..optimizer: not inflated when other processes share the core
        for p in batches(args.steps):
            t0 = time.perf_counter()
            g = collate(p)
            t1 = time.perf_counter()
            c0 = time.thread_time()
            if args.forces:
                out = pot(g, forces=True, create_graph=True)
                loss = ((out["energy"] - g.energy) / g.n_atoms).pow(2).mean().float() + out["forces"].pow(2).mean()
            else:
                loss, _ = loss_fn(pot(g), g)
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            cpu.append(1000 * (time.thread_time() - c0))
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(1000 * v)
        total = sum(statistics.median(v) for v in phases.values())
        for k, v in phases.items():
            m = statistics.median(v)
            print(f"{k:14s} {m:8.2f} ms  {100 * m / total:5.1f} %")
        print(f"{'step':14s} {total:8.2f} ms  → {args.batch / total * 1000:.1f} structures/s (sum of medians)")
        print(
            f"{'model step CPU':14s} {statistics.median(cpu):8.2f} ms  (thread CPU time, median; load {os.getloadavg()[0]:.1f})"
        )
        return
    from torch.profiler import ProfilerActivity, profile

    graphs = [collate(p) for p in batches(args.steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for g in graphs:
            step(g)
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
