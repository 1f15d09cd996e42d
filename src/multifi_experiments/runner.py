"""Experiment runner: plan every run of a spec, train the unfinished ones (resumably), then report.

    multifi experiment run SPEC.yaml [--set key=value] [--only PART|RUN_ID_PREFIX] [--report-only]

Layout of the output folder (spec `output`):
  runs/<run id>.json      one result per finished run (atomic write; its signature names its plan)
  splits/<part>.json      the molecules of every split (QM9 indices)
  summary.json, details.json, *.png, README.md   the report, rebuilt from runs/ at the end
  work/<run id>/          inputs/ (index and split files), run/ (the training run directory: checkpoints,
                          metrics, model.pt), log.txt; not part of the results (git-ignored)
A run whose result exists with the same signature is skipped. A run killed mid-way resumes from its
run/checkpoints/last.ckpt, or restarts if it has none. A result or work folder from a different plan
(the spec changed) is replaced. Runs hold a lock file, so two runners on one spec never train the
same run twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import multifi.train.run as train_run
from multifi.config import validate_config
from multifi.data.dataset import atomic_write
from multifi.errors import MultifiError
from multifi.logs import quiet_lightning
from multifi.ranks import end_with_parent
from multifi_experiments import baselines, report
from multifi_experiments.catalog import make_catalog
from multifi_experiments.context import (
    Context,
    labels_digest,
    lock_path,
    process_identity,
    result_path,
    run_state,
    work_dir,
)
from multifi_experiments.parts import PLANNERS, PartPlan
from multifi_experiments.plan import RunPlan, fill
from multifi_experiments.spec import load_spec

log = logging.getLogger("multifi.experiments")


class RunBusy(Exception):
    """Another process holds this run's lock."""


# ---------------------------------------------------------------------------------------------- entry point
def run_experiment(
    spec_path, overrides: list[str] = (), only: list[str] = (), report_only: bool = False, redo_stale: bool = False
) -> Path:
    """Run (resumably) the runs of a spec selected by `only`, then write summary, plots and README. Finished runs
    that `overrides` give other settings are redone only with `redo_stale` (else an error: a --set for one
    invocation would delete them)."""
    ctx = load_context(spec_path, overrides, only, report_only)
    if ctx.spec.selection is not None:
        raise MultifiError(
            f"{spec_path}: a selection spec; run it with multifi_experiments.selection.run_spec "
            "(`multifi experiment run` does)"
        )
    if ctx.spec.few_shot is not None:
        raise MultifiError(
            f"{spec_path}: a few-shot spec; run it with multifi_experiments.fewshot.run_spec "
            "(`multifi experiment run` does)"
        )
    parts = plan_parts(ctx, write=not report_only)  # a report-only rebuild writes no splits of other settings
    plans = [p for pp in parts.values() for p in pp.plans]
    failed: list[str] = []
    if not report_only:
        if overrides and not redo_stale:
            check_no_results_discarded(ctx, select(plans, only), overrides)
        failed = execute(ctx, select(plans, only))
    else:
        check_report_matches(ctx, plans)
    report.write_report(ctx, parts)
    log.info("report: %s", ctx.paths.output / "README.md")
    if failed:
        raise MultifiError(
            f"{len(failed)} run(s) failed: {', '.join(failed[:5])}{' …' if len(failed) > 5 else ''}; "
            f"see {ctx.paths.work}/<run id>/log.txt"
        )
    return ctx.paths.output


def check_no_results_discarded(ctx: Context, plans: list[RunPlan], overrides: list[str]) -> None:
    """A --set that gives finished runs other settings would delete their results and train them again: an error
    naming them, before anything is touched (--redo-stale to do it)."""
    stale = [
        plan.id
        for plan in plans
        if result_path(ctx, plan.id).exists()
        and run_state(ctx, plan, json.loads(result_path(ctx, plan.id).read_text())) == "other"
    ]
    if stale:
        raise MultifiError(
            f"{ctx.paths.output}: --set {' --set '.join(overrides)} gives {len(stale)} finished run(s) "
            f"other settings ({', '.join(stale[:3])}{', …' if len(stale) > 3 else ''}): running would delete their "
            "results and train them again; add --redo-stale to do that, or leave out the --set"
        )


