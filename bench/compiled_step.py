"""Median thread-CPU time of the compiled M3GNet force+stress training step (bench/flops.py's setup: 64×3, batches of 32
PBE solids, AdamW), glibc's allocator thresholds set as training sets them, optionally under inductor settings:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/compiled_step.py [--steps 40] [cpp_wrapper=True ...]

Each KEY=VALUE sets torch._inductor.config.KEY (dotted keys reach sub-configs) before compiling. Compare revisions in
alternating processes with PYTHONPATH=<worktree of REV>/src.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("settings", nargs="*", help="inductor config KEY=VALUE")
    opts = ap.parse_args()
    import torch._inductor.config as inductor
    from flops import m3gnet_training, thread_times

    from multifi.allocator import retain_freed_memory

    retain_freed_memory()
    for setting in opts.settings:
        key, value = setting.split("=", 1)
        *path, name = key.split(".")
        target = inductor
        for part in path:
            target = getattr(target, part)
        setattr(target, name, ast.literal_eval(value))
    pot, step, graphs = m3gnet_training(opts.steps + 3)
    pot.use_compile = True
    t = time.time()
    step(graphs[0])
    first = time.time() - t
    cpu = sorted(thread_times(step, graphs))
    n = len(cpu)
    print(
        f"{' '.join(opts.settings) or 'defaults'}: first step {first:.1f} s; median step {1e3 * statistics.median(cpu):.1f} ms "
        f"(quartiles {1e3 * cpu[n // 4]:.1f}-{1e3 * cpu[3 * n // 4]:.1f}); load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
