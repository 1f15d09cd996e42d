"""What every stage of an experiment shares: the spec, its paths, the data catalog and the command line;
where each run's result and work folder live; and a one-line description of the machine."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from multifi_experiments.spec import ExperimentSpec, Paths


class Catalog(Protocol):
    """What an experiment's data provides (methods, labelled structures as integer ids) and how a run
    reads them; implemented by catalog.LabelCatalog (shared QM9 folder) and catalog.SourceCatalog
    (structure files of a spec's `data` section)."""

    noun: str

    def methods(self) -> list[str]: ...

    def has(self, method: str) -> bool: ...

    def check(self, method: str, where: str) -> None: ...

    def labelled(self, method: str) -> np.ndarray: ...

    def plan_data(self, sources: list[tuple[str, np.ndarray]]) -> tuple[dict, list[dict], list[dict]]: ...

    def split_keys(self, ids) -> list: ...

    def composition(self, ids: np.ndarray) -> np.ndarray: ...

    def read(self, method: str, ids: np.ndarray): ...


@dataclass
class Context:
    spec: ExperimentSpec
    paths: Paths
    catalog: Catalog
    command: str  # the command line that reproduces this invocation (written into every result)


def result_path(ctx: Context, run_id: str) -> Path:
    """<output>/runs/<run id>.json: one finished run's result."""
    return ctx.paths.output / "runs" / f"{run_id}.json"


def work_dir(ctx: Context, run_id: str) -> Path:
    """<work>/<run id>/: inputs/, run/ (the training run directory), log.txt, clock.json, signature."""
    return ctx.paths.work / run_id


def lock_path(ctx: Context, run_id: str) -> Path:
    """<work>/<run id>.lock: held (flock) by the process training the run."""
    return ctx.paths.work / f"{run_id}.lock"


def process_identity(pid: int) -> str:
    """'PID START': the process id and, on Linux, its start time in clock ticks since boot (/proc/PID/stat), so
    that a reused process id is not taken for the process that wrote it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return str(pid)


def is_running(ctx: Context, run_id: str) -> bool:
    """Whether a process trains the run now: the process its runner recorded in the run's lock file (id and
    start time) is alive (a run killed mid-way leaves a dead one: it resumes when run again). Reads only:
    probing the lock itself would make a runner starting the run that moment take it for busy."""
    try:
        recorded = lock_path(ctx, run_id).read_text().split()
        pid = int(recorded[0]) if recorded else 0
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return len(recorded) < 2 or process_identity(pid) == " ".join(recorded[:2])


def machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; report written {time.strftime('%Y-%m-%d %H:%M')}"
    )


def labels_digest(ctx: Context, plan) -> str | None:
    """The hash of the labels a QM9 run reads (catalog.LabelCatalog.labels_digest: the values at the methods its
    sources, Δ labels and evaluation name, of the molecules its index files list); None for a spec's own data
    files, whose contents the plan's signature covers."""
    digest = getattr(ctx.catalog, "labels_digest", None)
    if digest is None:
        return None
    known = ctx.catalog.__dict__.setdefault("_labels_digests", {})  # plan signature → digest, per catalog read
    key = plan.signature()
    if key not in known:
        methods = [m for m in _methods_of(plan) if ctx.catalog.has(m)]
        known[key] = digest(methods, _qm9_indices_of(plan))
    return known[key]


def _methods_of(plan) -> list[str]:
    """The methods whose labels a plan reads: its QM9 sources' fidelities, its Δ labels' and evaluation's."""
    methods = set()
    for source in (plan.config.get("data") or {}).get("sources") or []:
        qm9 = source.get("qm9") or {}
        if qm9.get("fidelity") or source.get("fidelity"):
            methods.add(str(qm9.get("fidelity") or source.get("fidelity")))
    for entry in [*plan.derived, plan.evaluate, plan.evaluate.get("difference") or {}]:
        methods.update(str(entry[k]) for k in ("high", "low") if entry.get(k))
    return sorted(methods)


def _qm9_indices_of(plan) -> np.ndarray:
    """Every QM9 index the plan's files list (integer ids, or keys written qm9:<index>)."""
    out: list[int] = []
    for values in plan.files.values():
        for v in values:
            if isinstance(v, str):
                if v.startswith("qm9:"):
                    out.append(int(v[4:]))
            else:
                out.append(int(v))
    return np.asarray(out, dtype=np.int64)


def run_state(ctx: Context, plan, result: dict | None) -> str:
    """plan.result_state, and "other" for a result made from other labels than the data holds now (a result
    recording its labels' hash, labels_digest: runs finished before it was recorded are taken as they are)."""
    state = plan.result_state(result)
    if state != "other" and result.get("labels") and result["labels"] != labels_digest(ctx, plan):
        return "other"
    return state
