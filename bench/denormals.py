"""Does flushing denormal floats speed up the eager M3GNet training step? A/B in one process, batch by batch:
the same force+stress training step (64 features, batches of 32 PBE solids of bench/profile_m3gnet.py) with
torch.set_flush_denormal(False) and (True), thread CPU time, alternating.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/denormals.py [--batches 8] [--repeats 2]
"""

import argparse
import runpy
import sys
from pathlib import Path

import numpy as np
import torch

args = argparse.ArgumentParser()
args.add_argument("--batches", type=int, default=8)
args.add_argument("--repeats", type=int, default=2)
opts = args.parse_args()
sys.argv = [sys.argv[0]]  # profile_m3gnet.py reads --ops from argv
setup = runpy.run_path(str(Path(__file__).with_name("profile_m3gnet.py")))  # builds the model and batches, times them
gs = setup["gs"]


step = setup["training_step_seconds"]  # one training step's thread CPU seconds


ratios = []
for rep in range(opts.repeats):
    for k, g in enumerate(gs[: opts.batches]):
        torch.set_flush_denormal(False)
        a = step(g)
        torch.set_flush_denormal(True)
        b = step(g)
        ratios.append(a / b)
        print(f"repeat {rep} batch {k} ({g.edge_index.shape[1]} edges): {1e3 * a:.0f} ms, flushed {1e3 * b:.0f} ms")
q = np.percentile(ratios, [25, 50, 75])
print(f"speed-up from flushing denormals: median {q[1]:.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}) over {len(ratios)} pairs")
