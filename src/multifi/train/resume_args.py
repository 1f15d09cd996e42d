"""The command-line checks of `multifi train --resume RUN_DIR`, cheap enough to run before torch is imported."""

from __future__ import annotations

from pathlib import Path

from multifi.errors import MultifiError

INIT_FROM, INIT_FIDELITIES = ["train", "init_from"], ["train", "init_fidelities"]


def check_resume_args(config: str | None, overrides: list, resume_dir: str) -> Path:
    """The run directory's config.yaml, or a one-line error: a config given as well, output_dir moved, no such
    run directory, or a folder that is none."""
    if config is not None:
        raise MultifiError(
            f"{config}: a resumed run trains with its own config.yaml ({resume_dir}); give either CONFIG.yaml "
            "or --resume RUN_DIR (change what a resume may change with --set)"
        )
    moved = [o for o in overrides if str(o).split("=", 1)[0].strip() == "output_dir"]
    if moved:
        raise MultifiError(f"--set {moved[0]}: a resumed run stays in its directory ({resume_dir})")
    start = [o for o in overrides if str(o).split("=", 1)[0].strip().split(".")[:2] in (INIT_FROM, INIT_FIDELITIES)]
    if start:
        raise MultifiError(
            f"--set {start[0]}: a resumed run continues from its checkpoint's weights; train.init_from and "
            "train.init_fidelities act on a new run's first step only (start one to train from other weights)"
        )
    if not Path(resume_dir).is_dir():
        raise MultifiError(
            f"{resume_dir}: no such run directory (a run stopped before it started has nothing to resume)"
        )
    source = Path(resume_dir) / "config.yaml"
    if not source.exists():
        raise MultifiError(
            f"{resume_dir}: not a run directory (no config.yaml; a run stopped while starting: train it anew)"
        )
    return source
