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
    ap.add_argument(
        "--ab-onednn",
        action="store_true",
        help="alternate steps with multifi.nn.onednn.ONEDNN off / on and report both columns",
    )
    ap.add_argument(
        "--ab-sparse",
        action="store_true",
        help="alternate steps with PaiNN.sparse_direction off / on and report both columns",
    )
    args = ap.parse_args()
    import torch
    from profile_painn import setup, train_step
    from torch.utils._python_dispatch import TorchDispatchMode

    from multifi.models.painn import PaiNN

    try:
        import multifi.nn.onednn as dnn
    except ImportError:  # an older source tree (PYTHONPATH=...): torch's own products only
        import types

        dnn = types.SimpleNamespace(ONEDNN=False)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pot, collate, batches, loss_fn = setup(features=args.features, interactions=args.interactions)
    opt = torch.optim.AdamW(pot.parameters(), lr=5e-4, fused=True)
    acc, calls = collections.defaultdict(float), collections.Counter()
    side = {"name": "on"}

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            t = time.thread_time()
            out = func(*a, **(kw or {}))
            key = (side["name"], str(func.overloadpacket.__name__))
            if args.shapes:
                key = key[:1] + (key[1] + " " + str([tuple(x.shape) for x in a if isinstance(x, torch.Tensor)]),)
            acc[key] += time.thread_time() - t
            calls[key] += 1
            return out

    step = train_step(pot, opt, loss_fn, args.forces)

    graphs = [collate(p) for p in batches(args.steps + 3)]
    for g in graphs[:3]:
        step(g)
    ab = args.ab_onednn or args.ab_sparse
    what = "sparse direction sum" if args.ab_sparse else "oneDNN"
    sides = ["off", "on"] if ab else ["on" if dnn.ONEDNN else "off"]
    steps = {s: [] for s in sides}
    for k, g in enumerate(graphs[3:]):
        for name in sides if k % 2 == 0 else sides[::-1]:
            side["name"] = name
            if args.ab_sparse:
                PaiNN.sparse_direction = name == "on"
            elif ab:
                dnn.ONEDNN = name == "on"
            c = time.thread_time()
            with Timer():
                step(g)
            steps[name].append(time.thread_time() - c)
    print(
        f"PaiNN {args.features}x{args.interactions} {'forces' if args.forces else 'energy'} training, "
        f"{args.steps} steps, load {os.getloadavg()[0]:.1f}; ms/step of thread CPU time, {what} " + " / ".join(sides)
    )
    for name in sides:
        tot = sum(v for k, v in acc.items() if k[0] == name)
        print(
            f"  {what} {name}: step {1e3 * statistics.median(steps[name]):.1f} (median, with the timing wrapper), "
            f"ATen ops {1e3 * tot / args.steps:.1f}"
        )
    ops = collections.defaultdict(dict)
    for (name, op), v in acc.items():
        ops[op][name] = v
    for op, d in sorted(ops.items(), key=lambda kv: -max(kv[1].values()))[: args.rows]:
        cols = " ".join(f"{1e3 * d.get(n, 0.0) / args.steps:8.2f}" for n in sides)
        print(f"{cols}   {max(calls[(n, op)] for n in sides) / args.steps:6.1f} calls  {op}")


if __name__ == "__main__":
    main()
