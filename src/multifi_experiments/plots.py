"""PNG figures of an experiment report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from multifi.files import atomic_write

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight"))
    _plt().close(fig)
    return path


def learning_curve(path: Path, curves: dict[str, dict], title: str, dashed: set[str] = frozenset()) -> Path:
    """curves: variant → {n: {"mean", "std", "seeds"}}; log-log MAE vs n with std error bars."""
    return learning_curves(path, [(curves, "test MAE (meV)")], title, dashed)


def learning_curves(
    path: Path,
    panels: list[tuple[dict[str, dict], str]],
    title: str,
    dashed: set[str] = frozenset(),
    xlabel: str = "top-fidelity training molecules n",
) -> Path:
    """One log-log panel per (curves, y label), side by side; curves as in learning_curve."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, (curves, ylabel) in zip(axes[0], panels):
        many = len(curves) > 10  # tab10 would repeat colours: tab20 and varied markers keep curves apart
        colours = plt.get_cmap("tab20" if many else "tab10")
        for k, (name, by_n) in enumerate(curves.items()):
            ns = sorted(by_n, key=float)
            if not ns:
                continue
            x = np.array([float(n) for n in ns])
            y = np.array([by_n[n]["mean"] for n in ns])
            err = np.array([by_n[n]["std"] or 0.0 for n in ns])
            ax.errorbar(
                x,
                y,
                yerr=err,
                marker=MARKERS[k % len(MARKERS)] if many else "o",
                ms=4,
                capsize=3,
                label=name,
                ls="--" if name in dashed else "-",
                color=colours(k % colours.N),
            )
        if not any(curves.values()):  # a metric no run measured (e.g. stress at a fidelity without stress labels)
            ax.text(0.5, 0.5, "no run measured this", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylabel(ylabel)
            ax.set_xticks([]), ax.set_yticks([])
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        all_ns = sorted({float(n) for c in curves.values() for n in c})
        ax.set_xticks(all_ns, [f"{n:g}" for n in all_ns])
        ax.xaxis.set_minor_locator(NullLocator())
        lo, hi = ax.get_ylim()
        narrow = hi / max(lo, 1e-300) < 10  # within one decade: more labelled ticks
        ax.yaxis.set_major_locator(
            LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0))
        )
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if len(curves) > 10:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    if len(panels) == 1:
        axes[0][0].set_title(title, fontsize=10)
    else:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def paired_points(
    path: Path,
    groups: list[str],
    joint: list,
    separate: list,
    joint_err: list,
    separate_err: list,
    title: str,
    labels=("joint", "separate"),
) -> Path:
    """One pair of points (joint, separate) per group with std error bars, joined by a line; log y axis
    (points, not bars: a bar's length means nothing on a log axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 2), 4.2))
    x = np.arange(len(groups))
    nan = lambda v: np.array([np.nan if a is None else a for a in v], dtype=float)  # noqa: E731
    a, b = nan(joint), nan(separate)
    ax.plot(np.stack([x - 0.12, x + 0.12]), np.stack([a, b]), color="0.7", lw=1, zorder=1)
    ax.errorbar(x - 0.12, a, yerr=nan(joint_err), fmt="o", capsize=3, label=labels[0], zorder=2)
    ax.errorbar(x + 0.12, b, yerr=nan(separate_err), fmt="s", capsize=3, label=labels[1], zorder=2)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("test MAE (meV)")
    ax.set_yscale("log")
    from matplotlib.ticker import LogFormatter

    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 2000, not 2×10³
        set_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.6)))
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def similarity_map(path: Path, names: list[str], sim: np.ndarray, title: str) -> Path:
    plt = _plt()
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.6 + 0.6 * k))
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{sim[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(sim[i, j]) > 0.6 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def pca_map(path: Path, names: list[str], xy: np.ndarray, explained: list[float], title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    ax.scatter(xy[:, 0], xy[:, 1], s=30)
    for (x, y), name in zip(xy, names):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f} % of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f} % of variance)" if len(explained) > 1 else "PC2")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    return _save(fig, path)
