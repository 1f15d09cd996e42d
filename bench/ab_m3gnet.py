"""In-process A/B of two M3GNet implementations on identical batches of PBE solids, alternating step by step.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ab_m3gnet.py --tree 7574ec6:bench/variants/m3gnet_fast_special.py
        [--base REV_OR_FILE] [--steps 30] [--mode train|md]

A = models/m3gnet.py of the work tree (or --base), B = --tree (default the work tree); each a git
revision, REV:PATH (a file at a revision) or a file path (see bench/legacy.py). --compile-b runs B through the compiled potential (model.compile;
its compilation happens in the 3 untimed warm-up steps). Same weights. train = forward with forces and stress (create_graph) + energy/force/stress
loss + backward (double backward); md = forces only, no create_graph, no parameter gradients
(what the ASE calculator does). Prints the median of per-step ratios A/B and the largest force difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None)
    ap.add_argument("--tree", default=None)
    ap.add_argument("--compile-b", action="store_true", help="B = the compiled potential (model.compile)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=["train", "md"], default="train")
    args = ap.parse_args()
    import copy

    import numpy as np
    import torch
    from legacy import current, from_config, module_at

    from multifi.config import ModelConfig
    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import NeighborCache
    from multifi.data.readers.matpes import read_matpes
    from multifi.data.stats import fit_references
    from multifi.models.registry import build_potential
    from multifi.train.loss import MultiFidelityLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = read_matpes(SHARED / "solids" / "PBE.jsonl.gz", stress_order="vasp")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    cfg = ModelConfig(backbone="m3gnet", features=64)
    pot_a = build_potential(cfg, list(ds.fidelities.names))
    refs = fit_references(ds, pairs)  # as `multifi train` fits and sets them
    pot_a.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    pot_b = copy.deepcopy(pot_a)
    state = pot_a.representation.state_dict()
    if args.base:
        pot_a.representation = from_config(module_at(args.base, "m3gnet").M3GNet, cfg)
        pot_a.representation.load_state_dict(state)
        pot_a.representation = current(pot_a.representation)
    if args.tree:
        pot_b.representation = from_config(module_at(args.tree, "m3gnet").M3GNet, cfg)
        pot_b.representation.load_state_dict(state)
        pot_b.representation = current(pot_b.representation)
    pot_b.use_compile = args.compile_b
    if args.mode == "md":
        for p in list(pot_a.parameters()) + list(pot_b.parameters()):
            p.requires_grad_(False)
    collate, loss_fn = GraphCollator(ds, NeighborCache(ds, 5.0, progress=False)), MultiFidelityLoss()
    rng = np.random.default_rng(0)
    graphs = [collate(pairs[rng.choice(len(pairs), 32, replace=False)]) for _ in range(args.steps + 3)]

    def step(pot, g):
        if args.mode == "md":
            return pot(g, forces=True)["forces"]
        out = pot(g, forces=True, stress=True, create_graph=True)
        loss, _ = loss_fn(out, g)
        pot.zero_grad(set_to_none=True)
        loss.backward()
        return out["forces"].detach()

    ta, tb, diff = [], [], 0.0
    for k, g in enumerate(graphs):
        order = [(pot_a, ta), (pot_b, tb)] if k % 2 == 0 else [(pot_b, tb), (pot_a, ta)]
        res = {}
        for pot, times in order:
            t = time.perf_counter()
            res[id(pot)] = step(pot, g)
            times.append(time.perf_counter() - t)
        diff = max(diff, float((res[id(pot_a)] - res[id(pot_b)]).abs().max()))
    print(f"first three steps (B compiles here when --compile-b): A {sum(ta[:3]):.1f} s, B {sum(tb[:3]):.1f} s")
    ta, tb = ta[3:], tb[3:]
    ratios = [a / b for a, b in zip(ta, tb)]
    q = statistics.quantiles(ratios, n=4)
    print(
        f"mode={args.mode} threads={args.threads} steps={len(ta)} A={args.base or 'work tree'} B={args.tree or 'work tree'}"
        f"{' compiled' if args.compile_b else ''}"
    )
    print(
        f"A median {1000 * statistics.median(ta):8.1f} ms/step   B median {1000 * statistics.median(tb):8.1f} ms/step"
    )
    print(
        f"speed-up B vs A: median of per-step ratios {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}..{q[2]:.3f}); "
        f"max |ΔF| = {diff:.2e} eV/Å"
    )


if __name__ == "__main__":
    main()
