"""Helpers for the peer adapters (stdlib + numpy + torch + ase only; imported inside a peer's venv).

Every adapter action prints one JSON line prefixed with RESULT: on stdout (read by bench/peers_mf/run.py).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from _common import peak_rss_mb, setup_threads, time_md, versions  # noqa: E402,F401 - shared with the speed peers

MEV = 1000.0


def test_errors(calc, frames) -> dict:
    """r2SCAN test MAE of a calculator: energy per atom (meV/atom), forces per component (meV/Å)."""
    import numpy as np

    de, df, n_f = [], 0.0, 0
    for a in frames:
        ref_e, ref_f = a.info["REF_energy"], a.arrays["REF_forces"]
        b = a.copy()
        b.calc = calc
        de.append(abs(b.get_potential_energy() - ref_e) / len(b))
        df += float(np.abs(b.get_forces() - ref_f).sum())
        n_f += ref_f.size
    return {
        "n": len(frames),
        "energy_mae_meV_per_atom": MEV * float(np.mean(de)),
        "forces_mae_meV_per_A": MEV * df / n_f,
    }


class StepClock:
    """perf_counter() after every optimizer step of any torch optimizer in this process (a global hook),
    so a peer's own training loop can be timed without touching its code."""

    def __init__(self):

        self.ends: list[float] = []
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: self.ends.append(time.perf_counter()))

    def rates(self, batch: int, warmup: int = 5) -> dict:
        t = self.ends[warmup:]
        dt = [b - a for a, b in zip(t, t[1:])]
        if not dt:
            return {}
        return {
            "train_structures_per_s": batch / statistics.median(dt),
            "train_structures_per_s_window": batch * len(dt) / (t[-1] - t[0]),
            "train_steps_timed": len(dt),
        }


def emit(result: dict) -> None:
    result["peak_rss_MB"] = peak_rss_mb()
    result["process_cpu_s"] = time.process_time()
    result["threads_env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    sys.stdout.write("RESULT:" + json.dumps(result) + "\n")
    sys.stdout.flush()
