"""EMA update of PotentialModule: per-tensor loop (before) vs torch._foreach_lerp_ (now), PaiNN 64×3 and 128×3.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ema_update.py

Alternates the two, 200 updates each, and prints median thread CPU times and the largest difference.
"""

import copy
import statistics
import time

import torch

from multifi.config import ModelConfig
from multifi.models.registry import build_potential

torch.set_num_threads(1)
for features in (64, 128):
    pot = build_potential(ModelConfig(features=features).model_dump(), ["a", "b"])
    ema_a, ema_b = copy.deepcopy(pot).requires_grad_(False), copy.deepcopy(pot).requires_grad_(False)
    times = {"loop": [], "foreach": []}
    with torch.no_grad():
        for step in range(200):
            for p in pot.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
            w = 1 - min(0.99, (1 + step) / (10 + step))
            t = time.thread_time()
            for pe, p in zip(ema_a.parameters(), pot.parameters()):
                pe.lerp_(p.detach(), w)
            for be, b in zip(ema_a.buffers(), pot.buffers()):
                be.copy_(b)
            times["loop"].append(time.thread_time() - t)
            t = time.thread_time()
            torch._foreach_lerp_(list(ema_b.parameters()), [p.detach() for p in pot.parameters()], w)
            torch._foreach_copy_(list(ema_b.buffers()), list(pot.buffers()))
            times["foreach"].append(time.thread_time() - t)
    pairs = zip(ema_a.state_dict().values(), ema_b.state_dict().values())
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)  # buffers include bool (fitted)
    n = sum(1 for _ in pot.parameters())
    print(
        f"PaiNN {features}x3 ({n} tensors): "
        + ", ".join(f"{k} {1e3 * statistics.median(v[10:]):.3f} ms" for k, v in times.items())
        + f"; max |difference| {diff:.1e}"
    )
