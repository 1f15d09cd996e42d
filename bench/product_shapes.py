"""Matrix products of one M3GNet force+stress training step by shape: CPU time and GFLOP/s (torch.profiler self CPU
time of aten::mm/addmm with input shapes), eager or compiled, glibc's allocator thresholds set as training sets them:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/product_shapes.py [--compile] [--steps 1]

bench/flops.py's setup (64×3, batches of 32 PBE solids, AdamW); 3 untimed steps first (where the compiled model compiles).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=1)
    opts = ap.parse_args()
    from flops import m3gnet_training
    from torch.profiler import ProfilerActivity, profile

    from multifi.allocator import retain_freed_memory

    retain_freed_memory()
    pot, step, graphs = m3gnet_training(opts.steps + 3)
    pot.use_compile = opts.compile
    for g in graphs[:3]:
        step(g)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for g in graphs[3:]:
            step(g)
    print("edges per batch:", [int(g.edge_index.shape[1]) for g in graphs[3:]])
    rows = []
    for r in prof.key_averages(group_by_input_shape=True):
        if r.key not in ("aten::mm", "aten::addmm"):
            continue
        a, b = (r.input_shapes[0], r.input_shapes[1]) if r.key == "aten::mm" else (r.input_shapes[1], r.input_shapes[2])
        flop = 2 * a[0] * a[1] * b[1] * r.count
        ms = r.self_cpu_time_total / 1e3 / opts.steps
        rows.append((ms, r.count // opts.steps, r.key, f"{a} x {b}", flop / (r.self_cpu_time_total * 1e-6) / 1e9))
    print(f"products: {sum(r[0] for r in rows):.1f} ms per step")
    for ms, count, key, shape, rate in sorted(rows, reverse=True)[:25]:
        print(f"{ms:7.2f} ms {count:4d} {key:11s} {shape:28s} {rate:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