def check_report_matches(ctx: Context, plans: list[RunPlan]) -> None:
    """--report-only whose settings match none of the finished runs (a --set, or a spec edited since) would replace
    the published report with an empty one: an error instead."""
    stale = matching = 0
    for plan in plans:
        path = result_path(ctx, plan.id)
        if path.exists():
            if run_state(ctx, plan, json.loads(path.read_text())) == "other":
                stale += 1
            else:
                matching += 1
    if stale and not matching:
        raise MultifiError(
            f"{ctx.paths.output}: none of the {stale} finished run(s) was run with these settings (a --set, or the "
            "spec edited since): the rebuilt report would be empty; rebuild it with the runs' settings"
        )


def load_context(spec_path, overrides=(), only=(), report_only=False, write_cache=True) -> Context:
    """Spec, paths and data catalog; `write_cache=False`: reading the data writes no cache (status)."""
    spec, paths = load_spec(spec_path, list(overrides))
    try:
        shown = Path(spec_path).resolve().relative_to(paths.root)
    except ValueError:
        shown = Path(spec_path)
    args = ["multifi", "experiment", "run", str(shown)]
    for o in overrides:
        args += ["--set", o]
    for o in only:
        args += ["--only", o]
    if report_only:
        args.append("--report-only")
    if write_cache:
        _check_owner(paths.output, spec.name)
    return Context(spec, paths, make_catalog(spec, paths, write_cache), shlex.join(args))


def _check_owner(output: Path, name: str) -> None:
    """An output folder whose README.md names another experiment is not taken over (its results would be
    overwritten or mixed with this spec's)."""
    readme = output / "README.md"
    if not readme.is_file():
        return
    first = readme.read_text(errors="replace").partition("\n")[0]
    if first.startswith("# ") and first != f"# {name}" and not first.startswith(f"# {name}: "):
        other = first[2:].split(": ")[0]
        raise MultifiError(
            f"{output}: holds the results of experiment {other!r} (README.md), not {name!r}; "
            "set another `output` in the spec (or remove the folder)"
        )


def plan_parts(ctx: Context, write: bool = True) -> dict[str, PartPlan]:
    """Plans of every part in the spec; writes each part's splits to <output>/splits/<part>.json (`write`)."""
    if ctx.spec.data is None and not ctx.paths.shared.is_dir():  # else every method would be "unknown"
        raise MultifiError(
            f"{ctx.paths.shared}: no such shared data folder (set shared_data in the spec, --set shared_data=…, "
            "or MULTIFI_SHARED_DATA)"
        )
    if ctx.spec.data is None and not (ctx.paths.shared / "qm9mf").is_dir():
        log.warning(
            "shared data not found at %s (set shared_data in the spec or MULTIFI_SHARED_DATA)", ctx.paths.shared
        )
    parts = {}
    for name, planner in PLANNERS.items():
        if getattr(ctx.spec, name) is None:
            continue
        parts[name] = planner(ctx)
        if write:
            _write_if_changed(ctx.paths.output / "splits" / f"{name}.json", json.dumps(parts[name].splits))
    ids = [p.id for pp in parts.values() for p in pp.plans]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        more = f" and {len(twice) - 3} more" if len(twice) > 3 else ""
        raise MultifiError(f"two runs of the spec have the same id ({', '.join(twice[:3])}{more})")
    return parts


def select(plans: list[RunPlan], only: list[str]) -> list[RunPlan]:
    """Plans matching `only` (part names or run-id prefixes), plus the runs they start from."""
    if not only:
        return plans
    by_id = {p.id: p for p in plans}
    chosen: set[str] = set()
    for item in only:
        hits = [
            p.id
            for p in plans
            if p.part == item
            or p.id.startswith(item)
            or (
                item == "embedding_map"
                and p.part == "ten_methods"
                and p.meta.get("role") == "joint"
                and not p.meta.get("control")
            )
        ]
        if not hits:
            parts = [*dict.fromkeys(p.part for p in plans)]
            parts += ["embedding_map"] if "ten_methods" in parts else []  # the ten-method joint model's runs
            raise MultifiError(
                f"--only {item!r} matches no run (parts: {', '.join(parts)}; or a run id prefix "
                f"such as {plans[0].id if plans else 'learning_curve/single'})"
            )
        chosen.update(hits)
    stack = list(chosen)
    while stack:
        for dep in by_id[stack.pop()].needs:
            if dep not in chosen:
                chosen.add(dep)
                stack.append(dep)
    return [p for p in plans if p.id in chosen]


