"""schnetpack side of the PaiNN A/B benchmark (runs in bench/.venv-peers-schnetpack). Started by bench/harness.py.

    python bench/peers/schnetpack_painn.py --task train|md --threads T --extxyz qm9.extxyz --scratch DIR
                                           [--nl matscipy|ase] [--md-xyz molecule.xyz] [--forces]

train: schnetpack's normal training path as its own `spktrain experiment=qm9_atomwise` config builds
       it — ASEAtomsData (ASE db) → AtomsDataModule with per-sample transforms SubtractCenterOfMass,
       RemoveOffsets(mean), MatScipyNeighborList(5 Å) (the QM9 experiment's choice; --nl ase gives the
       tutorial's ASENeighborList), CastTo32 → AtomsLoader collate → NeuralNetworkPotential(PaiNN 128×3,
       GaussianRBF 20, CosineCutoff 5 Å, Atomwise) → AtomisticTask (MSE, MAE metric) with the CLI's EMA
       callback (0.995) → Lightning Trainer.fit. num_workers=0 (the same cores as ours).
       One step = fetch the next batch (per-sample transforms incl. the neighbour list, collate), forward,
       loss, metrics, backward, optimizer, EMA, Lightning hooks.
       Then model-only steps (pre-collated batches, manual AdamW loop) and inference: one pass over all
       N molecules through AtomsLoader (transforms incl. neighbour lists) + model.eval() under no_grad.
       --forces: energies and forces_eVA of the extxyz, a Forces output module and an MSE loss on each (weight 1),
       inference with forces (autograd).
md:    schnetpack.interfaces.SpkCalculator (model with a Forces output module, neighbour list
       transform as above), VelocityVerlet 0.5 fs.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # SpkCalculator torch.load()s a pickled model


def import_spk():
    import torch.utils.data.dataloader as d

    d.T_co = d._T_co  # schnetpack 2.0.4 imports a name torch 2.13 no longer exports (see shared/PEERS.md)
    import schnetpack

    return schnetpack


def nl_transform(spk, kind: str):
    return {"matscipy": spk.transform.MatScipyNeighborList, "ase": spk.transform.ASENeighborList}[kind](cutoff=C.CUTOFF)


def database(spk, extxyz: str, scratch: str, forces: bool = False) -> str:
    """The exported molecules as a schnetpack ASE db (created once, cached in scratch); with `forces`, their
    forces_eVA too."""
    import ase.io
    import numpy as np

    path = os.path.join(scratch, os.path.basename(extxyz).replace(".extxyz", "") + ".spk.db")
    if not os.path.exists(path):
        frames = ase.io.read(extxyz, ":")
        tmp = path[:-3] + ".tmp.db"
        if os.path.exists(tmp):
            os.remove(tmp)
        units = {"energy": "eV", **({"forces": "eV/Ang"} if forces else {})}
        db = spk.data.ASEAtomsData.create(tmp, distance_unit="Ang", property_unit_dict=units)
        labels = [
            {"energy": np.array([a.info["energy_eV"]]), **({"forces": a.arrays["forces_eVA"]} if forces else {})}
            for a in frames
        ]
        db.add_systems(labels, [ase.Atoms(a.numbers, a.positions) for a in frames])
        os.replace(tmp, path)
    return path


def painn_model(spk, forces: bool, offsets: bool):
    import schnetpack.transform as trn

    rep = spk.representation.PaiNN(
        n_atom_basis=C.FEATURES,
        n_interactions=C.INTERACTIONS,
        radial_basis=spk.nn.GaussianRBF(n_rbf=C.N_RBF, cutoff=C.CUTOFF),
        cutoff_fn=spk.nn.CosineCutoff(C.CUTOFF),
    )
    outputs = [spk.atomistic.Atomwise(n_in=C.FEATURES, output_key="energy")]
    if forces:
        outputs.append(spk.atomistic.Forces(energy_key="energy", force_key="forces"))
    post = [trn.CastTo64()] + ([trn.AddOffsets("energy", add_mean=True, add_atomrefs=False)] if offsets else [])
    return spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=outputs,
        postprocessors=post,
    )


def task_train(args) -> dict:
    import pytorch_lightning as pl
    import torch
    import torchmetrics

    spk = import_spk()
    import schnetpack.transform as trn

    db = database(spk, args.extxyz, args.scratch, args.forces)
    props = ["energy", "forces"] if args.forces else ["energy"]
    n = len(spk.data.ASEAtomsData(db))
    split = os.path.join(args.scratch, f"spk_split_{n}_{os.getpid()}.npz")
    transforms = [
        trn.SubtractCenterOfMass(),
        trn.RemoveOffsets("energy", remove_mean=True, remove_atomrefs=False),
        nl_transform(spk, args.nl),
        trn.CastTo32(),
    ]
    dm = spk.data.AtomsDataModule(
        db,
        batch_size=C.BATCH,
        num_train=n - 32,
        num_val=32,
        num_test=0,
        transforms=transforms,
        num_workers=args.workers,
        split_file=split,
        load_properties=props,
        property_units={"energy": "eV", **({"forces": "eV/Ang"} if args.forces else {})},
        distance_unit="Ang",
    )
    dm.prepare_data()
    dm.setup()
    model = painn_model(spk, forces=args.forces, offsets=True)
    task = spk.task.AtomisticTask(
        model=model,
        optimizer_cls=torch.optim.AdamW,
        optimizer_args={"lr": C.LR},
        outputs=[
            spk.task.ModelOutput(
                name=name,
                loss_fn=torch.nn.MSELoss(),
                loss_weight=1.0,
                metrics={"MAE": torchmetrics.regression.MeanAbsoluteError()},
            )
            for name in props
        ],
    )
    timer = C.step_timer()
    callbacks = [timer, spk.train.ExponentialMovingAverage(decay=0.995)]
    trainer = pl.Trainer(**C.trainer_kwargs(args, callbacks), precision=32)
    trainer.fit(task, datamodule=dm)
    os.remove(split)
    out = C.train_rates(timer.ends, args.warmup, C.BATCH)

    # model-only: pre-collated batches, forward + loss + backward + AdamW (no data loading, no Lightning)
    model.train()
    batches = [b for b, _ in zip(dm.train_dataloader(), range(20))]
    mse = torch.nn.MSELoss()

    def loss(b):
        pred = model(dict(b))
        return sum(mse(pred[name], b[name]) for name in props)

    out["model_only_structures_per_s"] = C.model_only_rate(model.parameters(), batches, loss)

    # inference: one pass over all molecules, neighbour lists by the per-sample transform
    model.eval()
    data = spk.data.ASEAtomsData(
        db,
        load_properties=props,
        transforms=[trn.SubtractCenterOfMass(), nl_transform(spk, args.nl), trn.CastTo32()],
    )
    loader = spk.data.AtomsLoader(data, batch_size=C.BATCH, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    with torch.enable_grad() if args.forces else torch.no_grad():  # forces by autograd: inference with forces
        for b in loader:
            model(b)
    out["infer_structures_per_s"] = n / (time.perf_counter() - t0)
    out["n_structures"] = n
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def task_md(args) -> dict:
    import ase.io
    import torch

    spk = import_spk()
    model = painn_model(spk, forces=True, offsets=False)
    path = os.path.join(args.scratch, f"spk_md_model_{os.getpid()}.pt")
    torch.save(model, path)
    calc = spk.interfaces.SpkCalculator(
        model_file=path,
        neighbor_list=nl_transform(spk, args.nl),
        energy_key="energy",
        force_key="forces",
        energy_unit="eV",
        position_unit="Ang",
        dtype=torch.float32,
    )
    os.remove(path)
    return C.time_md(ase.io.read(args.md_xyz), calc, args.md_steps)


def main() -> None:
    ap = C.parser(steps=50, md_steps=300)
    ap.add_argument("--extxyz", required=True)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--nl", choices=["matscipy", "ase"], default="matscipy")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--forces", action="store_true", help="train on energies and forces_eVA (the extxyz has them)")
    args = ap.parse_args()
    C.run(
        args,
        task_train,
        task_md,
        framework="schnetpack",
        neighbor_list=args.nl,
        versions=C.versions("schnetpack", "torch", "pytorch-lightning", "lightning", "numpy", "ase", "matscipy"),
    )


if __name__ == "__main__":
    main()
