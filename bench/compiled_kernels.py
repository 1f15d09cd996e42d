"""Where the compiled M3GNet training step spends the time that is not matrix products (bench/flops.py's setup:
64×3, batches of 32 PBE solids, energy + forces + stress), and what a cheaper exp would buy there:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/compiled_kernels.py [--steps 8] [--profile]
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/compiled_kernels.py --fast-exp

Prints the median wall time per step (after 6 compiling and settling steps). --profile: then torch.profiler's
table by self CPU time with inductor's kernels named one by one (cpp.enable_kernel_profile), the products
(aten::mm/addmm) and copies. --fast-exp: inductor's vectorised exp and sigmoid through ATen's exp_u20 (a
polynomial exp within 20 ULP) instead of Sleef's 1-ULP exp; caches off, so that the kernels are generated anew
(run it alternating with a plain run with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, for the same compile settings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def use_fast_exp() -> None:
    """Inductor's C++ vector code: exp → exp_u20, sigmoid through it (before anything is compiled)."""
    from torch._inductor.codegen import cpp

    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    cpp.CppVecOverrides.exp = staticmethod(lambda x: f"{x}.exp_u20()")
    cpp.CppVecOverrides.sigmoid = staticmethod(lambda x: f"decltype({x})(1)/(decltype({x})(1) + {x}.neg().exp_u20())")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--fast-exp", action="store_true")
    opts = ap.parse_args()
    if opts.fast_exp:
        use_fast_exp()
    import torch._inductor.config as inductor
    from flops import m3gnet_training

    from multifi.allocator import retain_freed_memory

    inductor.cpp.enable_kernel_profile = opts.profile
    retain_freed_memory()
    pot, step, graphs = m3gnet_training(opts.steps + 6)
    pot.use_compile = True
    for g in graphs[:6]:  # compiles, then settles
        step(g)
    times = []
    for g in graphs[6:]:
        start = time.perf_counter()
        step(g)
        times.append(time.perf_counter() - start)
    print(f"{'fast exp' if opts.fast_exp else 'exp'}: median {1e3 * statistics.median(times):.1f} ms per step")
    if opts.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for g in graphs[6:]:
                step(g)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