# ---------------------------------------------------------------------------------------------- execution
def read_result(ctx: Context, run_id: str) -> dict | None:
    """A run's result JSON, or None (none yet, or unreadable)."""
    path = result_path(ctx, run_id)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None


def is_done(ctx: Context, plan: RunPlan) -> bool:
    return run_state(ctx, plan, read_result(ctx, plan.id)) == "done"


def execute(ctx: Context, plans: list[RunPlan]) -> list[str]:
    """Train and evaluate every plan not yet done; returns the ids of failed runs."""
    _ignore_work_dir(ctx)
    done = {p.id for p in plans if is_done(ctx, p)}
    needed = {d for p in plans if p.id not in done for d in p.needs}
    # a finished run must run again when a pending run starts from its model and that file is gone
    redo = {d for d in needed & done if not (work_dir(ctx, d) / "run" / "model.pt").exists()}
    todo = [p for p in plans if p.id not in done or p.id in redo]
    stale = sum(  # finished with other settings or labels: trained afresh (not continued to a raised cap)
        (r := read_result(ctx, p.id)) is not None and run_state(ctx, p, r) == "other" for p in todo
    )
    log.info(
        "%s: %d runs, %d finished, %d to do%s (parallel %d)",
        ctx.spec.name,
        len(plans),
        len(plans) - len(todo),
        len(todo),
        f", {stale} of them finished with other settings or labels (trained afresh)" if stale else "",
        ctx.spec.parallel,
    )
    return _execute(ctx, todo)


class _InProcess(Executor):
    """Runs each submitted call at once in this process (parallel: 1, and what tests can monkeypatch)."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)
        return future


def _executor(parallel: int, runs: int) -> Executor:
    if parallel == 1 or runs <= 1:
        return _InProcess()
    # one run per worker: a worker whose runner died stops its run (below), then exits instead of waiting for
    # work from a queue that a dead runner's other workers keep open
    return ProcessPoolExecutor(
        parallel,
        mp_context=get_context("spawn"),
        initializer=_worker_started,
        initargs=(os.getpid(),),
        max_tasks_per_child=1,
    )


def _worker_started(runner: int) -> None:
    """A worker stops its run (checkpoint kept) when the runner dies, even by SIGKILL: else it would train on
    for hours, orphaned, holding the run's lock, and the next runner would skip the run as busy. Workers ignore
    a Ctrl-C at the terminal; the runner stops them (_stop_workers): one way to stop, and no worker's traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(signal.SIGTERM, parent=runner)  # a runner that died while this worker started ends it now


def _stop_workers(spared: set[int]) -> None:
    """Ask the workers of a stopped runner (its child processes but those in `spared`, which it had before its
    pool, e.g. a caller's Manager) to stop their runs as a time limit would (SIGTERM: Lightning ends the step, the
    checkpoint stays, the next `experiment run` resumes)."""
    for child in multiprocessing.active_children():
        if child.pid not in spared:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child.pid, signal.SIGTERM)


