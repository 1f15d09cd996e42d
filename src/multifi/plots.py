"""Figures of one model or run: parity plots per fidelity (evaluate --plot) and a run's learning curve
(multifi plot RUN_DIR). matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from multifi.errors import MultifiError
from multifi.files import atomic_write
from multifi.keys import ENERGY_MAE, METRIC_KEYS, METRIC_LABELS, is_val_key, val_key_fidelity

log = logging.getLogger("multifi")


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def image_format(path: Path) -> str:
    """The image format of `path` from its suffix (none: png); a one-line error for a format matplotlib lacks."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise MultifiError(
            f"{path}: cannot write a .{fmt} image (use .png, .pdf, .svg or another of {', '.join(known)})"
        )
    return fmt


def save_figure(fig, path: Path, **kwargs) -> Path:
    """Write `fig` to `path` in the format its suffix names (atomically), and close it."""
    fmt = image_format(path)
    atomic_write(Path(path), lambda f: fig.savefig(f, format=fmt, dpi=120, **kwargs))
    pyplot().close(fig)
    return Path(path)


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, bbox_inches="tight")


def parity_plot(
    path: Path,
    fidelity: np.ndarray,
    reference: np.ndarray,
    predicted: np.ndarray,
    title: str = "",
    estimated: np.ndarray | None = None,
    relative: bool = False,
) -> Path:
    """One panel per fidelity: predicted against reference energy per atom (eV/atom), with MAE in meV/atom;
    `relative`: energies given relative to the model's per-element reference energies (axes say so).

    fidelity [P] names, reference [P] and predicted [P] eV/atom of the same samples; estimated [P] bool: samples
    with an element whose reference at that fidelity was estimated from other fidelities, drawn apart and left
    out of the panel's MAE (as evaluate's table does), their own MAE beside it."""
    image_format(path)
    plt = pyplot()
    names = list(dict.fromkeys(fidelity.tolist()))
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        sel = fidelity == name
        ref, pred = reference[sel], predicted[sel]
        apart = np.zeros(len(ref), bool) if estimated is None else np.asarray(estimated, bool)[sel]
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1)
        ax.scatter(ref[~apart], pred[~apart], s=6, alpha=0.6)
        ax.set_xlim(lo - pad, hi + pad), ax.set_ylim(lo - pad, hi + pad)
        head = f"{name}  (n = {int((~apart).sum())}, MAE {_mae_mev(ref, pred, ~apart):.1f} meV/atom)"
        if apart.any():
            ax.scatter(ref[apart], pred[apart], s=10, marker="x", color="tab:red", label="estimated references")
            ax.legend(fontsize=7, loc="upper left")
            head += f"\nestimated references: n = {int(apart.sum())}, MAE {_mae_mev(ref, pred, apart):.1f} meV/atom"
        ax.set_title(head, fontsize=9)
        what = "energy − per-element\nreferences" if relative else "energy"  # two lines: panels stay apart
        ax.set_xlabel(f"reference {what} (eV/atom)", fontsize=9)
        ax.set_ylabel(f"predicted {what} (eV/atom)", fontsize=9)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _mae_mev(reference: np.ndarray, predicted: np.ndarray, where: np.ndarray) -> float:
    """MAE (meV) of the samples `where` (eV inputs); NaN for none."""
    return 1000 * float(np.abs(predicted[where] - reference[where]).mean()) if where.any() else float("nan")


def read_metrics_csv(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise MultifiError(f"{run_dir}: no metrics.csv (not a run directory, or no validation yet)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def learning_curve_plot(run_dir: Path, path: Path, key: str = ENERGY_MAE) -> Path:
    """Validation `key` (default energy MAE, meV) per fidelity against the training step of a run directory."""
    image_format(path)
    rows = read_metrics_csv(run_dir)
    columns = sorted({c for r in rows for c in r if is_val_key(c, key) and r[c]})
    if not columns:
        validated = any(r[c] for r in rows for c in r if any(is_val_key(c, m) for m in METRIC_KEYS))
        raise MultifiError(
            f"{run_dir}/metrics.csv: no validation {key}"
            + (" (its validation data has no such labels)" if validated else " yet")
        )
    from matplotlib.ticker import LogFormatter

    missing = [f for f in _trained_fidelities(run_dir) if f not in {val_key_fidelity(c) for c in columns}]
    if missing:
        log.warning(
            "%s: no validation %s curve for %s (no validation labels of it, or all left out for estimated "
            "reference energies)",
            run_dir,
            key,
            ", ".join(missing),
        )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = []
    for col in columns:
        pts = [(int(float(r["step"])), float(r[col])) for r in rows if r.get(col)]
        if pts:
            x, y = zip(*pts)
            values += y
            ax.plot(x, y, marker="o", ms=3, label=val_key_fidelity(col))
    best = _best_step(run_dir)
    if best is not None:  # the checkpoint the run kept (model.pt)
        ax.axvline(best, color="0.5", ls="--", lw=1, label=f"best (step {best})")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation " + METRIC_LABELS.get(key, key))
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 3 * min(positive):  # a log axis has enough ticks to read from 3× on
        ax.set_yscale("log")
        for axis_set in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 60, 80, not 6×10¹
            axis_set(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.6)))
    ax.grid(alpha=0.3)
    ax.legend(title="fidelity", fontsize=8)
    if missing:
        ax.text(0.01, 0.01, f"no validation curve: {', '.join(missing)}", transform=ax.transAxes, fontsize=7)
    ax.set_title(str(run_dir), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _best_step(run_dir: Path) -> int | None:
    """The step of the checkpoint a finished run kept (metrics.json `best_step`); None before it finished."""
    try:
        step = json.loads((Path(run_dir) / "metrics.json").read_text()).get("best_step")
    except (OSError, ValueError, AttributeError):
        return None
    return int(step) if isinstance(step, (int, float)) and step >= 0 else None


def _trained_fidelities(run_dir: Path) -> list[str]:
    """Fidelities a finished run trained on (metrics.json `n_train`); [] before it finished."""
    path = Path(run_dir) / "metrics.json"
    try:
        return [name for name, n in json.loads(path.read_text()).get("n_train", {}).items() if n]
    except (OSError, ValueError, AttributeError):
        return []
