"""Lightning callbacks of a run: atomic checkpoints, checkpoints and early stopping that survive a resume
exactly, the loop state of a run's last step, and the CPU-time budget."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from multifi.files import atomic_write

log = logging.getLogger("multifi")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: never half-written."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


class RunEarlyStopping(EarlyStopping):
    """EarlyStopping whose patience is the configuration's, also on resume (Lightning restores the checkpoint's,
    so a resume with a raised train.early_stopping_patience stopped at the old one while config.yaml said the new)."""

    @property
    def state_key(self) -> str:
        """EarlyStopping's key, so checkpoints written before this class resume with their state."""
        return "EarlyStopping" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    def on_train_start(self, trainer, pl_module) -> None:
        """A checkpoint written at the validation that stopped the run (the process killed before its final files):
        the resume stops before any step, as the run did (it trained on, and a later improvement changed the model)."""
        if self.wait_count >= self.patience:
            trainer.should_stop = True


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps its state when the run directory moved (Lightning drops the best score then,
    so the first validation after the resume would replace best.ckpt whatever its error): paths of the old
    checkpoint folder are read as the same files in this one. The latest-state checkpoint (no monitor) is also
    written at the end of the step during which SIGTERM came (a scheduler's time limit), in a single-process
    run: the resume continues from there, not from the last epoch end."""

    _at_epoch_end: int | None = None  # the step whose checkpoint waits for the epoch's end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """A step checkpoint due at a step that a validation follows is written once that validation and what
        follows it at that step are done: at the validation's end (Lightning's deferred save) inside an epoch, at
        the epoch's end after its last step (where the best checkpoint saves). Written before the validation, it
        held none of its early-stopping count, schedule step and best score, and a run killed in between resumed
        without them (at its last step, without that validation)."""
        every = self._every_n_train_steps
        due = self.monitor is None and every >= 1 and trainer.global_step % every == 0
        if due and hasattr(self, "_defer_save_until_validation") and not self._should_skip_saving_checkpoint(trainer):
            if _validation_due(trainer):
                if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                    self._at_epoch_end = trainer.global_step
                else:
                    self._defer_save_until_validation = True
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        terminated = trainer.received_sigterm and trainer.world_size == 1  # several: ranks learn of it at other steps
        if self.monitor is None and terminated and self._last_global_step_saved != trainer.global_step:
            if _nothing_else_due(trainer):
                self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._at_epoch_end is not None and self._at_epoch_end == trainer.global_step:
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
        self._at_epoch_end = None

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key, so checkpoints written before this class resume with their state."""
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath and Path(old).name == Path(self.dirpath).name:
            moved = lambda p: str(Path(self.dirpath) / Path(p).name) if p else p  # noqa: E731
            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                **{k: moved(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path", "last_model_path")},
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)


def _nothing_else_due(trainer) -> bool:
    """Whether the step that just ended is all that happens before the next one: no validation due (Lightning runs
    it after the batch's hooks; a checkpoint before it made the resume skip it), no stop requested, not the
    epoch's last batch (Lightning closes the epoch after it). A checkpoint here is one a resume continues from
    exactly (ModelCheckpoint's step checkpoints are taken at the same point)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.should_stop or loop.batch_progress.is_last_batch or 0 < trainer.max_steps <= trainer.global_step:
        return False
    return _validation_due(trainer) is False  # unknown (None): no checkpoint rather than a wrong one


def _validation_due(trainer) -> bool | None:
    """Whether Lightning validates after the step that just ended (it does so after the batch's hooks); None where
    another Lightning's internals do not tell."""
    try:
        return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):
        return None


class FinalStepCheckpoint(Callback):
    """Checkpoints written after the step that ends a run (max_steps, CPU budget, early stopping at a validation
    inside an epoch) record the loop as it stood at
    that step. Lightning closes an epoch cut short by the stop as if it were complete (and the epoch-end
    checkpoint says so), so a resume with a higher max_steps skipped the rest of that epoch and shifted every
    later epoch's sample order; now it continues that epoch where the run stopped, as an uninterrupted run."""

    def __init__(self):
        self.final: dict | None = None

    def on_train_batch_end(self, trainer, *args) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            # a stop requested at this batch makes Lightning validate it (reaching max_steps alone does not:
            # the steps after the last validation inside the epoch never counted for the model kept)
            trainer.should_stop = True
        if trainer.should_stop:
            self._capture(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Early stopping at a validation inside an epoch (val_every_n_steps) ends the run there too."""
        loop = trainer.fit_loop.epoch_loop.batch_progress.current
        inside = loop.processed < trainer.num_training_batches
        if trainer.should_stop and not trainer.sanity_checking and self.final is None and inside:
            self._capture(trainer)

    def _capture(self, trainer) -> None:
        data = trainer.datamodule
        self.final = {
            "fit_loop": copy.deepcopy(trainer.fit_loop.state_dict()),
            "epoch": trainer.current_epoch,
            "data": None if data is None else (type(data).__qualname__, copy.deepcopy(data.state_dict())),
            "sums": _epoch_sums_state(trainer),
        }

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.final is None:
            return
        checkpoint["loops"]["fit_loop"] = self.final["fit_loop"]
        checkpoint["epoch"] = self.final["epoch"]
        if self.final["data"] is not None:
            key, state = self.final["data"]
            checkpoint[key] = state
        if self.final["sums"] is not None:  # the cut epoch's training-loss sums, so its logged means cover it all
            checkpoint["train_epoch_sums"] = self.final["sums"]


class ClosedEpochResume(Callback):
    """Resuming from a checkpoint written after an epoch's last batch but before the epoch closed (a step
    checkpoint, a stop at max_steps or the CPU budget, Ctrl-C before the epoch-end save), Lightning closes that
    epoch when it restarts but keeps its mid-epoch restart stage: the next epoch then ran without its
    epoch-start hooks and without being counted as started, and every later checkpoint carried epoch counters
    one behind (a resume from one of them mid-epoch ran extra steps, a resume with more epochs one epoch too
    few). Once Lightning has closed the epoch, the restart is over.

    Resuming from a checkpoint written by an epoch-end hook (the epoch counted as processed, not yet as
    completed), Lightning ends that epoch once more and counts it processed twice; samplers take their epoch
    from that count, so every later epoch drew the next epoch's sample order (the run differed from an
    uninterrupted one). The count is set back before Lightning repeats the epoch's end.

    A checkpoint at an epoch's last batch also holds that epoch's training-loss sums; where Lightning closes the
    epoch on restart without running its end, they are dropped (they were added to the next epoch's means)."""

    def on_train_start(self, trainer, pl_module) -> None:
        loop = trainer.fit_loop
        done = loop.epoch_progress.total
        closed = done.ready == done.started == done.processed == done.completed
        if getattr(loop, "restarted_mid_epoch", False) and closed:  # (restart stages: Lightning ≥ 2.5)
            loop.reset_restart_stage()
            # Lightning closed the epoch without its epoch-end hooks: its training-loss sums (kept by a checkpoint
            # at its last batch) must not enter the next epoch's means
            if hasattr(pl_module, "epoch_sums"):
                pl_module.epoch_sums = type(pl_module.epoch_sums)()
        if getattr(loop, "restarted_on_epoch_end", False) and done.processed == done.completed + 1:
            for progress in (loop.epoch_progress.total, loop.epoch_progress.current):
                progress.processed -= 1


def _epoch_sums_state(trainer) -> dict | None:
    sums = getattr(trainer.lightning_module, "epoch_sums", None)
    return None if sums is None else copy.deepcopy(sums.state_dict())


class CpuBudget(Callback):
    """Stops training (after the current optimiser step) once it has used `seconds` of this process's CPU time,
    counted from the start of fitting and summed over resumed starts (the spent time is kept in checkpoints)."""

    def __init__(self, seconds: float):
        self.seconds, self.spent, self.reached = seconds, 0.0, False
        self._since: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._since = time.process_time()

    def on_train_start(self, trainer, pl_module) -> None:
        """A checkpoint written at the step that used up the budget (the process killed before its final files):
        the resume stops before any step, as the run did. Resumed with a larger budget, the run trains on (and
        is no longer said to have reached it)."""
        if self.reached and self.spent >= self.seconds:
            trainer.should_stop = True
        else:
            self.reached = False

    def _update(self) -> None:
        now = time.process_time()
        if self._since is not None:
            self.spent += now - self._since
        self._since = now

    #: optimiser steps between checks in a multi-process run (each check is a collective over the ranks)
    EVERY_N_STEPS_DISTRIBUTED = 20

    def on_train_batch_end(self, trainer, *args) -> None:
        self._update()
        if trainer.world_size == 1:
            if self.spent >= self.seconds:
                self.reached = trainer.should_stop = True
            return
        # any rank at the budget stops every rank (their clocks differ a little); every rank checks at the same steps
        if trainer.global_step % self.EVERY_N_STEPS_DISTRIBUTED == 0:
            if trainer.strategy.reduce_boolean_decision(self.spent >= self.seconds, all=False):
                self.reached = trainer.should_stop = True

    def state_dict(self) -> dict:
        self._update()
        return {"spent": self.spent, "reached": self.reached}

    def load_state_dict(self, state: dict) -> None:
        self.spent, self.reached = float(state["spent"]), bool(state["reached"])