def _execute(ctx: Context, todo: list[RunPlan]) -> list[str]:
    """Run `todo` with up to spec.parallel runs at a time; a run starts once the runs it needs are done."""
    failed: list[str] = []
    busy: set[str] = set()
    pending = list(todo)
    waiting_for = {p.id for p in todo}
    clock = _Progress(len(todo), ctx.spec.parallel)
    running: dict = {}
    in_flight: set[str] = set()  # ids submitted and not yet reported
    spared = {child.pid for child in multiprocessing.active_children()}  # not the pool's: never stopped here
    pool = _executor(ctx.spec.parallel, len(todo))
    try:
        while pending or running:
            for plan in list(pending):
                if len(running) >= ctx.spec.parallel:
                    break
                if _blocked(plan, failed, busy):
                    pending.remove(plan)
                elif not any(d in waiting_for for d in plan.needs):
                    running[pool.submit(run_one, ctx, plan)] = plan
                    in_flight.add(plan.id)
                    pending.remove(plan)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                plan = running.pop(fut)
                waiting_for.discard(plan.id)
                try:
                    clock.report(plan, fut.result())
                except RunBusy:
                    log.warning("%s: being trained by another runner; skipped", plan.id)
                    busy.add(plan.id)
                except Exception as exc:  # one failed run must not stop the others
                    log.error("%s: failed (%s: %s)", plan.id, type(exc).__name__, exc)
                    failed.append(plan.id)
                in_flight.discard(plan.id)
    except KeyboardInterrupt as exc:  # Ctrl-C, or a run's worker stopped by SIGTERM
        if isinstance(pool, _InProcess):
            raise  # the run in this process says which run stopped and how to continue
        _stop_workers(spared)
        pool.shutdown(wait=True, cancel_futures=True)
        stopped = f"{', '.join(sorted(in_flight))} stopped; " if in_flight else ""
        raise type(exc)(f"{stopped}continue with: {_rerun(ctx)}") from None
    pool.shutdown(wait=True)
    return failed


def _blocked(plan: RunPlan, failed: list[str], busy: set[str]) -> bool:
    """Whether a run cannot start because a run it starts from failed (→ failed too) or is held elsewhere."""
    if any(d in failed for d in plan.needs):
        log.error("%s: skipped (a run it starts from failed)", plan.id)
        failed.append(plan.id)
        return True
    if any(d in busy for d in plan.needs):
        log.warning("%s: skipped (a run it starts from is being trained by another runner)", plan.id)
        busy.add(plan.id)
        return True
    return False


class _Progress:
    def __init__(self, total: int, parallel: int):
        self.total, self.parallel, self.done, self.t0 = total, parallel, 0, time.time()

    def report(self, plan: RunPlan, result: dict) -> None:
        self.done += 1
        elapsed = time.time() - self.t0
        if result.get("finished_elsewhere"):
            log.info("[%d/%d] %s: finished by another runner meanwhile; kept", self.done, self.total, plan.id)
            return
        eta = elapsed / self.done * (self.total - self.done)
        errs = ", ".join(_errors_text(m, v) for m, v in result.get("test", {}).items())
        log.info(
            "[%d/%d] %s: %s%s; elapsed %.0f min, left ≈ %.0f min",
            self.done,
            self.total,
            plan.id,
            _seconds_text(result.get("train_seconds", 0)),
            f"; test MAE {errs}" if errs else "",
            elapsed / 60,
            eta / 60,
        )


