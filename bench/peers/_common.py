"""Helpers shared by the per-framework benchmark scripts (stdlib + torch + lightning + ase only).

Each script in bench/peers/ runs inside one framework's virtual environment (ours: .venv; a peer:
bench/.venv-peers-<peer>) and prints exactly one JSON line prefixed with RESULT: on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
import warnings

# the same model and data settings on both sides (issue 5)
FEATURES, INTERACTIONS, CUTOFF, N_RBF, BATCH = 128, 3, 5.0, 20, 32
FEATURES = int(os.environ.get("BENCH_PAINN_FEATURES", FEATURES))  # harness --painn-features (both sides)
LR = 5e-4


def setup_threads(threads: int) -> None:
    """Pin the intra-op thread count (OMP_NUM_THREADS and OMP_WAIT_POLICY are set by the harness)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def step_timer():
    """A Lightning callback recording perf_counter() after every training batch (end of optimizer step)."""
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # schnetpack uses the pytorch_lightning namespace
        from pytorch_lightning.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    return StepTimer()


def parser(steps: int, md_steps: int) -> argparse.ArgumentParser:
    """The options every side takes (each script adds its data options)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["train", "md"], required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md-xyz")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--md-steps", type=int, default=md_steps)
    return ap


def run(args, train, md, framework: str, **fields) -> None:
    """Threads pinned, Lightning and warnings quiet, then train(args) or md(args) → one RESULT line with `fields`."""
    setup_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = train(args) if args.task == "train" else md(args)
    import torch

    out.update(framework=framework, task=args.task, threads=torch.get_num_threads(), **fields)
    emit(out)


def trainer_kwargs(args, callbacks: list) -> dict:
    """Lightning Trainer settings of every side: warmup + steps optimizer steps on the CPU, training only."""
    return dict(
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        inference_mode=False,
    )


def model_only_rate(params, batches: list, loss_of) -> float:
    """Structures/s of forward + loss + backward + AdamW on pre-collated batches (no data loading, no Lightning):
    two passes over `batches`, the median step after the first 5."""
    import torch

    opt = torch.optim.AdamW(params, lr=LR)
    dts = []
    for _rep in range(2):
        for b in batches:
            t = time.perf_counter()
            loss = loss_of(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dts.append(time.perf_counter() - t)
    return BATCH / statistics.median(dts[5:])


def train_rates(ends: list[float], warmup: int, batch: int) -> dict:
    """Intervals between consecutive step ends (each = fetch+collate next batch, forward, loss, backward,
    optimizer, callbacks) after `warmup` steps → structures/s (median interval and whole window)."""
    t = ends[warmup:]
    dt = [b - a for a, b in zip(t, t[1:])]
    return {
        "train_structures_per_s": batch / statistics.median(dt),
        "train_structures_per_s_window": batch * len(dt) / (t[-1] - t[0]),
        "train_steps_timed": len(dt),
    }


def time_md(atoms, calc, steps: int, warmup: int = 20, dt_fs: float = 0.5) -> dict:
    """NVE VelocityVerlet through an ASE calculator: MD steps/s over `steps` after `warmup` steps."""
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
    return {
        "md_steps_per_s": steps / seconds,
        "md_steps": steps,
        "md_atoms": len(atoms),
        "md_energy_drift_eV": float(atoms.get_total_energy() - e0),
        "md_final_T_K": float(atoms.get_temperature()),
    }


THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "MKL_ENABLE_INSTRUCTIONS",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "KMP_AFFINITY",
    "GOMP_CPU_AFFINITY",
)


def cpu_env() -> dict:
    """What decides CPU kernel speed: CPU model, torch's vectorisation level, BLAS / oneDNN builds, threads."""
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    libs = [
        ln.strip(" -")
        for ln in torch.__config__.show().splitlines()
        if any(k in ln for k in ("Math Kernel Library", "MKL-DNN", "oneDNN", "OpenBLAS", "BLAS_INFO"))
    ]
    blas = [x for x in libs if "BLAS_INFO" not in x]
    return {
        "cpu": model,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas_onednn": blas,
        "mkldnn_enabled": torch.backends.mkldnn.is_available(),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }


def emit(result: dict) -> None:
    result["peak_rss_MB"] = peak_rss_mb()
    result["threads_env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    result["cpu_env"] = cpu_env()
    sys.stdout.write("RESULT:" + json.dumps(result) + "\n")
    sys.stdout.flush()
