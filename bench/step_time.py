"""Median thread-CPU time of M3GNet's force+stress training step (64 features, batches of 32 PBE solids, the setup
of bench/profile_m3gnet.py) with whichever multifi is imported: for changes outside models/m3gnet.py (the kernels in
nn/), which bench/ab_m3gnet.py cannot swap in one process. Compare revisions in alternating processes:

    git worktree add /tmp/wt_old REV
    PYTHONPATH=/tmp/wt_old/src OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/step_time.py
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/step_time.py     (repeat both, in turn)
"""

import argparse
import runpy
import statistics
import sys
from pathlib import Path

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--chunks", type=int, default=0, help="also print the median of each run of this many steps")
ap.add_argument("--batch", type=int, default=32, help="structures per batch (13 random batches)")
opts = ap.parse_args()
sys.argv = [sys.argv[0]]  # profile_m3gnet.py reads --ops from argv
setup = runpy.run_path(str(Path(__file__).with_name("profile_m3gnet.py")))  # model, batches, its short profile
import multifi  # noqa: E402

step, graphs = setup["training_step_seconds"], setup["gs"]
if opts.batch != 32:  # the step's fixed cost shows as the time of small batches
    rng = np.random.default_rng(0)
    pairs = setup["pairs"]
    graphs = [setup["col"](pairs[rng.choice(len(pairs), opts.batch, replace=False)]) for _ in range(13)]
times = [step(graphs[k % len(graphs)]) for k in range(opts.steps)]
edges = statistics.mean(int(g.edge_index.shape[1]) for g in graphs)
print(
    f"{multifi.__file__}: median training step {1e3 * statistics.median(times[5:]):.1f} ms (thread CPU), "
    f"batches of {opts.batch} structures, {edges:.0f} edges on average"
)
if opts.chunks:  # how the same process's step time moves over the run (the host's load)
    runs = [times[i : i + opts.chunks] for i in range(0, len(times) - opts.chunks + 1, opts.chunks)]
    print(
        f"medians of {opts.chunks}-step runs: " + " / ".join(f"{1e3 * statistics.median(r):.1f}" for r in runs) + " ms"
    )
