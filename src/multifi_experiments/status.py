"""Where a long experiment stands: every planned run done, in flight or to do, and the CPU time left.

    multifi experiment status SPEC.yaml [--only PART|RUN_ID_PREFIX] [--json]

Reads the output and work folders only (nothing is trained or written). A run is `done` when its result
JSON carries the plan's signature, `in flight` when its work folder was made by this plan and holds a
checkpoint or a clock (a killed run resumes from there), `to extend` when it stopped at a step cap lower
than the plan's (the runner continues it), `stale` when its work folder is another plan's (the runner starts
it afresh), else `to do`. The CPU time left is estimated per run from the finished runs
of the same part and variant (their mean CPU seconds; an in-flight run counts the part of that mean it has
not spent yet); runs of a variant with no finished run have no estimate and are counted apart.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from multifi_experiments.context import Context, is_running, result_path, run_state, work_dir
from multifi_experiments.plan import RunPlan

STATES = ("done", "in flight", "to extend", "stale", "to do")


@dataclass
class RunStatus:
    id: str
    state: str  # one of STATES
    group: str  # part/variant: the runs whose mean cost estimates this one's
    steps: int | None = None  # optimiser steps run (done: all; in flight: up to the last validation)
    best_step: int | None = None
    cpu_seconds: float = 0.0  # spent so far, summed over every start
    starts: int = 0
    left_cpu_seconds: float | None = None  # estimate; None: nothing to estimate it from
    cap_steps: int | None = None  # the plan's max_steps
    bound: bool = False  # left_cpu_seconds is an upper bound (cap × CPU per step), not a group mean
    resumable: bool = False  # to extend: its last checkpoint is still there (else it trains again from step 0)
    running: bool | None = None  # in flight: a process trains it now (else it stopped and resumes when run again)


def experiment_status(ctx: Context, only=()) -> list[RunStatus]:
    """The state of every run of the spec (selected by `only`: parts, run-id prefixes or arms)."""
    if ctx.spec.selection is not None:
        return _estimate(_selection_rows(ctx, only))
    if ctx.spec.few_shot is not None:
        from multifi_experiments import fewshot

        plans = fewshot.plan_runs(ctx, fewshot.plan_splits(ctx))
    else:
        from multifi_experiments.runner import plan_parts

        plans = [p for pp in plan_parts(ctx, write=False).values() for p in pp.plans]
    rows = run_status(ctx, plans)  # estimates from every finished run, then the selection
    if only:
        from multifi_experiments.runner import select

        chosen = {p.id for p in select(plans, list(only))}
        rows = [r for r in rows if r.id in chosen]
    return rows


def run_status(ctx: Context, plans: list[RunPlan]) -> list[RunStatus]:
    """The state of every plan, with spent and estimated remaining CPU seconds."""
    return _estimate([_status(ctx, p) for p in plans])


def _estimate(out: list[RunStatus]) -> list[RunStatus]:
    """Fill left_cpu_seconds from the mean CPU seconds of the finished runs of each group; a run of a group
    with no finished run gets an upper bound, its step cap × the finished runs' CPU seconds per step."""
    spent: dict[str, list[float]] = {}
    for s in out:
        if s.state == "done":
            spent.setdefault(s.group, []).append(s.cpu_seconds)
    done = [s for s in out if s.state == "done" and s.steps]
    per_step = sum(s.cpu_seconds for s in done) / sum(s.steps for s in done) if done else None
    for s in out:
        mean = sum(spent[s.group]) / len(spent[s.group]) if s.group in spent else None
        if s.state == "done":
            s.left_cpu_seconds = 0.0
            continue
        if s.state == "to extend":  # at most the steps up to the raised cap (all of them without its checkpoint)
            steps = s.cap_steps - s.steps if s.resumable else s.cap_steps
            s.left_cpu_seconds, s.bound = steps * s.cpu_seconds / s.steps, True
            continue
        if mean is None and per_step is not None and s.cap_steps:
            mean, s.bound = s.cap_steps * per_step, True
        if mean is not None:
            s.left_cpu_seconds = max(mean - s.cpu_seconds, 0.0) if s.state == "in flight" else mean
    return out


