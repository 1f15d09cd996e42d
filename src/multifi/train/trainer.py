"""The Lightning Trainer of a run: built from the typed config with the run's callbacks, fitted with
one-line errors for interrupts and lost peers, and the checkpoint to keep once it has stopped."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from multifi.config import RunConfig
from multifi.errors import MultifiError, Terminated
from multifi.files import reported
from multifi.keys import TRAIN_LOSS_EPOCH
from multifi.train.callbacks import (
    AtomicCheckpointIO,
    ClosedEpochResume,
    CpuBudget,
    FinalStepCheckpoint,
    RunCheckpoint,
    RunEarlyStopping,
)
from multifi.train.logger import RunCSVLogger, progress_bar_wanted

log = logging.getLogger("multifi")


def build_trainer(cfg: RunConfig, run_dir: Path, has_val: bool, config_source: str = "") -> L.Trainer:
    """make_trainer, with Lightning's complaints about devices and accelerators as one-line errors."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return make_trainer(cfg, run_dir, has_val=has_val)
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as exc:
        if isinstance(exc, TypeError) and "devices" not in str(exc):  # a bug, not a setting: its traceback
            raise
        prefix = f"{config_source}: " if config_source else ""
        t = cfg.train
        hint = ""
        if isinstance(t.devices, str) and "," in t.devices and "CPU" in str(exc):
            hint = f" (on CPU, devices is a number of processes: train.devices={len(t.devices.rstrip(',').split(','))})"
        raise MultifiError(
            f"{prefix}train.accelerator={t.accelerator}, train.devices={t.devices}: {' '.join(str(exc).split())}{hint}"
        ) from None


def fit_or_interrupt(trainer: L.Trainer, module, data, ckpt: Path | None, run_dir: Path, hint: str) -> None:
    """trainer.fit; Ctrl-C raises KeyboardInterrupt(hint) and SIGTERM Terminated(hint) instead of Lightning's
    silent exit code 1; another process of a multi-process run dying (gloo/NCCL lose their peer) is a one-line
    error with the hint instead of a traceback."""
    import signal

    try:
        with reported(run_dir):
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    except SystemExit:
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C
        raise (Terminated if trainer.received_sigterm else KeyboardInterrupt)(hint) from None
    except RuntimeError as exc:
        if trainer.world_size > 1 and _lost_a_peer(exc):
            log.debug("the collective's error in full", exc_info=exc)  # -v shows it
            raise MultifiError(f"{run_dir}: another training process stopped ({_first_line(exc)}); {hint}") from None
        raise
    if trainer.interrupted:
        raise (Terminated if trainer.received_sigterm else KeyboardInterrupt)(hint)


#: what gloo and NCCL say when the other end of a collective went away (killed, out of memory elsewhere); a slow
#: peer ("timed out") or this process's own failure (CUDA out of memory) is not it and keeps its traceback
LOST_PEER = ("connection reset by peer", "connection closed by peer", "broken pipe", "remote process exited")


def _lost_a_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another process of the run went away."""
    text = str(exc).lower()
    return any(words in text for words in LOST_PEER)


def _first_line(exc: BaseException) -> str:
    """The gist of a backend's message: its first sentence, without the source position gloo prefixes."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split("] ", 1)[-1] if text.startswith("[") else text
    return text.split(". ")[0]


