"""The model families compared by experiments, as run plans, and how each one is evaluated.

- single    one fidelity, no conditioning (inject: single)
- joint     several fidelities in one model, conditioned by `inject` (input, readout, both, onehot, heads)
- delta     Δ-learning: a single-fidelity model of E_high − E_low; its prediction of E_high adds the
            low-fidelity label back, so it needs a low-fidelity calculation at prediction time
- finetune  pre-train a single-fidelity model on the low fidelity, then train it on the high fidelity
            starting from those weights (train.init_from, fidelity mapped high ← low)

All share the same backbone, budget and data pipeline; only the data and conditioning differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from multifi.config import validate_config
from multifi.errors import MultifiError
from multifi.keys import ESTIMATED, FITTED_ONLY, UNSEEN
from multifi_experiments.plan import RunPlan, deep_merge, fill

SPLITS = ("train", "val", "test")


class Patch(Protocol):
    """RunConfig sections merged into a run's configuration (a spec's ConfigPatch)."""

    def model_dump(self) -> dict: ...


def delta_fidelity(high: str, low: str) -> str:
    return f"delta({high} - {low})"


# ---------------------------------------------------------------------------------------------- plans
def make_plan(
    ctx,
    run_id: str,
    part: str,
    sources: list[dict],
    splits: dict[str, np.ndarray],
    inject: str,
    seed: int,
    patches: list[Patch],
    meta: dict,
    monitor: str | None = None,
    steps: int | None = None,
    **extra,
) -> RunPlan:
    """A plan training on `sources` ({"method", "indices"} or {"npz": path template}) with the given splits.

    monitor: the run's target fidelity, whose validation error decides convergence (spec `convergence`);
    None: the validation loss over all fidelities. steps: train exactly this many optimiser steps instead
    (a step-matched control; the best validation checkpoint is kept, nothing stops early).

    indices and splits: structure ids of the catalog (QM9 indices, or positions in a SourceCatalog);
    the catalog decides how a run reads them (index files, or key files and a derived dataset).
    """
    labelled = [(src["method"], src["indices"]) for src in sources if "npz" not in src]
    files, data_sources, derived = ctx.catalog.plan_data(labelled) if labelled else ({}, [], [])
    data_sources += [{"path": src["npz"], "format": "npz"} for src in sources if "npz" in src]
    for name in SPLITS:
        files[f"{name}.keys"] = ctx.catalog.split_keys(splits.get(name, ()))
    raw: dict = {"model": {}, "loss": {}, "train": {}}
    for p in [ctx.spec.base, *patches]:
        raw = deep_merge(raw, p.model_dump())
    raw["model"] = deep_merge(raw["model"], {"fidelity_embedding": {"inject": inject}})
    if ctx.spec.convergence is not None:
        raw["train"].update(ctx.spec.convergence.train_keys(monitor, pretrain=meta.get("role") == "pretrain"))
    if steps is not None:
        raw["train"].update(epochs=10**9, max_steps=steps, early_stopping_patience=None, early_stopping_steps=None)
        meta = {**meta, "control": f"{steps} steps"}
    raw["train"].update(seed=seed, threads=ctx.spec.threads, progress=False)
    raw["data"] = {
        "sources": data_sources,
        "cache": False,
        "split": {"files": {s: "{inputs}/" + f"{s}.keys" for s in SPLITS}, "seed": seed},
    }
    raw["output_dir"] = "{run_dir}"
    if derived:
        extra["derived"] = derived + extra.get("derived", [])
    plan = RunPlan(id=run_id, part=part, config=raw, files=files, meta=meta, **extra)
    check_config(plan)
    return plan


def check_config(plan: RunPlan) -> None:
    """Validate the plan's RunConfig now, so a typo fails before hours of training."""
    dummy = {"inputs": "/inputs", "run_dir": "/run", "shared": "/shared", "work": "/work"}
    cfg = fill(plan.config, dummy)
    if "init_from" in cfg.get("train", {}):
        cfg["train"]["init_from"] = "/model.pt"
    try:
        validate_config(cfg, where=f"run {plan.id}")
    except MultifiError as exc:
        raise MultifiError(f"{exc} (set in the spec's base/config/variant sections)") from None


