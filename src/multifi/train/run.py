"""Run driver: config → run directory with resolved config, checkpoints, metrics.csv and metrics.json."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from multifi.config import RunConfig, dump_config, load_config
from multifi.data.dataset import atomic_write
from multifi.errors import MultifiError
from multifi.data.checks import check_energy_units, check_overlaps, check_split_duplicates
from multifi.data.stats import fit_references
from multifi.train.datamodule import MultiFidelityData
from multifi.train.evaluate import evaluate_pairs
from multifi.train.logger import RunCSVLogger
from multifi.train.module import PotentialModule
from multifi.train.prepare import prepare_data

log = logging.getLogger("multifi")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: never half-written."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def train(cfg: RunConfig, resume: bool = False, config_source: str = "") -> Path:
    """Train a potential as configured; returns the run directory."""
    run_dir = Path(cfg.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    leader = _is_leader_process()
    if resume and not last.exists():
        raise MultifiError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt)")
    if leader and not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise MultifiError(f"{run_dir}: run directory exists and is not empty; use --resume {run_dir} or another output_dir")
    _configure_threads(cfg)
    _quiet_lightning()
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    dataset = None
    cached = run_dir / "dataset.npz"
    if resume and cached.exists():
        from multifi.data.dataset import FidelityDataset

        dataset = FidelityDataset.load(cached)
    prep = prepare_data(cfg, dataset if dataset is not None else None, config_source)
    if leader and not resume:
        check_split_duplicates(prep.dataset, prep.split)
    _report_data(prep)

    spec = {"model": cfg.model.model_dump(), "fidelities": list(prep.dataset.fidelities.names)}
    module = PotentialModule(spec, cfg.loss.model_dump(), cfg.train.model_dump())
    if cfg.train.init_from and not resume:  # on resume the weights come from the checkpoint
        from multifi.train.init import init_from_potential

        init_from_potential(module.potential, cfg.train.init_from, cfg.train.init_fidelities)
    # always refitted on this run's data; one pooled fit for a fidelity-blind model (inject: single)
    refs = fit_references(prep.dataset, prep.pairs["train"], pooled=module.potential.head.shared_baseline,
                          shared_scale=cfg.model.energy_scale == "shared")
    check_energy_units(prep.dataset, prep.pairs["train"], refs.ref, refs.scale)
    _report_references(refs, prep.dataset.fidelities.names)
    module.potential.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    module.sync_ema()

    data = MultiFidelityData(prep.dataset, prep.pairs, cfg.model.cutoff, cfg.train.batch_size, cfg.train.num_workers,
                             cfg.train.fidelity_sampling, cfg.train.seed, progress=cfg.train.progress,
                             neighbor_lists=cfg.data.neighbor_lists)
    check_overlaps(prep.dataset, data.neighbors)
    # all checks passed: only now does the run directory get written
    run_dir.mkdir(parents=True, exist_ok=True)
    if leader and not resume:
        atomic_write(run_dir / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
        prep.split.save(run_dir / "splits.json", prep.dataset)
        if cfg.data.cache and not _from_saved_dataset(cfg):
            prep.dataset.save(cached)
    trainer = make_trainer(cfg, run_dir, has_val=len(prep.pairs["val"]) > 0)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None)

    if trainer.global_rank == 0:
        best = _best_checkpoint(trainer, last)
        from multifi.models.registry import load_potential, save_potential

        potential = load_potential(best)
        save_potential(potential, run_dir / "model.pt")
        metrics = evaluate_pairs(potential, prep.dataset, data.neighbors, prep.pairs["test"], cfg.train.batch_size)
        payload = {"fidelities": metrics, "checkpoint": str(best), "n_train": _counts(prep, "train")}
        atomic_write(run_dir / "metrics.json", lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return run_dir


def make_trainer(cfg: RunConfig, run_dir: Path, has_val: bool = True) -> L.Trainer:
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    monitor = "val_loss" if has_val else "train_loss_epoch"
    # best.ckpt follows the monitored loss; last.ckpt is rewritten every epoch (or every N steps) whatever
    # the loss did, so a killed run resumes from its latest state (Lightning's save_last only follows saves)
    every_n = t.checkpoint_every_n_steps
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1,
                        enable_version_counter=False),
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False,
                        every_n_train_steps=every_n or None, every_n_epochs=None if every_n else 1,
                        save_on_train_epoch_end=not every_n),
    ]
    if t.early_stopping_patience and has_val:
        # checked after each validation (not at epoch end: a run may stop mid-epoch at max_steps, unvalidated)
        callbacks.append(EarlyStopping(monitor="val_loss", patience=t.early_stopping_patience, mode="min",
                                       check_on_train_epoch_end=False))
    # validate (and checkpoint the best model) every N steps across epochs, e.g. for step budgets
    every = {"val_check_interval": t.val_every_n_steps, "check_val_every_n_epoch": None} \
        if t.val_every_n_steps and has_val else {}
    return L.Trainer(
        **every, default_root_dir=run_dir, max_epochs=t.epochs, max_steps=t.max_steps, accelerator=t.accelerator,
        devices=t.devices, num_nodes=t.num_nodes, gradient_clip_val=t.grad_clip, callbacks=callbacks,
        logger=RunCSVLogger(run_dir), plugins=[AtomicCheckpointIO()],
        inference_mode=False, enable_progress_bar=t.progress, enable_model_summary=False,
        precision="64-true" if t.precision == "64" else "32-true", log_every_n_steps=10,
        num_sanity_val_steps=0, use_distributed_sampler=False, limit_val_batches=1.0 if has_val else 0,
    )


def _best_checkpoint(trainer, last: Path) -> Path:
    for cb in trainer.checkpoint_callbacks:
        if cb.best_model_path and cb.filename == "best" and Path(cb.best_model_path).exists():
            return Path(cb.best_model_path)
    return last


def _counts(prep, split: str) -> dict[str, int]:
    names = prep.dataset.fidelities.names
    c = torch.bincount(torch.as_tensor(prep.pairs[split][:, 1]), minlength=len(names)).tolist()
    return {n: int(x) for n, x in zip(names, c)}


def _report_data(prep) -> None:
    for split in ("train", "val", "test"):
        counts = _counts(prep, split)
        log.info("%s: %s", split, ", ".join(f"{k}={v}" for k, v in counts.items()))


def _report_references(refs, names) -> None:
    """One warning per fidelity whose training labels lack elements that other fidelities have."""
    from ase.data import chemical_symbols

    for k, name in enumerate(names):
        missing = refs.estimated(k)
        if not missing:
            continue
        symbols = ", ".join(chemical_symbols[z] for z in missing)
        error = "" if np.isnan(refs.spread[k]) else \
            f" (leave-one-out error of that estimate on the other elements: {refs.spread[k]:.2f} eV/atom)"
        log.warning("%s: no energy labels with %s in training; their %s reference energies are estimated from "
                    "the other fidelities' references as a shared per-element reference plus a %s shift smooth in Z%s",
                    name, symbols, name, name, error)


def _from_saved_dataset(cfg: RunConfig) -> bool:
    """A single saved dataset (.npz or memory-mapped directory) is its own cache: don't copy it."""
    from multifi.data.sources import _is_saved_dataset

    return len(cfg.data.sources) == 1 and _is_saved_dataset(cfg.data.sources[0])


