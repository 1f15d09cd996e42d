"""CPU time of float32 matrix products with one narrow side, by its width: why M3GNet pads its three-body features.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/thin_products.py [--rows 1696] [--widths 9,16]

For a width d and M rows (M3GNet's three-body bonds of a batch of 32 PBE solids: ~1 700), the three products of a
linear layer d → 64 in training: forward [M, d] × [d, 64], input gradient [M, 64] × [64, d] and weight gradient
[64, M] × [M, d] (torch.mm, i.e. MKL), thread CPU time, median of --reps calls. With d = 9 the two gradients run
3-4× slower than with d = 16 although they do fewer operations (see bench/RESULTS.md), so `GatedMLP.padded` zero-pads
the 9 features to 16 (same values).
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


def median_us(fn, reps: int) -> float:
    """Median thread-CPU microseconds of fn() over `reps` calls after 20 untimed ones."""
    return 1e6 * median_time(fn, reps, 20, clock=time.thread_time)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1696)
    ap.add_argument("--widths", default="9,16")
    ap.add_argument("--reps", type=int, default=300)
    opts = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = opts.rows
    for d in (int(w) for w in opts.widths.split(",")):
        x, w, dy, wt = torch.randn(m, d), torch.randn(d, 64), torch.randn(m, 64), torch.randn(64, d)
        times = {
            "forward [M,d]x[d,64]": median_us(lambda x=x, w=w: torch.mm(x, w), opts.reps),
            "input gradient [M,64]x[64,d]": median_us(lambda dy=dy, wt=wt: torch.mm(dy, wt), opts.reps),
            "weight gradient [64,M]x[M,d]": median_us(lambda dy=dy, x=x: torch.mm(dy.t(), x), opts.reps),
        }
        row = ", ".join(f"{k} {v:.1f} us" for k, v in times.items())
        print(f"d = {d}, M = {m}: {row}, sum {sum(times.values()):.1f} us; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
