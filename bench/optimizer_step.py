"""AdamW step time on PaiNN's 40 parameter tensors (594,577 weights): default (per-tensor loop), foreach, fused.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/optimizer_step.py

Runs the three optimizers alternately, 40 steps each, and prints the median step time.
"""

import statistics
import time

import torch

from multifi.config import ModelConfig
from multifi.models.registry import build_potential

torch.set_num_threads(1)
params = [p for p in build_potential(ModelConfig().model_dump(), ["a"]).parameters() if p.requires_grad]
for p in params:
    p.grad = torch.randn_like(p)
opts = {
    k: torch.optim.AdamW(params, lr=1e-4, **kw)
    for k, kw in {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}.items()
}
times = {k: [] for k in opts}
for _ in range(40):
    for k, o in opts.items():
        t = time.perf_counter()
        o.step()
        times[k].append(time.perf_counter() - t)
for k, v in times.items():
    print(f"{k:8s} {1000 * statistics.median(v[5:]):6.2f} ms")
print(f"{len(params)} tensors, {sum(p.numel() for p in params)} weights")