def _is_leader_process() -> bool:
    """True in the process that owns the run directory: global rank 0 under torchrun/SLURM, or the
    process that Lightning's launcher starts the other ranks from (it sets LOCAL_RANK only in those)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ and "WORLD_SIZE" in os.environ | ({"WORLD_SIZE": 1} if var == "SLURM_PROCID" else {}):
            return int(os.environ[var]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _quiet_lightning() -> None:
    """Keep Lightning's tips and deprecation chatter out of the user's terminal."""
    import warnings

    if not log.isEnabledFor(logging.DEBUG):
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory.*")
    warnings.filterwarnings("ignore", message=r".*limit_val_batches.*")
    warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")  # per-fidelity metrics are reduced by hand  # the datamodule resumes it


def _configure_threads(cfg: RunConfig) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def train_from_args(config: str | None, overrides: list[str], resume_dir: str | None) -> Path:
    if resume_dir:
        source = Path(resume_dir) / "config.yaml"
        cfg = load_config(source, overrides)
        cfg.output_dir = str(resume_dir)
        return train(cfg, resume=True, config_source=str(source))
    if config is None:
        raise MultifiError("multifi train needs a CONFIG.yaml (or --resume RUN_DIR)")
    return train(load_config(config, overrides), config_source=str(config))