def _seconds_text(seconds: float) -> str:
    """'0.7 s' below 10 s (a short run is not '0 s'), '42 s' above."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def _errors_text(method: str, v: dict) -> str:
    """The test errors of one method as the report quotes them: where some structures' references at it were
    estimated, over the others only (their count said)."""
    shown = v.get("fitted_only") or v
    if not shown.get("n", 1):  # every test structure has an estimated reference: the error over all of them
        shown = v
    note = (
        f" ({shown.get('n', '?')} of {v.get('n', '?')} structures; the rest have estimated references)"
        if shown is not v
        else ""
    )
    if "forces_mae_meV_per_A" in shown:
        return (
            f"{method} {shown.get('mae_meV_per_atom', float('nan')):.1f} meV/atom, "
            f"{shown['forces_mae_meV_per_A']:.0f} meV/Å{note}"
        )
    if "mae_meV" not in shown:
        return f"{method}: no test error"
    return f"{method} {shown['mae_meV']:.1f} meV{note}"


# ---------------------------------------------------------------------------------------------- one run
def run_one(ctx: Context, plan: RunPlan) -> dict:
    """Train (or resume, or only evaluate) one planned run and write its result JSON; returns the result."""
    work = work_dir(ctx, plan.id)
    with _lock(lock_path(ctx, plan.id)):
        earlier = read_result(ctx, plan.id)
        if run_state(ctx, plan, earlier) == "done" and (work / "run" / "model.pt").exists():
            return {**earlier, "finished_elsewhere": True}  # by another runner since this one planned it
        with _run_logging(work / "log.txt"):
            return _train_and_record(ctx, plan, work, earlier)


def _train_and_record(ctx: Context, plan: RunPlan, work: Path, earlier: dict | None) -> dict:
    """run_one's work, under the run's lock."""
    signature = plan.signature()
    extending = run_state(ctx, plan, earlier) == "extend"
    # a run stopped at a lower cap continues from its checkpoint under the raised one
    _reset_if_other_plan(work, {signature, earlier["signature"]} if extending else {signature})
    inputs, run_dir = work / "inputs", work / "run"
    _write_inputs(plan, inputs)
    atomic_write(work / "signature", lambda f: f.write(signature.encode()))
    for spec in plan.derived:
        if not Path(fill(spec["path"], {"inputs": str(inputs)})).exists():
            baselines.build_derived(spec, inputs, ctx.catalog)
    cfg = validate_config(fill(plan.config, _placeholders(ctx, plan, inputs, run_dir)), where=f"run {plan.id}")
    if extending:
        log.info("%s: stopped at the cap of %d steps; continuing to %d", plan.id, earlier["cap"], plan.cap)
        _reopen(run_dir)
    with TrainingClock(work / "clock.json") as clock:
        try:
            how = _train(cfg, run_dir)
        except KeyboardInterrupt as exc:  # its hint names multifi train; the runner resumes it (clock, result)
            raise type(exc)(f"{plan.id} stopped; continue with: {_rerun(ctx)}") from None
    result = {
        "id": plan.id,
        "part": plan.part,
        "signature": signature,
        "labels": labels_digest(ctx, plan),  # the labels it read (run_state: a later edit of them makes it stale)
        "meta": plan.meta,
        **baselines.evaluate(plan, run_dir, inputs, ctx.catalog),
        "train_seconds": round(clock.wall, 1),
        "cpu_seconds": round(clock.cpu, 1),
        "starts": clock.starts,
        "cpus": clock.cpus,
        "how": "extended to a raised cap" if extending and how == "resumed" else how,
        "cap": plan.cap,
        **_progress_of(run_dir),
        "run_dir": _relative(run_dir, ctx.paths.output),
        "command": ctx.command,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write(result_path(ctx, plan.id), lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


class TrainingClock:
    """Wall and CPU seconds of one run summed over all its starts (a killed run resumes its clock).

    The sums are saved to `path` every `every` seconds from a background thread and on exit, so a kill
    loses at most that much; `starts` counts how often the run was (re)started and `cpus` names the CPU
    models its starts ran on (a CPU-second buys different work on another CPU).
    """

    def __init__(self, path: Path, every: float = 10.0):
        self.path, self.every = path, every
        saved = json.loads(path.read_text()) if path.exists() else {}
        self._wall0, self._cpu0 = float(saved.get("wall", 0.0)), float(saved.get("cpu", 0.0))
        self.starts = int(saved.get("starts", 0)) + 1
        self.cpus = list(dict.fromkeys([*saved.get("cpus", []), cpu_model()]))
        self._stop = threading.Event()

    @property
    def wall(self) -> float:
        return self._wall0 + time.time() - self._t

    @property
    def cpu(self) -> float:
        return self._cpu0 + time.process_time() - self._c

    def save(self) -> None:
        state = {"wall": self.wall, "cpu": self.cpu, "starts": self.starts, "cpus": self.cpus}
        atomic_write(self.path, lambda f: f.write(json.dumps(state).encode()))

    def __enter__(self):
        self._t, self._c = time.time(), time.process_time()
        self.save()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.save()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._wall0, self._cpu0 = self.wall, self.cpu  # freeze the totals
        self._t, self._c = time.time(), time.process_time()
        self.save()
        return False


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform's processor string elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _rerun(ctx: Context) -> str:
    """The command that continues the spec's runs where they stopped (the one given, without --report-only)."""
    return ctx.command.replace(" --report-only", "")