def single(ctx, run_id, part, method, sets, seed, patches, meta, steps: int | None = None) -> RunPlan:
    """One model of one method on sets {"train", "val", "test"} of QM9 indices."""
    src = [{"method": method, "indices": np.concatenate([sets[s] for s in SPLITS])}]
    return make_plan(
        ctx,
        run_id,
        part,
        src,
        sets,
        "single",
        seed,
        patches,
        {**meta, "kind": "single", "inject": "single", "methods": [method]},
        monitor=method,
        steps=steps,
    )


def joint(
    ctx,
    run_id,
    part,
    method_sets: dict[str, dict],
    inject,
    seed,
    patches,
    meta,
    evaluate=None,
    monitor: str | None = None,
    steps: int | None = None,
) -> RunPlan:
    """One model on several methods; method_sets: method → {"train", "val", "test"} QM9 indices;
    monitor: the target method whose validation error decides convergence (None: all methods' loss)."""
    src = [{"method": m, "indices": np.concatenate([s[k] for k in SPLITS])} for m, s in method_sets.items()]
    splits = {k: np.unique(np.concatenate([s[k] for s in method_sets.values()])) for k in SPLITS}
    return make_plan(
        ctx,
        run_id,
        part,
        src,
        splits,
        inject,
        seed,
        patches,
        {**meta, "kind": "joint", "inject": inject, "methods": list(method_sets)},
        monitor=monitor,
        steps=steps,
        **({"evaluate": evaluate} if evaluate else {}),
    )


def delta(ctx, run_id, part, high, low, sets, seed, patches, meta) -> RunPlan:
    """Δ-learning: a model of E_high − E_low on the training molecules (both labels needed)."""
    name = delta_fidelity(high, low)
    pool = sorted(int(x) for x in np.concatenate([sets[s] for s in SPLITS]))
    derived = [{"kind": "delta", "path": "{inputs}/delta.npz", "high": high, "low": low, "indices": "pool.idx"}]
    plan = make_plan(
        ctx,
        run_id,
        part,
        [{"npz": "{inputs}/delta.npz"}],
        sets,
        "single",
        seed,
        patches,
        {
            **meta,
            "kind": "delta",
            "inject": "single",
            "methods": [high],
            "fidelity": name,
            "needs_low_at_prediction": low,
        },
        monitor=name,
        evaluate={"kind": "delta", "high": high, "low": low, "fidelity": name},
        derived=derived,
    )
    plan.files["pool.idx"] = pool
    return plan


def pretrain(ctx, run_id, part, low, sets, seed, patches, meta, inject: str = "single") -> RunPlan:
    """Stage 1 of finetune (inject single) or pretrain_joint (the joint model's conditioning): a model of
    the low fidelity alone (no test set of its own)."""
    sets = {"train": sets["train"], "val": sets["val"], "test": np.zeros(0, np.int64)}
    if inject == "single":
        return single(ctx, run_id, part, low, sets, seed, patches, {**meta, "role": "pretrain"})
    return joint(ctx, run_id, part, {low: sets}, inject, seed, patches, {**meta, "role": "pretrain"}, monitor=low)


def finetune(ctx, run_id, part, high, low, sets, seed, patches, meta, base: RunPlan) -> RunPlan:
    """Stage 2 of finetune: the high fidelity, starting from the weights of `base` (high ← low)."""
    plan = single(ctx, run_id, part, high, sets, seed, patches, meta)
    start_from(plan, base, {high: low})
    plan.meta.update(kind="finetune", pretrained_on=low)
    return plan


def start_from(plan: RunPlan, base: RunPlan, fidelity_map: dict[str, str]) -> None:
    """Make `plan` start from the saved model of run `base`, fidelities mapped new ← old by name."""
    plan.config["train"]["init_from"] = "{model:" + base.id + "}"
    plan.config["train"]["init_fidelities"] = dict(fidelity_map)
    plan.needs = [base.id]
    plan.upstream = {base.id: base.signature()}