def make_trainer(cfg: RunConfig, run_dir: Path, has_val: bool = True) -> L.Trainer:
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    monitor = t.monitor_key if has_val else TRAIN_LOSS_EPOCH
    # best.ckpt follows the monitored loss; last.ckpt is rewritten every epoch (or every N steps) whatever
    # the loss did, so a killed run resumes from its latest state (Lightning's save_last only follows saves)
    every_n = t.checkpoint_every_n_steps
    callbacks = [
        RunCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1, enable_version_counter=False
        ),
        RunCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every_n or None,
            every_n_epochs=None if every_n else 1,
            save_on_train_epoch_end=not every_n,
        ),
    ]
    if t.patience_validations and has_val:
        # checked after each validation (not at epoch end: a run may stop mid-epoch at max_steps, unvalidated)
        callbacks.append(
            RunEarlyStopping(
                monitor=monitor, patience=t.patience_validations, mode="min", check_on_train_epoch_end=False
            )
        )
    if t.max_cpu_seconds is not None:
        callbacks.append(CpuBudget(t.max_cpu_seconds))
    callbacks.append(FinalStepCheckpoint())  # after CpuBudget and EarlyStopping: sees their stop
    callbacks.append(ClosedEpochResume())
    # validate (and checkpoint the best model) every N steps across epochs, e.g. for step budgets
    every = (
        {"val_check_interval": t.val_every_n_steps, "check_val_every_n_epoch": None}
        if t.val_every_n_steps and has_val
        else {}
    )
    logger = RunCSVLogger(run_dir)
    # torch's linear backward gives the [1, H] weight of a one-output layer (the readout's last) the strides
    # (1, 1) instead of (H, 1): as contiguous, but DDP's bucket copy reports it as a mismatch on every process
    # (a copy of H numbers per step; nothing else differs)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    trainer = L.Trainer(
        **every,
        default_root_dir=run_dir,
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        gradient_clip_val=t.grad_clip,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        inference_mode=False,
        enable_progress_bar=progress_bar_wanted(t.progress),
        enable_model_summary=False,
        precision="64-true" if t.precision == "64" else "32-true",
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        limit_val_batches=1.0 if has_val else 0,
    )
    logger.steps_done = lambda: trainer.global_step
    return trainer


def training_progress(trainer, best: Path) -> dict:
    """Steps run, the step of the best checkpoint, whether early stopping ended the run, the monitored value."""
    best_step = int(torch.load(best, map_location="cpu", weights_only=False).get("global_step", -1))
    stopper = next((cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)), None)
    monitor = trainer.checkpoint_callback.monitor if trainer.checkpoint_callback else None
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    budget = next((cb for cb in trainer.callbacks if isinstance(cb, CpuBudget)), None)
    return {
        "steps": int(trainer.global_step),
        "best_step": best_step,
        "stopped_early": bool(stopper is not None and stopper.wait_count >= stopper.patience),
        "patience_validations": None if stopper is None else int(stopper.patience),
        "monitor": monitor,
        "best_monitored": None if score is None else float(score),
        **({} if budget is None else {"cpu_budget_s": budget.seconds, "cpu_budget_reached": budget.reached}),
    }


def final_checkpoint(trainer, run_dir: Path) -> Path:
    """After fit (every rank): checkpoints/last.ckpt brought to the final state when a run ended between two
    checkpoint intervals, and the checkpoint of the model to keep: best.ckpt in the run's own folder (a run
    resumed after its directory moved still names the old absolute path in its checkpoint state), else the
    final state, with a warning when validation was expected but never ran."""
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None
    except Exception:  # noqa: BLE001 - an unreadable last.ckpt (the resume fell back to best.ckpt): rewritten
        saved = None
    if saved != trainer.global_step:
        trainer.save_checkpoint(last)
    best = best_checkpoint(trainer, last)
    if best == last and trainer.limit_val_batches and trainer.global_rank == 0:
        every = trainer.val_check_interval if trainer.check_val_every_n_epoch is None else None
        log.warning(
            "%s: no validation ran in this run's %d steps%s: the model kept is the final state, not the best on "
            "validation",
            run_dir,
            trainer.global_step,
            f" (validation every {every} steps)" if every else "",
        )
    return best


def best_checkpoint(trainer, last: Path) -> Path:
    """best.ckpt in the run's own checkpoint folder (a run resumed after its directory moved still names the
    old absolute path in its checkpoint state), else `last`."""
    for cb in trainer.checkpoint_callbacks:
        if cb.filename == "best" and cb.best_model_path:
            here = Path(cb.dirpath) / "best.ckpt"
            if here.exists():
                return here
    return last
