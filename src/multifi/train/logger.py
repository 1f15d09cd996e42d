"""CSV metrics logger that writes run_dir/metrics.csv and appends to it when a run is resumed."""
from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning deletes an existing metrics.csv here; we keep it
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """metrics.csv directly in the run directory (no version sub-folders)."""

    def __init__(self, run_dir):
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
