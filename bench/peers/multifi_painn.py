"""multifi side of the PaiNN A/B benchmark (runs in the repository's .venv). Started by bench/harness.py.

    python bench/peers/multifi_painn.py --task train|md --threads T --n N --labels GFN2-xTB.csv.gz
                                        [--md-xyz molecule.xyz] [--compile]

train: our normal training path — read_qm9 → FidelityDataset → MultiFidelityData (neighbour lists
       computed once per structure and cached: fixed geometries) → GraphCollator → PotentialModule
       (AdamW, EMA 0.99, grad clip 10: the train-config defaults) → Lightning Trainer.fit. One step
       = fetch + collate the next batch, forward, loss, backward, optimizer, EMA, Lightning hooks.
       Then model-only steps (pre-collated batches, manual AdamW loop) and inference: a fresh
       NeighborCache for all N molecules + one pass over them (batch 32, no_grad, energy only).
md:    multifi.Calculator on one QM9 molecule, VelocityVerlet 0.5 fs, forces by autograd.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402


def build(ds, pairs):
    from multifi.config import LossConfig, ModelConfig, TrainConfig
    from multifi.models.head import fit_baseline
    from multifi.train.module import PotentialModule

    model = ModelConfig(features=C.FEATURES, interactions=C.INTERACTIONS, cutoff=C.CUTOFF, n_rbf=C.N_RBF).model_dump()
    spec = {"model": model, "fidelities": list(ds.fidelities.names)}
    train_cfg = TrainConfig(lr=C.LR, batch_size=C.BATCH).model_dump()
    module = PotentialModule(spec, LossConfig().model_dump(), train_cfg)
    module.potential.head.set_baseline(*fit_baseline(ds, pairs))
    module.sync_ema()
    return module


def task_train(args) -> dict:
    import lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import NeighborCache
    from multifi.data.readers.qm9 import read_qm9
    from multifi.train.datamodule import MultiFidelityData, PairDataset

    ds = read_qm9(labels=args.labels, limit=args.n, seed=0)
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    module = build(ds, pairs)
    t0 = time.perf_counter()
    data = MultiFidelityData(
        ds,
        {"train": pairs, "val": pairs[:0], "test": pairs[:0]},
        C.CUTOFF,
        C.BATCH,
        num_workers=args.workers,
        seed=0,
        progress=False,
    )
    nl_seconds = time.perf_counter() - t0
    timer = C.step_timer()
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=module.train_cfg.grad_clip,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        inference_mode=False,
        precision="32-true",
    )
    trainer.fit(module, datamodule=data)
    out = C.train_rates(timer.ends, args.warmup, C.BATCH)
    out["neighbor_cache_s"] = nl_seconds

    # model-only: pre-collated batches, forward + loss + backward + AdamW (no data loading, no Lightning)
    pot, loss_fn = module.potential.train(), module.loss_fn
    batches = [g for g, _ in zip(data.train_dataloader(), range(20))]
    opt = torch.optim.AdamW(pot.parameters(), lr=C.LR)
    dts = []
    for _rep in range(2):
        for g in batches:
            t = time.perf_counter()
            loss, _ = loss_fn(pot(g, create_graph=True), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dts.append(time.perf_counter() - t)
    out["model_only_structures_per_s"] = C.BATCH / statistics.median(dts[5:])

    # inference: neighbour lists from scratch + one pass, energy only
    pot.eval()
    t0 = time.perf_counter()
    nc = NeighborCache(ds, C.CUTOFF, progress=False)
    loader = DataLoader(PairDataset(pairs), batch_size=C.BATCH, shuffle=False, collate_fn=GraphCollator(ds, nc))
    with torch.no_grad():
        for g in loader:
            pot(g)
    out["infer_structures_per_s"] = len(ds) / (time.perf_counter() - t0)
    out["n_structures"], out["mean_atoms"] = len(ds), float(ds.n_atoms.mean())
    out["params"] = sum(p.numel() for p in pot.parameters())
    return out


def task_md(args) -> dict:
    import ase.io
    import numpy as np

    from multifi.calculator import Calculator
    from multifi.data.readers.qm9 import read_qm9

    ds = read_qm9(labels=args.labels, limit=args.n, seed=0)
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    pot = build(ds, pairs).potential
    calc = Calculator(pot, fidelity=ds.fidelities.names[0])
    return C.time_md(ase.io.read(args.md_xyz), calc, args.md_steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["train", "md"], required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--md-xyz")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--md-steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    C.setup_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = task_train(args) if args.task == "train" else task_md(args)
    import torch

    import multifi

    out.update(
        framework="multifi",
        task=args.task,
        threads=torch.get_num_threads(),
        source=multifi.__file__,
        versions=C.versions("multifi", "torch", "lightning", "numpy", "ase", "vesin"),
    )
    C.emit(out)


if __name__ == "__main__":
    main()
