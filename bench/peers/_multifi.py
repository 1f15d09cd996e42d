"""The multifi side of the speed benchmarks (runs in the repository's .venv): multifi_painn.py and
multifi_m3gnet.py differ only in their data, model and whether forces are trained.

train: our normal training path — dataset → MultiFidelityData (neighbour lists computed once per
       structure and cached: fixed geometries) → GraphCollator → PotentialModule (AdamW, EMA 0.99, grad
       clip 10: the train-config defaults) → Lightning Trainer.fit; then model-only steps (pre-collated
       batches, manual AdamW loop) and inference (a fresh NeighborCache for all structures + one pass).
md:    multifi.Calculator on one structure, VelocityVerlet 0.5 fs, forces by autograd (MULTIFI_BENCH_AOT=1: the
       ahead-of-time compiled calculator, aot=True, built during the warm-up steps; MULTIFI_BENCH_SCRIPT=1: the
       scripted model, script=True, built during the warm-up steps; otherwise script=False).
"""

from __future__ import annotations

import contextlib
import os
import time

import _common as C


def all_pairs(ds):
    """(structure, fidelity 0) for every structure [S, 2]."""
    import numpy as np

    return np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)


def build(ds, model: dict):
    """A PotentialModule of `model` (ModelConfig fields) with reference energies fitted on all of `ds`."""
    from multifi.config import LossConfig, ModelConfig, TrainConfig
    from multifi.data.stats import fit_references
    from multifi.train.module import PotentialModule

    spec = {"model": ModelConfig(**model).model_dump(), "fidelities": list(ds.fidelities.names)}
    train_cfg = TrainConfig(lr=C.LR, batch_size=C.BATCH).model_dump()
    module = PotentialModule(spec, LossConfig().model_dump(), train_cfg)
    refs = fit_references(ds, all_pairs(ds))  # as `multifi train` fits and sets them
    module.potential.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    module.sync_ema()
    return module


def task_train(
    args, ds, model: dict, forces: bool, model_batches: int, neighbor_time: bool = False, stress: bool = True
) -> dict:
    """Training, model-only and inference structures/s.

    forces: train on energies, forces and (stress: periodic data) stress (create_graph, double backward) and infer them (a
    compiled potential compiles its inference graph before the timed pass); else energy only, inference
    under no_grad. model_batches: pre-collated batches of the model-only loop. neighbor_time: also report
    the seconds spent building the neighbour-list cache (neighbor_cache_s)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import NeighborCache
    from multifi.train.datamodule import MultiFidelityData, PairDataset

    pairs = all_pairs(ds)
    module = build(ds, model)
    cutoff = model["cutoff"]
    t0 = time.perf_counter()
    data = MultiFidelityData(
        ds,
        {"train": pairs, "val": pairs[:0], "test": pairs[:0]},
        cutoff,
        C.BATCH,
        num_workers=getattr(args, "workers", 0),
        seed=0,
        progress=False,
    )
    nl_seconds = time.perf_counter() - t0
    timer = C.step_timer()
    trainer = L.Trainer(
        **C.trainer_kwargs(args, [timer]), gradient_clip_val=module.train_cfg.grad_clip, precision="32-true"
    )
    trainer.fit(module, datamodule=data)
    out = C.train_rates(timer.ends, args.warmup, C.BATCH)
    if neighbor_time:
        out["neighbor_cache_s"] = nl_seconds

    pot, loss_fn = module.potential.train(), module.loss_fn
    outputs = {"forces": True, "stress": stress} if forces else {}
    batches = [g for g, _ in zip(data.train_dataloader(), range(model_batches))]
    out["model_only_structures_per_s"] = C.model_only_rate(
        pot.parameters(), batches, lambda g: loss_fn(pot(g, **outputs, create_graph=True), g)[0]
    )

    pot.eval()
    if forces and pot.use_compile:  # compile the inference graph outside the timed pass
        pot(batches[0], **outputs)
    t0 = time.perf_counter()
    nc = NeighborCache(ds, cutoff, progress=False)
    loader = DataLoader(PairDataset(pairs), batch_size=C.BATCH, shuffle=False, collate_fn=GraphCollator(ds, nc))
    with contextlib.nullcontext() if forces else torch.no_grad():
        for g in loader:
            pot(g, **outputs)
    out["infer_structures_per_s"] = len(ds) / (time.perf_counter() - t0)
    out["n_structures"], out["mean_atoms"] = len(ds), float(ds.n_atoms.mean())
    out["params"] = sum(p.numel() for p in pot.parameters())
    return out


def task_md(args, ds, model: dict) -> dict:
    import ase.io

    from multifi.calculator import Calculator

    aot = os.environ.get("MULTIFI_BENCH_AOT") == "1"  # ahead-of-time compiled calculator (built in the warm-up)
    # MULTIFI_BENCH_SCRIPT=1: the scripted model from the first call (built in the warm-up), what a default
    # calculator switches to in a longer run; otherwise eager throughout (no switch inside the timed steps)
    script = os.environ.get("MULTIFI_BENCH_SCRIPT") == "1"
    calc = Calculator(build(ds, model).potential, fidelity=ds.fidelities.names[0], aot=aot, script=script)
    out = C.time_md(ase.io.read(args.md_xyz), calc, args.md_steps)
    return {**out, "md_model": "aot" if aot else "scripted" if script else "eager"}


def run(args, load, model, **train) -> None:
    """`load(args)` → dataset, `model()` → ModelConfig fields; train: task_train's options."""
    import multifi

    C.run(
        args,
        lambda a: task_train(a, load(a), model(), **train),
        lambda a: task_md(a, load(a), model()),
        framework="multifi",
        source=multifi.__file__,
        versions=C.versions("multifi", "torch", "lightning", "numpy", "ase", "vesin"),
    )
