"""What a run reports: metrics.csv (one dense row per validation) and one log line per validation (train.log; the
console without a terminal)."""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from multifi.files import write_text
from multifi.keys import (
    ENERGY_MAE,
    ENERGY_MAE_PER_ATOM,
    FORCES_MAE,
    TRAIN_LOSS_EPOCH,
    VAL_LOSS,
    is_val_key,
    val_key_fidelity,
)
from multifi.logs import FILE_ONLY

log = logging.getLogger("multifi")


class RunCSVLogger(Logger):
    """run_dir/metrics.csv: one row per step at which something was logged (in practice one per validation:
    epoch, step, lr, validation loss and per-fidelity metrics, and at epoch ends the epoch's training losses).
    Epochs count from 1, as the log lines do (the epoch a row was logged in).

    `step` counts the optimiser steps done when the row was logged, as a checkpoint's `global_step`, the
    training log and metrics.json's `best_step` do: `steps_done()` (the trainer's global_step) when set, else
    Lightning's logging step + 1 (that count is one too high after a resume from an epoch-end checkpoint).

    Per-step training values are left out; values logged at the same step share one row. A resumed run
    replaces the rows its interrupted predecessor wrote after the checkpoint it resumes from, so no row
    appears twice. The file is rewritten atomically after each row (it is small: one row per validation).
    """

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self._rows: list[dict] | None = None
        self._n_old = 0  # rows read from an earlier (interrupted) start of the run
        self.steps_done: Callable[[], int] | None = None

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """The run's configuration is config.yaml (and every checkpoint); nothing more to write."""

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        row = {k: _number(v) for k, v in metrics.items() if not k.endswith("_step")}
        if not set(row) - {"epoch"}:
            return
        if row.get("epoch") not in (None, ""):  # counted from 1, as the log's "epoch N/M" lines (Lightning: from 0)
            row["epoch"] = int(row["epoch"]) + 1
        rows = self._load()
        step = self.steps_done() if self.steps_done else int(step or 0) + 1
        if self._n_old:  # first row after a resume: forget what the interrupted start logged after this step
            rows[:] = [r for r in rows if int(float(r.get("step") or 0)) <= step]  # this step's: merged below
            self._n_old = 0
        if any(_is_epoch_training_value(k) for k in row):
            _drop_partial_epoch(rows, row.get("epoch"), step)
        if rows and int(float(rows[-1].get("step") or -1)) == step:
            rows[-1].update(row)
        else:
            rows.append({"epoch": row.pop("epoch", ""), "step": step, **row})
        self._write(rows)

    def _load(self) -> list[dict]:
        if self._rows is None:
            self._rows = []
            if self.path.is_file():
                with open(self.path, newline="") as f:
                    self._rows = [dict(r) for r in csv.DictReader(f)]
                if any(r.get("epoch") == "0" for r in self._rows):  # written before epochs counted from 1
                    for r in self._rows:
                        if r.get("epoch") not in (None, ""):
                            r["epoch"] = str(int(float(r["epoch"])) + 1)
            self._n_old = len(self._rows)
        return self._rows

    def _write(self, rows: list[dict]) -> None:
        columns = ["epoch", "step"]
        columns += sorted({k for r in rows for k in r} - set(columns))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        write_text(self.path, buf.getvalue())


def _is_epoch_training_value(key: str) -> bool:
    """Training values reach the logger only as epoch means (train_loss_epoch, train_<term>; _step ones are
    left out)."""
    return key.startswith("train_")


def _drop_partial_epoch(rows: list[dict], epoch, step: int) -> None:
    """An epoch's training means, logged again at its end after a run stopped inside it (max_steps, CPU budget)
    was continued: the earlier ones cover part of the epoch only, so they go (a row left empty goes too)."""
    if epoch in (None, ""):
        return
    for r in rows:
        if r.get("epoch") not in (None, "") and float(r["epoch"]) == float(epoch) and int(float(r["step"])) < step:
            for k in [k for k in r if _is_epoch_training_value(k)]:
                r[k] = ""
    rows[:] = [r for r in rows if any(v not in (None, "") for k, v in r.items() if k not in ("epoch", "step"))]