# ---------------------------------------------------------------------------------------------- data
def build_derived(spec: dict, inputs: Path, catalog) -> None:
    """Write a derived dataset as a multifi .npz: a run's labels cut from the catalog's structure files
    (kind subset), or Δ labels E_high − E_low on the listed QM9 molecules (kind delta)."""
    from multifi.data.fidelity import FidelityTable
    from multifi.data.readers.qm9 import read_qm9

    if spec["kind"] == "subset":
        catalog.build_subset(spec, inputs, Path(fill(spec["path"], {"inputs": str(inputs)})))
        return
    if spec["kind"] != "delta":
        raise MultifiError(f"unknown derived dataset kind {spec['kind']!r}")
    indices = np.loadtxt(inputs / spec["indices"], dtype=np.int64, ndmin=1)
    ds = read_qm9(indices=indices)  # geometries (and QM9's own energies, replaced below)
    qm9_index = np.array([int(k.split(":")[1]) for k in ds.keys])
    diff = catalog.energies(spec["high"], qm9_index) - catalog.energies(spec["low"], qm9_index)
    ds.energy = diff.reshape(-1, 1)
    ds.fidelities = FidelityTable([delta_fidelity(spec["high"], spec["low"])])
    ds = ds.subset(np.flatnonzero(np.isfinite(diff)))
    ds.save(Path(fill(spec["path"], {"inputs": str(inputs)})))


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(plan: RunPlan, run_dir: Path, inputs: Path, catalog) -> dict:
    """Test errors per method {method: {"n", "mae_meV", "rmse_meV"}} (+ embedding vectors if asked)."""
    kind = plan.evaluate["kind"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out: dict = {"n_train": metrics.get("n_train", {})}
    val = {m: _errors(v) for m, v in metrics.get("val_fidelities", {}).items() if v.get("energy_mae_meV") is not None}
    if kind == "metrics":
        out["test"] = {m: _errors(v) for m, v in metrics["fidelities"].items() if v.get("energy_mae_meV") is not None}
    elif kind == "delta":
        out["test"] = {plan.evaluate["high"]: _delta_errors(plan, run_dir, inputs, catalog)}
        out["test_delta_labels"] = {k: _errors(v) for k, v in metrics["fidelities"].items()}
        # the low-fidelity label is added back exactly, so the error of E_high equals that of the Δ label
        val = {plan.evaluate["high"]: val[plan.evaluate["fidelity"]]} if plan.evaluate["fidelity"] in val else {}
    else:
        raise MultifiError(f"unknown evaluation kind {kind!r}")
    if plan.evaluate.get("difference"):
        d = plan.evaluate["difference"]
        out["difference"] = difference_errors(
            run_dir / "model.pt", catalog, plan.files["test.keys"], d["high"], d["low"]
        )
    if val:
        out["val"] = val  # the best checkpoint's validation errors: what model choices are made on
    out.update({k: metrics[k] for k in (*TRAINING_KEYS, *EXTENSION_KEYS) if k in metrics})
    if plan.evaluate.get("embedding"):
        out["embedding"] = embedding_vectors(run_dir / "model.pt")
    return out


#: how the training went (metrics.json of the run directory), copied into a result
TRAINING_KEYS = ("steps", "best_step", "stopped_early", "monitor", "best_monitored")
#: what an extension (multifi extend) measured: the old fidelities' test errors before/after, the freeze check
EXTENSION_KEYS = ("forgetting", "old_fidelities_unchanged")
#: metrics.json entry → a result's test entry (only those present: forces and stress need labels)
OPTIONAL_ERRORS = {
    "mae_meV_per_atom": "energy_mae_meV_per_atom",
    "forces_mae_meV_per_A": "forces_mae_meV_per_A",
    "stress_mae_GPa": "stress_mae_GPa",
}


def _errors(m: dict) -> dict:
    """A result's errors of one method; `unseen`: test structures left out (an element no training label had);
    `estimated`: structures kept whose reference at this method was estimated, `fitted_only` the errors without."""
    out = {"n": m["n"], "mae_meV": m["energy_mae_meV"], "rmse_meV": m["energy_rmse_meV"]}
    out.update({k: m[src] for k, src in OPTIONAL_ERRORS.items() if m.get(src) is not None})
    if m.get(UNSEEN):
        out["unseen"] = m[UNSEEN]
    if m.get(ESTIMATED):  # errors also without them: the structures a model of this method alone can predict
        out["estimated"] = m[ESTIMATED]
        out["fitted_only"] = _errors(m[FITTED_ONLY]) if m[FITTED_ONLY].get("n") else {"n": 0}
    return out


def _delta_errors(plan: RunPlan, run_dir: Path, inputs: Path, catalog) -> dict:
    """E_high predicted as (Δ model) + E_low label, against the E_high label, on the test molecules; molecules with an
    element no Δ training label held are left out and counted (`unseen`), as every other variant's errors leave
    them out (their Δ reference energy is undefined: errors of tens of eV)."""
    from multifi.data.dataset import FidelityDataset
    from multifi.models.registry import load_potential
    from multifi.train.evaluate import evaluate_pairs, structures_with_unseen_elements

    ev = plan.evaluate
    test = set(plan.files["test.keys"])
    ds = FidelityDataset.load(inputs / "delta.npz")
    qm9_index = np.array([int(k.split(":")[1]) for k in ds.keys])
    ds = ds.subset(np.flatnonzero(np.isin(qm9_index, list(test))))
    qm9_index = np.array([int(k.split(":")[1]) for k in ds.keys])
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], axis=1)
    potential = load_potential(run_dir / "model.pt")
    _, pred_delta = evaluate_pairs(potential, ds, None, pairs, batch_size=64, return_predictions=True)
    low, high = catalog.energies(ev["low"], qm9_index), catalog.energies(ev["high"], qm9_index)
    unseen = structures_with_unseen_elements(potential, ds, pairs[:, 0])
    err = ((pred_delta + low) - high)[~unseen]  # eV
    out = {
        "n": int(len(err)),
        "mae_meV": float(1000 * np.abs(err).mean()) if len(err) else None,
        "rmse_meV": float(1000 * np.sqrt((err**2).mean())) if len(err) else None,
        "needs_at_prediction": ev["low"],
    }
    if unseen.any():
        out["unseen"] = int(unseen.sum())
    return out


