"""multifi side of the M3GNet A/B benchmark (runs in the repository's .venv). Started by bench/harness.py.

    python bench/peers/multifi_m3gnet.py --task train|md --threads T --solids PBE.jsonl.gz [--md-xyz si64.xyz]

train: our normal training path on the periodic solids (MatPES-schema PBE records, 2–8 atoms):
       read_matpes → MultiFidelityData (neighbour lists cached) → PotentialModule (M3GNet 64 features,
       3 blocks, 5 Å / 4 Å three-body; loss energy 1, forces 1, stress 0.01 → forces and stress by
       autograd with create_graph, double backward; AdamW, EMA 0.99, grad clip 10) → Lightning fit.
       Then model-only steps and inference (fresh neighbour lists + one pass, energies+forces+stress).
md:    multifi.Calculator on a rattled 64-atom Si cell, VelocityVerlet 0.5 fs (forces only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

M3GNET = {
    "backbone": "m3gnet",
    "features": 64,
    "interactions": 3,
    "cutoff": 5.0,
    "threebody_cutoff": 4.0,
    "max_n": 3,
    "max_l": 3,
}


def build(ds, pairs):
    from multifi.config import LossConfig, ModelConfig, TrainConfig
    from multifi.models.head import fit_baseline
    from multifi.train.module import PotentialModule

    model = ModelConfig(**M3GNET).model_dump()
    spec = {"model": model, "fidelities": list(ds.fidelities.names)}
    module = PotentialModule(spec, LossConfig().model_dump(), TrainConfig(lr=C.LR, batch_size=C.BATCH).model_dump())
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
    from multifi.data.readers.matpes import read_matpes
    from multifi.train.datamodule import MultiFidelityData, PairDataset

    ds = read_matpes(args.solids)
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    module = build(ds, pairs)
    data = MultiFidelityData(
        ds,
        {"train": pairs, "val": pairs[:0], "test": pairs[:0]},
        M3GNET["cutoff"],
        C.BATCH,
        num_workers=0,
        seed=0,
        progress=False,
    )
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

    pot, loss_fn = module.potential.train(), module.loss_fn
    batches = [g for g, _ in zip(data.train_dataloader(), range(15))]
    opt = torch.optim.AdamW(pot.parameters(), lr=C.LR)
    dts = []
    for _rep in range(2):
        for g in batches:
            t = time.perf_counter()
            loss, _ = loss_fn(pot(g, forces=True, stress=True, create_graph=True), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dts.append(time.perf_counter() - t)
    out["model_only_structures_per_s"] = C.BATCH / statistics.median(dts[5:])

    pot.eval()
    if pot.use_compile:  # compile the inference graph outside the timed pass
        pot(batches[0], forces=True, stress=True)
    t0 = time.perf_counter()
    nc = NeighborCache(ds, M3GNET["cutoff"], progress=False)
    loader = DataLoader(PairDataset(pairs), batch_size=C.BATCH, shuffle=False, collate_fn=GraphCollator(ds, nc))
    for g in loader:
        pot(g, forces=True, stress=True)
    out["infer_structures_per_s"] = len(ds) / (time.perf_counter() - t0)
    out["n_structures"], out["mean_atoms"] = len(ds), float(ds.n_atoms.mean())
    out["params"] = sum(p.numel() for p in pot.parameters())
    return out


def task_md(args) -> dict:
    import ase.io
    import numpy as np

    from multifi.calculator import Calculator
    from multifi.data.readers.matpes import read_matpes

    ds = read_matpes(args.solids)
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    calc = Calculator(build(ds, pairs).potential, fidelity=ds.fidelities.names[0])
    return C.time_md(ase.io.read(args.md_xyz), calc, args.md_steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["train", "md"], required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--solids", required=True)
    ap.add_argument("--md-xyz")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--md-steps", type=int, default=100)
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
