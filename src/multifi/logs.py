"""The one place that keeps third-party chatter (Lightning's loggers, tips and deprecation warnings) out of
multifi's output; called by the CLI, by `train` and by the experiment runner."""

from __future__ import annotations

import logging
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
)


def quiet_lightning(verbose: bool = False) -> None:
    """Lightning's loggers at WARNING (INFO when `verbose`), its tips and known harmless warnings filtered."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for pattern in LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
