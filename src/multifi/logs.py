"""The one place that keeps third-party chatter (Lightning's loggers, tips and deprecation warnings) out of
multifi's output; called by the CLI, by `train` and by the experiment runner."""

from __future__ import annotations

import logging
import os
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
LIGHTNING_WARNINGS = (
    r".*LeafSpec.*",
    r".*does not have many workers.*",
    r".*Experiment logs directory.*",
    r".*limit_val_batches.*",
    r".*dataloader is not resumable.*",  # the datamodule resumes it
    r".*smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",  # on resume
    r".*sync_dist=True.*",  # per-fidelity metrics are reduced by hand
    r".*could not find the monitored key.*",  # a run stopped before its first validation: multifi says so itself
)


#: `extra` of a log record meant for train.log only (the per-validation lines while a progress bar shows them)
FILE_ONLY = {"file_only": True}


def not_file_only(record: logging.LogRecord) -> bool:
    """A console handler's filter: records logged with FILE_ONLY stay out of it."""
    return not getattr(record, "file_only", False)


def quiet_lightning(verbose: bool = False) -> None:
    """Lightning's loggers at WARNING (INFO when `verbose`), its tips and known harmless warnings filtered."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for pattern in LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def is_leader_process() -> bool:
    """True in the process that owns the run directory and the terminal: global rank 0 under torchrun, under
    SLURM when Lightning runs the job's tasks as one distributed training, or the process that Lightning's
    launcher starts the other ranks from (it sets LOCAL_RANK only in those). Independent SLURM tasks (one
    task, or an interactive job Lightning does not manage) each lead their own run."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]) == 0
    if "SLURM_PROCID" in os.environ and slurm_runs_the_ranks():
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def slurm_runs_the_ranks() -> bool:
    """Whether Lightning takes the SLURM job's tasks as the ranks of one training (its SLURMEnvironment rule:
    several tasks, a batch job rather than an interactive 'bash' or 'interactive' one)."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return tasks > 1 and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