def difference_errors(model_path: Path, catalog, test_keys: list, high: str, low: str) -> dict:
    """What a second fidelity adds: errors of the predicted high − low difference on the test structures
    labelled at both (per-atom energy in meV/atom, forces in meV/Å), and the size of that difference in
    the labels (the force error of taking the low fidelity's forces as the high fidelity's).

    A model that knows only `high` gets the label sizes only (its difference is not defined)."""
    import torch

    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import make_neighbors
    from multifi.models.registry import load_potential

    ds = catalog.dataset()
    index_of = {str(k): i for i, k in enumerate(ds.keys.tolist())}
    ids = np.array(sorted(index_of[str(k)] for k in test_keys if str(k) in index_of), dtype=np.int64)
    ds = ds.subset(ids).select_fidelities([high, low], where="difference evaluation")
    both = np.flatnonzero(~np.isnan(ds.energy).any(1) & (ds.forces_mask.all(1) if ds.forces_mask is not None else True))
    ds = ds.subset(both)
    n_atoms = ds.n_atoms.astype(np.float64)
    e_label = (ds.energy[:, 0] - ds.energy[:, 1]) / n_atoms  # eV/atom
    out: dict = {"n": int(len(ds)), "label_energy_difference_std_meV_per_atom": float(1000 * e_label.std())}
    if ds.forces is not None:
        f_label = ds.forces[:, 0] - ds.forces[:, 1]  # [N, 3] eV/Å
        out["label_forces_difference_mae_meV_per_A"] = float(1000 * np.abs(f_label).mean())
    potential = load_potential(model_path)
    names = list(potential.fidelities.names)
    if len(ds) == 0 or high not in names or low not in names:
        return out
    potential.eval()
    collate = GraphCollator(ds, make_neighbors(ds, potential.cutoff, progress=False))
    dtype = next(potential.parameters()).dtype
    pred = {}
    for k, name in enumerate((high, low)):
        g = collate(np.stack([np.arange(len(ds)), np.full(len(ds), k)], 1)).to("cpu", dtype)
        g.fidelity = torch.full_like(g.fidelity, names.index(name))
        o = potential(g, forces=ds.forces is not None)
        pred[name] = {key: o[key].detach().double().numpy() for key in ("energy", "forces") if key in o}
    e_pred = (pred[high]["energy"] - pred[low]["energy"]) / n_atoms
    out["energy_difference_mae_meV_per_atom"] = float(1000 * np.abs(e_pred - e_label).mean())
    if ds.forces is not None:
        f_pred = pred[high]["forces"] - pred[low]["forces"]
        out["forces_difference_mae_meV_per_A"] = float(1000 * np.abs(f_pred - f_label).mean())
    return out


def embedding_vectors(model_path: Path) -> dict | None:
    """{"fidelities": names, "vectors": [K, d]} of a potential's trainable fidelity table (None without one)."""
    from multifi.models.registry import load_potential

    potential = load_potential(model_path)
    table = getattr(potential.conditioning, "table", None)
    if table is None:
        return None
    return {"fidelities": list(potential.fidelities.names), "vectors": table.weight.detach().double().tolist()}
