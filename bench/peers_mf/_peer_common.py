"""Helpers for the peer adapters (stdlib + numpy + torch + ase only; imported inside a peer's venv).

Every adapter action prints one JSON line prefixed with RESULT: on stdout (read by bench/peers_mf/run.py).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

MEV = 1000.0


def setup_threads(threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


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
    return {"n": len(frames), "energy_mae_meV_per_atom": MEV * float(np.mean(de)),
            "forces_mae_meV_per_A": MEV * df / n_f}


class StepClock:
    """perf_counter() after every optimizer step of any torch optimizer in this process (a global hook),
    so a peer's own training loop can be timed without touching its code."""

    def __init__(self):
        import torch

        self.ends: list[float] = []
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(
            lambda opt, args, kwargs: self.ends.append(time.perf_counter()))

    def rates(self, batch: int, warmup: int = 5) -> dict:
        t = self.ends[warmup:]
        dt = [b - a for a, b in zip(t, t[1:])]
        if not dt:
            return {}
        return {"train_structures_per_s": batch / statistics.median(dt),
                "train_structures_per_s_window": batch * len(dt) / (t[-1] - t[0]), "train_steps_timed": len(dt)}


def time_md(atoms, calc, steps: int, warmup: int = 20, dt_fs: float = 0.5) -> dict:
    """NVE VelocityVerlet through an ASE calculator: MD steps/s over `steps` after `warmup` steps
    (the same as bench/peers/_common.py)."""
    import numpy as np
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    md = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    md.run(warmup)
    e0 = atoms.get_total_energy()
    t0 = time.perf_counter()
    md.run(steps)
    seconds = time.perf_counter() - t0
    return {"md_steps_per_s": steps / seconds, "md_steps": steps, "md_atoms": len(atoms),
            "md_energy_drift_eV": float(atoms.get_total_energy() - e0), "md_final_T_K": float(atoms.get_temperature())}


def emit(result: dict) -> None:
    result["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["process_cpu_s"] = time.process_time()
    result["threads_env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    sys.stdout.write("RESULT:" + json.dumps(result) + "\n")
    sys.stdout.flush()