def _number(v):
    return v.item() if hasattr(v, "item") else v


class EpochLine(L.Callback):
    """One log line per validation (in logs without a terminal, CI, nohup, SLURM, where a progress bar would write one
    endless line): epoch, step, validation energy MAE per fidelity in meV and meV/atom, force MAE in meV/Å, val loss,
    lr, time since the last line. `file_only`: into train.log, not onto the console (a progress bar shows there, or
    train.progress is off)."""

    def __init__(self, file_only: bool = False):
        self._t0 = time.perf_counter()
        self.file_only = file_only

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._last_step = -1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._line(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:  # no validation at this epoch's end: no validation numbers
            self._line(trainer, pl_module, validated=False)

    def _line(self, trainer, pl_module, validated: bool = True) -> None:
        self._last_step = trainer.global_step
        train_loss = _epoch_train_loss(trainer, pl_module)  # on every process: a collective with several
        if trainer.global_rank != 0:
            return
        m = {k: _number(v) for k, v in trainer.callback_metrics.items() if validated or not k.startswith("val")}
        # without a validation at this step, the last one's numbers would read as this step's: left out
        if train_loss is not None:
            m[TRAIN_LOSS_EPOCH] = train_loss
        steps = _step_limit(trainer)
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", f"step {trainer.global_step}{steps}"]
        for key, what in ((ENERGY_MAE, "val E MAE meV"), (ENERGY_MAE_PER_ATOM, "meV/atom"), (FORCES_MAE, "F meV/Å")):
            maes = [f"{val_key_fidelity(k)} {m[k]:.1f}" for k in sorted(m) if is_val_key(k, key) and _finite(m[k])]
            if maes:
                parts.append(f"{what}: " + ", ".join(maes))
        if _finite(m.get(VAL_LOSS)):
            parts.append(f"val loss {m[VAL_LOSS]:.4g}")
        elif _finite(m.get(TRAIN_LOSS_EPOCH)):
            parts.append(f"train loss {m[TRAIN_LOSS_EPOCH]:.4g}")
        lr = getattr(pl_module, "last_step_lr", None)  # the rate of the last step taken, as metrics.csv's lr
        opts = trainer.optimizers
        if lr is None and opts:
            lr = opts[0].param_groups[0]["lr"]
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        now = time.perf_counter()
        parts.append(f"{now - self._t0:.1f} s")
        self._t0 = now
        log.info("  ".join(parts), extra=FILE_ONLY if self.file_only else None)


def _epoch_train_loss(trainer, pl_module) -> float | None:
    """This epoch's training loss so far (not yet logged when callbacks run), averaged over the processes as
    metrics.csv's train_loss_epoch is (each process's mean, then their mean); None before any step."""
    import torch

    sums = getattr(pl_module, "epoch_sums", None)
    mean = sums.means().get(TRAIN_LOSS_EPOCH) if sums is not None else None
    if (
        getattr(trainer, "world_size", 1) > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        both = torch.tensor(
            [float(mean) if mean is not None else 0.0, float(mean is not None)], device=pl_module.device
        )
        torch.distributed.all_reduce(both)
        return float(both[0] / both[1]) if both[1] > 0 else None
    return None if mean is None else float(mean)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def progress_bar_wanted(progress: bool) -> bool:
    """A live progress bar only on a terminal; logs get EpochLine instead."""
    return bool(progress) and sys.stderr.isatty()


def _step_limit(trainer) -> str:
    """ "/N": the step the run ends at, whichever of max_steps and the epochs comes first ("" when unknown)."""
    import math

    per_epoch = getattr(trainer, "num_training_batches", None)
    limits = [trainer.max_steps] if trainer.max_steps and trainer.max_steps > 0 else []
    if trainer.max_epochs and trainer.max_epochs > 0 and isinstance(per_epoch, int) and not math.isinf(per_epoch):
        limits.append(trainer.max_epochs * per_epoch)
    return f"/{min(limits)}" if limits else ""
