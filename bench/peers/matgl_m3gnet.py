"""matgl side of the M3GNet A/B benchmark (runs in bench/.venv-peers-matgl, HOME = scratch). Started by bench/harness.py.

    python bench/peers/matgl_m3gnet.py --task train|md --threads T --extxyz solids.extxyz --scratch DIR [--md-xyz si64.xyz]

train: matgl's training path (shared/PEERS.md): Atoms2Graph(5 Å) → MGLDataset (graphs built once,
       labels energies/forces/stresses) → MGLDataLoader(collate_fn=collate_fn_pes) →
       PotentialLightningModule(M3GNet defaults: 64/64 dims, 3 blocks, 5 Å, three-body 4 Å,
       max_n = max_l = 3, is_intensive=False; energy 1, forces 1, stress 0.01; lr 5e-4) → Lightning
       fit. The three-body line graph is built on the fly in M3GNet.forward (matgl's default when the
       collate does not include it). Then model-only steps and inference (graphs built from scratch
       + one pass with forces and stresses).
md:    matgl.ext.ase.PESCalculator(Potential(model, calc_stresses=False)) on the rattled 64-atom Si
       cell, VelocityVerlet 0.5 fs.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402


def load(extxyz):
    import ase.io

    frames = ase.io.read(extxyz, ":")
    elements = sorted({s for a in frames for s in a.get_chemical_symbols()}, key=lambda s: ase.data.atomic_numbers[s])
    return frames, tuple(elements)


def model(elements):
    from matgl.models import M3GNet

    return M3GNet(element_types=elements, is_intensive=False)


def dataset(frames, elements, root):
    from matgl.ext.ase import Atoms2Graph
    from matgl.graph.data import MGLDataset

    labels = {
        "energies": [a.info["energy_eV"] for a in frames],
        "forces": [a.arrays["forces_label"] for a in frames],
        "stresses": [a.info["stress_GPa"].reshape(3, 3) for a in frames],
    }
    return MGLDataset(
        structures=frames,
        converter=Atoms2Graph(elements, cutoff=5.0),
        labels=labels,
        root=root,
        save_cache=False,
        clear_processed=False,
    )


def task_train(args) -> dict:
    from functools import partial

    import lightning.pytorch as pl
    from matgl.graph.data import MGLDataLoader, collate_fn_pes
    from matgl.utils.training import PotentialLightningModule

    frames, elements = load(args.extxyz)
    root = os.path.join(args.scratch, f"mgl_{os.getpid()}")
    data = dataset(frames, elements, root)
    collate = partial(collate_fn_pes, include_line_graph=False, include_stress=True)
    train_loader, _ = MGLDataLoader(
        train_data=data, val_data=data, collate_fn=collate, batch_size=C.BATCH, num_workers=0
    )
    net = model(elements)
    lit = PotentialLightningModule(model=net, energy_weight=1.0, force_weight=1.0, stress_weight=0.01, lr=C.LR)
    timer = C.step_timer()
    trainer = pl.Trainer(**C.trainer_kwargs(args, [timer]), precision=32)
    trainer.fit(lit, train_dataloaders=train_loader)
    out = C.train_rates(timer.ends, args.warmup, C.BATCH)

    batches = [b for b, _ in zip(train_loader, range(15))]
    lit.train()
    out["model_only_structures_per_s"] = C.model_only_rate(
        lit.parameters(), batches, lambda b: lit.step(b)[0]["Total_Loss"]
    )

    pot = lit.model.eval()
    t0 = time.perf_counter()
    fresh = dataset(frames, elements, root + "_infer")
    loader, _ = MGLDataLoader(train_data=fresh, val_data=fresh, collate_fn=collate, batch_size=C.BATCH, num_workers=0)
    for g, lat, state, *_ in loader:
        pot(g=g, lat=lat, state_attr=state)
    out["infer_structures_per_s"] = len(frames) / (time.perf_counter() - t0)
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root + "_infer", ignore_errors=True)
    out["n_structures"] = len(frames)
    out["params"] = sum(p.numel() for p in net.parameters())
    return out


def task_md(args) -> dict:
    import ase.io
    from matgl.apps.pes import Potential
    from matgl.ext.ase import PESCalculator

    frames, elements = load(args.extxyz)
    calc = PESCalculator(Potential(model=model(elements), calc_stresses=False), stress_unit="eV/A3")
    return C.time_md(ase.io.read(args.md_xyz), calc, args.md_steps)


def main() -> None:
    ap = C.parser(steps=40, md_steps=100)
    ap.add_argument("--extxyz", required=True)
    ap.add_argument("--scratch", required=True)
    C.run(
        ap.parse_args(),
        task_train,
        task_md,
        framework="matgl",
        versions=C.versions("matgl", "torch", "torch-geometric", "pytorch-lightning", "lightning", "numpy", "ase"),
    )


if __name__ == "__main__":
    main()
