"""Rates of M3GNet's dominant products and of a sigmoid pass with operands in cache (the same tensors every call, as
isolated benchmarks run them) and out of it (a new pair of tensors each call, cycling through --pool of them, ~1 MB
each: the way a training step meets them, long after the forward pass wrote them).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/cold_operands.py [--rows 3948] [--pool 120]

Products: [M, 64] × [64, 64] (a layer's forward and its input gradient) and the weight gradient [64, M] × [M, 64]
(torch.mm, i.e. MKL), float32; elementwise: torch's sigmoid and multifi's silu_grad kernel (three tensors read, one
written). Thread CPU time, median over --reps calls after 20 untimed ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3948, help="M: edges of a batch of 32 PBE solids")
    ap.add_argument("--pool", type=int, default=120, help="tensors cycled through for out-of-cache operands")
    ap.add_argument("--reps", type=int, default=240)
    opts = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xs = [torch.randn(opts.rows, 64) for _ in range(opts.pool)]
    gs = [torch.randn(opts.rows, 64) for _ in range(opts.pool)]
    w = torch.randn(64, 64)
    calls = {"k": 0}

    def cycling(fn):
        def call():
            k = calls["k"] = (calls["k"] + 1) % opts.pool
            fn(k)

        return call

    cases = {
        "forward [M, 64] × [64, 64]": lambda k: torch.mm(xs[k], w),
        "weight gradient [64, M] × [M, 64]": lambda k: torch.mm(gs[k].t(), xs[(k + 7) % opts.pool]),
        "sigmoid [M, 64]": lambda k: torch.sigmoid(xs[k]),
    }
    from multifi.nn import fused

    if fused.available():  # an elementwise kernel that reads three [M, 64] tensors and writes one
        ss = [torch.sigmoid(x) for x in xs]
        cases["silu_grad [M, 64] (multifi's kernel)"] = lambda k: torch.ops.multifi_fused.silu_grad(
            xs[k], ss[k], gs[(k + 7) % opts.pool]
        )
    flop = 2 * opts.rows * 64 * 64
    print(f"M = {opts.rows}, {opts.pool} tensors of {opts.rows * 64 * 4 / 2**20:.2f} MB; load {os.getloadavg()[0]:.1f}")
    for name, fn in cases.items():
        hot = median_time(lambda fn=fn: fn(0), opts.reps, 20, clock=time.thread_time)
        cold = median_time(cycling(fn), opts.reps, 20, clock=time.thread_time)
        if not name.startswith(("forward", "weight")):
            print(f"{name:36s} in cache {1e6 * hot:6.1f} µs, out of cache {1e6 * cold:6.1f} µs")
        else:
            print(f"{name:36s} in cache {flop / hot / 1e9:5.1f} GFLOP/s, out of cache {flop / cold / 1e9:5.1f} GFLOP/s")


if __name__ == "__main__":
    main()
