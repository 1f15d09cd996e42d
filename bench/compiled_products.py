"""The products (aten::mm / addmm) of the compiled M3GNet force+stress training step grouped by shape and operand
layout, with their time and rate under torch.profiler (bench/flops.py's setup: 64×3, batches of 32 PBE solids):

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/compiled_products.py [--steps 6]

E stands for an edge-sized dimension (> 1000 rows); "T" marks an operand read transposed (stride 1 along its rows).
The profiler's own cost inflates every time a little; the rates are for comparing groups with each other.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    opts = ap.parse_args()
    from flops import m3gnet_training
    from torch.profiler import ProfilerActivity, profile

    from multifi.allocator import retain_freed_memory

    retain_freed_memory()
    pot, step, graphs = m3gnet_training(opts.steps + 6)
    pot.use_compile = True
    for g in graphs[:6]:  # compiles, then settles
        step(g)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for g in graphs[6:]:
            step(g)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    groups = collections.defaultdict(lambda: [0.0, 0, 0.0])  # ms, calls, GFLOP
    total = 0.0
    for e in events:
        if e.get("name") not in ("aten::mm", "aten::addmm"):
            continue
        dims, strides = e["args"]["Input Dims"], e["args"]["Input Strides"]
        first = 0 if e["name"] == "aten::mm" else 1
        (m, k), (_, n) = dims[first], dims[first + 1]
        sa, sb = strides[first], strides[first + 1]
        size = lambda x: "E" if x > 1000 else str(x)  # noqa: E731
        layout = ("T" if sa[0] == 1 and m > 1 else "N") + ("T" if sb[0] == 1 and k > 1 else "N")
        key = f"{e['name']:<11} [{size(m)}, {size(k)}] × [{size(k)}, {size(n)}] {layout}"
        g = groups[key]
        g[0] += e["dur"] / 1e3 / opts.steps
        g[1] += 1
        g[2] += 2 * m * k * n / 1e9 / opts.steps
        total += e["dur"] / 1e3 / opts.steps
    print(f"products: {total:.1f} ms per step (profiled)")
    for key, (ms, calls, gflop) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"{ms:7.2f} ms  {calls // opts.steps:4d} per step  {gflop / ms * 1e3:6.1f} GFLOP/s  {key}")


if __name__ == "__main__":
    main()
