"""Training throughput (structures/s) and peak memory of PaiNN on QM9 molecules, energy only.

    python bench/throughput.py [--n 5000] [--features 128] [--interactions 3] [--cutoff 5]
                               [--batch-size 32] [--threads 2] [--steps 60] [--repeats 3]

Times whole optimisation steps (collate from cached neighbour lists, forward, backward, AdamW) over
GFN2-xTB labels of n random QM9 molecules; reports the median over repeats of `steps` steps each,
after warm-up. Neighbour-list construction for the n molecules is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--interactions", type=int, default=3)
    ap.add_argument("--cutoff", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch

    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import NeighborCache
    from multifi.data.readers.qm9 import read_qm9
    from multifi.data.stats import fit_references
    from multifi.models.registry import build_potential
    from multifi.train.loss import MultiFidelityLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = read_qm9(labels=Path(args.shared) / "qm9mf" / "GFN2-xTB.csv.gz", fidelity="GFN2-xTB", limit=args.n, seed=0)
    t0 = time.perf_counter()
    nl = NeighborCache(ds, args.cutoff, progress=False)
    nl_seconds = time.perf_counter() - t0
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    model = {
        "backbone": "painn",
        "features": args.features,
        "interactions": args.interactions,
        "cutoff": args.cutoff,
        "n_rbf": 20,
        "fidelity_embedding": {"dim": 16, "inject": "single"},
    }
    pot = build_potential(model, ["GFN2-xTB"])
    refs = fit_references(ds, pairs)  # as `multifi train` fits and sets them
    pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    opt = torch.optim.AdamW(pot.parameters(), lr=1e-4)
    loss_fn = MultiFidelityLoss()
    collate = GraphCollator(ds, nl)
    rng = np.random.default_rng(0)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            g = collate(pairs[rng.choice(len(pairs), args.batch_size, replace=False)])
            loss, _ = loss_fn(pot(g), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * args.batch_size / (time.perf_counter() - start)

    run(5)
    rates = [run(args.steps) for _ in range(args.repeats)]
    print(
        json.dumps(
            {
                "bench": "painn_train_throughput",
                "structures_per_s_median": round(statistics.median(rates), 1),
                "structures_per_s_all": [round(r, 1) for r in rates],
                "neighbor_lists_s": round(nl_seconds, 2),
                "n_molecules": len(ds),
                "atoms_per_molecule": round(float(ds.n_atoms.mean()), 2),
                "params": sum(p.numel() for p in pot.parameters()),
                "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "args": vars(args),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
