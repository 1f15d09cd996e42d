"""In-process A/B of the merged loss-backward passes of SiLU and the gates (nn/fused.py, `_hand_over`): M3GNet force
+stress training steps on batches of 32 PBE solids, alternating step by step between the merged passes (A) and the
separate ones (B: every node computes its own part, autograd sums them), same weights and batches.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/merged_backward.py [--steps 60]

Prints the median of per-step thread-CPU ratios B/A (> 1: the merged passes are faster), its quartiles, and the
largest relative difference between the two parameter gradients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch

from multifi.config import ModelConfig
from multifi.data.batch import GraphCollator
from multifi.data.neighbors import NeighborCache
from multifi.data.readers.matpes import read_matpes
from multifi.data.stats import fit_references
from multifi.models.registry import build_potential
from multifi.nn import fused
from multifi.train.loss import MultiFidelityLoss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"  # ../shared/data beside the repository


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = read_matpes(SHARED / "solids" / "PBE.jsonl.gz", stress_order="vasp")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    pot = build_potential(ModelConfig(backbone="m3gnet", features=64).model_dump(), list(ds.fidelities.names))
    refs = fit_references(ds, pairs)
    pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    col = GraphCollator(ds, NeighborCache(ds, 5.0, progress=False))
    loss_fn = MultiFidelityLoss()
    rng = np.random.default_rng(0)
    batches = [col(pairs[rng.choice(len(pairs), 32, replace=False)]) for _ in range(8)]
    merged = fused._hand_over

    def step(g, merge: bool) -> tuple[float, list[torch.Tensor]]:
        fused._hand_over = merged if merge else (lambda owner, parts: False)
        t = time.thread_time()
        out = pot(g, forces=True, stress=True, create_graph=True)
        loss, _ = loss_fn(out, g)
        pot.zero_grad()
        loss.backward()
        dt = time.thread_time() - t
        return dt, [p.grad.clone() for p in pot.parameters() if p.grad is not None]

    for g in batches[:2]:  # warm-up (kernel build, allocator)
        step(g, True), step(g, False)
    ratios, worst = [], 0.0
    for k in range(args.steps):
        g = batches[k % len(batches)]
        order = (True, False) if k % 2 == 0 else (False, True)
        res = {m: step(g, m) for m in order}
        ratios.append(res[False][0] / res[True][0])
        for a, b in zip(res[True][1], res[False][1]):
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    fused._hand_over = merged
    q = statistics.quantiles(ratios, n=4)
    print(
        f"separate / merged thread CPU per step: median {statistics.median(ratios):.3f} "
        f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {args.steps} steps); largest relative gradient difference {worst:.1e}"
    )


if __name__ == "__main__":
    main()