def _train(cfg, run_dir: Path) -> str:
    """Train, resume or reuse the run directory; returns which."""
    if (run_dir / "metrics.json").exists() and (run_dir / "model.pt").exists():
        return "reused"  # trained earlier; only the evaluation was missing
    with warnings.catch_warnings():
        quiet_lightning()
        if cfg.extend is not None:  # an extension (multifi extend) is short: a killed one starts again
            from multifi.train.extend import extend

            if run_dir.exists():
                shutil.rmtree(run_dir)
            extend(cfg)
            return "extended"
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            log.info("resuming %s from checkpoints/last.ckpt", run_dir)
            train_run.train(cfg, resume=True)
            return "resumed"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # killed before its first checkpoint: start again
        train_run.train(cfg)
        return "trained"


def _reopen(run_dir: Path) -> None:
    """Make a finished run directory resumable: its model and metrics are replaced when it ends again."""
    for name in ("model.pt", "metrics.json"):
        (run_dir / name).unlink(missing_ok=True)


def _placeholders(ctx, plan, inputs: Path, run_dir: Path) -> dict[str, str]:
    values = {
        "inputs": str(inputs),
        "run_dir": str(run_dir),
        "shared": str(ctx.paths.shared),
        "work": str(ctx.paths.work),
    }
    for dep in plan.needs:
        model = work_dir(ctx, dep) / "run" / "model.pt"
        if not model.exists():
            raise MultifiError(f"{plan.id}: starts from run {dep}, whose model {model} does not exist")
        values[f"model:{dep}"] = str(model)
    return values


def _reset_if_other_plan(work: Path, signatures: set[str]) -> None:
    """Remove a work folder left by a plan of this run id other than `signatures` (the spec changed)."""
    sig = work / "signature"
    if sig.exists() and sig.read_text().strip() in signatures:
        return
    stale = [c for c in work.iterdir() if c.name != "log.txt"] if work.exists() else []
    if stale:
        log.info("%s: made by another version of this run's plan; starting afresh", work)
    for child in stale:
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _write_inputs(plan: RunPlan, inputs: Path) -> None:
    for name, values in plan.files.items():
        lines = [i if isinstance(i, str) else f"qm9:{i}" if name.endswith(".keys") else str(i) for i in values]
        text = "\n".join(lines) + ("\n" if lines else "")
        _write_if_changed(inputs / name, text)


def _progress_of(run_dir: Path) -> dict:
    """Epochs trained, the last one possibly in part (from the last checkpoint's loop progress: Lightning's
    `epoch` field counts one more once training ended on an epoch's last step), if there is a checkpoint
    (steps come from metrics.json)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return {}
    import torch

    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
        progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("total", {})
        if "started" in progress:
            return {"epochs": int(progress["started"])}
        return {"epochs": int(state.get("epoch", -1)) + 1}
    except Exception:  # progress is informative only
        return {}


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(str(path)) from None
        try:
            f.truncate(0)
            f.write(process_identity(os.getpid()))  # for `experiment status`, which must not touch the lock
            f.flush()
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _run_logging(path: Path):
    """Log this run (multifi messages) to its own log file; keep Lightning quiet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("multifi")
    old_level, old_propagate = root.level, root.propagate
    root.setLevel(logging.INFO)
    root.propagate = False  # the training's own messages go to the run's log only
    root.addHandler(handler)
    quiet_lightning()
    try:
        yield
    except Exception as exc:  # the reason a run failed belongs in its own log, with the traceback of a bug
        root.error("failed: %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, MultifiError))
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        root.propagate = old_propagate
        handler.close()


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    atomic_write(path, lambda f: f.write(text.encode()))


def _ignore_work_dir(ctx: Context) -> None:
    """Run directories are scratch, not results: keep them out of git."""
    ignore = ctx.paths.work / ".gitignore"
    if not ignore.exists():
        _write_if_changed(ignore, "*\n")


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
