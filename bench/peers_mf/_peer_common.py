"""Helpers for the peer adapters (stdlib + numpy + torch + ase only; imported inside a peer's venv).

Every adapter action prints one JSON line prefixed with RESULT: on stdout (read by bench/peers_mf/run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Protocol

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


class BudgetReached(Exception):
    """Raised before a training epoch the CPU budget cannot pay for (caught by the adapter)."""


class CpuBudget:
    """The CPU time (time.process_time() of this process, seconds) a peer's training may reach.

    The peers' trainers stop at an epoch count; `begin_epoch()`, hooked in front of every training epoch of the
    peer's own loop, ends training (BudgetReached) when the last epoch's cost (training + validation) would
    take the process past `limit_s`. The peer keeps the best checkpoint it wrote so far."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.epochs = 0
        self.last: float | None = None
        self.stopped = False

    def begin_epoch(self) -> None:
        now = time.process_time()
        cost = 0.0 if self.last is None else now - self.last
        if now + cost > self.limit_s:
            self.stopped = True
            raise BudgetReached(f"CPU budget: {now:.0f} s used, next epoch ≈ {cost:.0f} s, limit {self.limit_s:.0f} s")
        self.last = now
        self.epochs += 1

    def record(self) -> dict:
        return {
            "limit_cpu_s": round(self.limit_s, 1),
            "epochs_trained": self.epochs,
            "stopped_by_budget": self.stopped,
            "process_cpu_s_at_end": round(time.process_time(), 1),
        }


def budget_limit(args, share: float = 1.0, spent_before: float = 0.0) -> float:
    """Process CPU seconds a training stage may reach: `share` of --budget-cpu-s counted from process start,
    plus `spent_before` (CPU of an earlier stage in this process that has its own budget); no limit without
    --budget-cpu-s (smoke runs, speed runs)."""
    if args.budget_cpu_s is None:
        return float("inf")
    return share * args.budget_cpu_s + spent_before


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


class Adapter(Protocol):
    """What an adapter module provides (mace_adapter.py, sevenn_adapter.py)."""

    VARIANTS: list[str]  # the first one is the default, and the model of the speed and params actions
    MODEL: dict  # model settings, printed by `params`
    BATCH: int

    def fit(self, args) -> dict: ...  # one training run (+ test errors unless --no-eval)
    def ensure_model(self, args) -> Path: ...  # a trained model for the speed/params actions
    def calculator(self, path: Path): ...  # an ASE calculator of a trained model
    def count_params(self, path: Path) -> int: ...


def parser(variants: list[str]) -> argparse.ArgumentParser:
    """The options of every adapter (an adapter adds its own)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["fit", "params", "speed_train", "speed_md"])
    ap.add_argument("--variant", default=variants[0], choices=variants)
    ap.add_argument("--n", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-cpu-s", type=float, default=None)
    ap.add_argument("--md-xyz")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--md-steps", type=int, default=100)
    return ap


def quick_fit_args(args, adapter: Adapter, work: Path) -> argparse.Namespace:
    """`args` for the short run behind the speed and params actions: the default variant, one epoch at n = 11,
    seed 0, into `work`, no evaluation."""
    fixed = {"n": 11, "seed": 0, "epochs": 1, "work": str(work), "no_eval": True, "smoke": False}
    return argparse.Namespace(**vars(args) | fixed | {"variant": adapter.VARIANTS[0]})


def speed_train(args, adapter: Adapter) -> dict:
    """Training structures/s of its own trainer (optimizer-step intervals) over one epoch of PBE + r2SCAN (n = 11)."""
    work = Path(args.work) / f"speed_{os.getpid()}"
    out = adapter.fit(quick_fit_args(args, adapter, work))
    shutil.rmtree(work, ignore_errors=True)
    return out["train_rates"] | {"params": out["params"], "batch": adapter.BATCH}


def speed_md(args, adapter: Adapter) -> dict:
    import ase.io

    path = adapter.ensure_model(args)
    out = time_md(ase.io.read(args.md_xyz), adapter.calculator(path), args.md_steps)
    out["params"] = adapter.count_params(path)
    return out


def run(args, adapter: Adapter, framework: str, package_versions: dict) -> None:
    """One thread, warnings off, the action → one RESULT line."""
    setup_threads(1)
    warnings.filterwarnings("ignore")
    if args.action == "fit":
        out = adapter.fit(args)
    elif args.action == "params":
        out = {"params": adapter.count_params(adapter.ensure_model(args)), "model": adapter.MODEL}
    elif args.action == "speed_train":
        out = speed_train(args, adapter)
    else:
        out = speed_md(args, adapter)
    out.update(framework=framework, action=args.action, versions=package_versions)
    emit(out)