def _status(ctx: Context, plan: RunPlan) -> RunStatus:
    group = f"{plan.part}/{plan.meta.get('variant', plan.meta.get('role', ''))}"
    cap = (plan.config.get("train") or {}).get("max_steps")
    result = _read_json(result_path(ctx, plan.id))
    signature = plan.signature()
    state = run_state(ctx, plan, result)
    if state == "done":
        return RunStatus(
            plan.id,
            "done",
            group,
            steps=result.get("steps"),
            best_step=result.get("best_step"),
            cpu_seconds=float(result.get("cpu_seconds", 0.0)),
            starts=int(result.get("starts", 1)),
            cap_steps=cap,
        )
    work = work_dir(ctx, plan.id)
    sig = work / "signature"
    if state == "extend" and not (sig.exists() and sig.read_text().strip() == signature):
        return RunStatus(
            plan.id,
            "to extend",
            group,
            steps=result["steps"],
            best_step=result.get("best_step"),
            cpu_seconds=float(result.get("cpu_seconds", 0.0)),
            starts=int(result.get("starts", 1)),
            cap_steps=cap,
            resumable=(work / "run" / "checkpoints" / "last.ckpt").exists(),
        )
    if not sig.exists():
        return RunStatus(plan.id, "to do", group, cap_steps=cap)
    if sig.read_text().strip() != signature:
        return RunStatus(plan.id, "stale", group, cap_steps=cap)
    clock = _read_json(work / "clock.json") or {}
    steps, best = _progress(work / "run" / "metrics.csv", _monitor_key(plan))
    return RunStatus(
        plan.id,
        "in flight",
        group,
        steps=steps,
        best_step=best,
        cpu_seconds=float(clock.get("cpu", 0.0)),
        starts=int(clock.get("starts", 0)),
        cap_steps=cap,
        running=is_running(ctx, plan.id),
    )


def _selection_rows(ctx: Context, only=()) -> list[RunStatus]:
    """One row per training run of a selection spec: round 0 once per (model, seed), shared by that model's
    arms (`done` when its result exists), every later round per (arm, seed) (`done` when the round's record
    exists: its run trained, calibrated and its picks made; CPU time the run's and the selection's). A run
    not done whose work folder holds a clock is `in flight`. `only`: arms or run-id prefixes (round 0 rows
    belong to every arm of their model). Every round trains the same number of steps, so the finished runs
    of a model, whatever their round, estimate the cost of its others."""
    from multifi_experiments.selection import PART, record_path, seeds_of

    sp = ctx.spec.selection
    n0 = sp.rounds[0]
    rows = []
    for model in dict.fromkeys(cfg.model for cfg in sp.arms.values()):
        arms = [a for a, cfg in sp.arms.items() if cfg.model == model]
        for seed in seeds_of(ctx):
            run_id = f"{PART}/{model}/s{seed}/r0_n{n0}"
            if _chosen(run_id, arms, only):
                result = _read_json(result_path(ctx, run_id))
                cpu = None if result is None else float(result.get("cpu_seconds", 0.0))
                rows.append(_selection_row(ctx, run_id, f"{PART}/{model}", cpu))
    for arm, cfg in sp.arms.items():
        for seed in seeds_of(ctx):
            for r, n in enumerate(sp.rounds[1:], start=1):
                run_id = f"{PART}/{arm}/s{seed}/r{r}_n{n}"
                if not _chosen(run_id, [arm], only):
                    continue
                record = _read_json(record_path(ctx, arm, seed, r))
                cpu = None
                if record is not None:
                    cpu = float(record.get("cpu_seconds", 0.0)) + float(record.get("selection_cpu_seconds", 0.0))
                rows.append(_selection_row(ctx, run_id, f"{PART}/{cfg.model}", cpu))
    return rows


def _chosen(run_id: str, arms: list[str], only) -> bool:
    return not only or any(o in arms or run_id.startswith(o) for o in only)


