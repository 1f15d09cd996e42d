"""CPU time per ATen operator of PaiNN training steps, robust to a shared machine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/op_cpu_time.py [--features 64] [--interactions 3] [--steps 10]
        [--forces] [--shapes] [--rows 25]

torch.profiler reports wall-clock time, which other processes on the same cores inflate. This wraps
every ATen call of forward + loss + backward + AdamW (a TorchDispatchMode, 1 thread) in
time.thread_time(), i.e. the CPU time the step's own thread spent in it, and sums per operator
(and input shapes with --shapes). Memory-bandwidth contention still shows; time-slicing does not.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--interactions", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--forces", action="store_true")
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from profile_painn import setup

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pot, collate, batches, loss_fn = setup(features=args.features, interactions=args.interactions)
    opt = torch.optim.AdamW(pot.parameters(), lr=5e-4, fused=True)
    acc, calls = collections.defaultdict(float), collections.Counter()

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            t = time.thread_time()
            out = func(*a, **(kw or {}))
            key = str(func.overloadpacket.__name__)
            if args.shapes:
                key += " " + str([tuple(x.shape) for x in a if isinstance(x, torch.Tensor)])
            acc[key] += time.thread_time() - t
            calls[key] += 1
            return out

    def step(g):
        if args.forces:
            out = pot(g, forces=True, create_graph=True)
            loss = ((out["energy"] - g.energy) / g.n_atoms).pow(2).mean().float() + out["forces"].pow(2).mean()
        else:
            loss, _ = loss_fn(pot(g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    graphs = [collate(p) for p in batches(args.steps + 3)]
    for g in graphs[:3]:
        step(g)
    steps = []
    for g in graphs[3:]:
        c = time.thread_time()
        with Timer():
            step(g)
        steps.append(time.thread_time() - c)
    total = sum(acc.values())
    print(f"PaiNN {args.features}x{args.interactions} {'forces' if args.forces else 'energy'} training, "
          f"{args.steps} steps: step CPU {1e3 * statistics.median(steps):.1f} ms (median, with the timing wrapper), "
          f"ATen ops {1e3 * total / args.steps:.1f} ms/step; load {os.getloadavg()[0]:.1f}")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1])[:args.rows]:
        print(f"{1e3 * v / args.steps:8.2f} ms/step {100 * v / total:5.1f} %  {calls[k] / args.steps:6.1f} calls  {k}")


if __name__ == "__main__":
    main()