def _selection_row(ctx: Context, run_id: str, group: str, done_cpu: float | None) -> RunStatus:
    """`done` with done_cpu seconds, else `in flight` (CPU and starts from the work folder's clock) or `to do`."""
    if done_cpu is not None:
        return RunStatus(run_id, "done", group, cpu_seconds=done_cpu)
    clock = _read_json(work_dir(ctx, run_id) / "clock.json")
    if clock is None:
        return RunStatus(run_id, "to do", group)
    return RunStatus(
        run_id, "in flight", group, cpu_seconds=float(clock.get("cpu", 0.0)), starts=int(clock.get("starts", 0))
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _monitor_key(plan: RunPlan) -> str:
    """The metrics.csv column whose minimum picks the run's best checkpoint."""
    from multifi.config import TrainConfig

    train = {k: v for k, v in (plan.config.get("train") or {}).items() if k in ("monitor", "monitor_metric")}
    return TrainConfig(**train).monitor_key


def _progress(metrics: Path, monitor: str) -> tuple[int | None, int | None]:
    """(steps run up to the last validation, step of the best monitored value so far) of a run's metrics.csv."""
    try:
        with metrics.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get(monitor)]
    except OSError:
        return None, None
    if not rows:
        return None, None
    best = min(rows, key=lambda r: float(r[monitor]))
    return int(rows[-1]["step"]), int(best["step"])


def status_table(name: str, rows: list[RunStatus]) -> str:
    """A plain-text table of the runs and a summary line per state, with the CPU hours spent and left."""
    width = max([len(r.id) for r in rows] + [6])
    lines = [f"{'run':<{width}}  {'state':<9}  {'steps':>6}  {'best':>6}  {'CPU h':>6}  {'left h':>6}"]
    for r in rows:
        left = "?" if r.left_cpu_seconds is None else f"{'≤ ' if r.bound else ''}{_hours(r.left_cpu_seconds)}"
        state = {True: "running", False: "stopped"}[r.running] if r.running is not None else r.state
        lines.append(
            f"{r.id:<{width}}  {state:<9}  {_int(r.steps):>6}  {_int(r.best_step):>6}  "
            f"{_hours(r.cpu_seconds):>6}  {left:>6}"
        )
    count = {s: sum(r.state == s for r in rows) for s in STATES}
    spent = sum(r.cpu_seconds for r in rows) / 3600
    mean = sum(r.left_cpu_seconds for r in rows if r.left_cpu_seconds is not None and not r.bound) / 3600
    bounded = [r.left_cpu_seconds for r in rows if r.bound]
    unknown = sum(r.left_cpu_seconds is None for r in rows)
    stopped = sum(r.running is False for r in rows)
    summary = f"{name}: {len(rows)} runs — " + ", ".join(
        f"{count[s]} {s}"
        + (f" ({stopped} stopped: they resume when run again)" if s == "in flight" and stopped else "")
        for s in STATES
        if count[s]
    )
    summary += (
        f"; {_hours(spent * 3600)} CPU-hours spent; left ≈ {_hours(mean * 3600)} CPU-hours (means of finished runs of "
        "the same variant)"
    )
    if bounded:
        summary += (
            f" + ≤ {_hours(sum(bounded))} for {len(bounded)} run(s) of variants with no finished run "
            "(step cap × CPU seconds per step of the finished runs)"
        )
    if unknown:
        summary += f" + {unknown} run(s) with no estimate"
    return "\n".join([*lines, "", summary])


def _hours(seconds: float) -> str:
    """CPU seconds as hours, two decimals, three below 0.1 h (a run of minutes is not 0.00)."""
    hours = seconds / 3600
    return f"{hours:.3f}" if 0 < hours < 0.1 else f"{hours:.2f}"


def status_json(name: str, rows: list[RunStatus]) -> str:
    return json.dumps({"experiment": name, "runs": [asdict(r) for r in rows]}, indent=1)


def _int(value: int | None) -> str:
    return "—" if value is None else str(value)
