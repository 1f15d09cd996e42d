"""Run driver: config → run directory with resolved config, checkpoints, metrics.csv and metrics.json.

The steps of a run live beside it: preflight (checks and reports before the first step), resume (continuing
a run), trainer (Lightning Trainer and fit), callbacks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch

from multifi.config import RunConfig, blamed, dump_config, load_config
from multifi.data.atomic_energies import as_table, check_binding, check_unchanged
from multifi.data.checks import (
    check_length_unit,
    check_overlaps,
    check_repeated_geometries,
    check_split_duplicates,
    doubtful_units,
    geometry_groups,
    warn_isolated_atoms,
    warn_isolated_atoms_held_out,
    warn_structures_without_edges,
)
from multifi.data.split import TRAIN_LABELS, save_train_labels
from multifi.data.stats import fit_references, shortest_contacts
from multifi.errors import MultifiError
from multifi.files import atomic_write, check_not_held, held_lock, json_text, make_dir
from multifi.logs import is_leader_process, not_file_only, quiet_lightning
from multifi.train.datamodule import MultiFidelityData
from multifi.train.evaluate import evaluate_pairs
from multifi.train.module import PotentialModule
from multifi.train.preflight import (
    check_monitor,
    check_monitored_energies,
    check_something_trains,
    check_warmup,
    report_data,
    report_plan,
    report_references,
    split_counts,
    untrained,
    warn_scale_gaps,
    warn_unseen_in_evaluation,
)
from multifi.train.prepare import prepare_data
from multifi.train.resume import (
    SOURCES,
    check_checkpoint_settings,
    check_more_to_train,
    check_resume_changes,
    check_resumed_split,
    check_sources_unchanged,
    check_world,
    record_resumed_config,
    resume_checkpoint,
    source_fingerprints,
)
from multifi.train.resume_args import check_resume_args
from multifi.train.run_config import load_run_config
from multifi.train.trainer import build_trainer, final_checkpoint, fit_or_interrupt, training_progress

log = logging.getLogger("multifi")
#: a run's record of the atomic energies its references are made of (data.atomic_energies), for its resumes
ATOMIC_ENERGIES = "atomic_energies.json"


def train(cfg: RunConfig, resume: bool = False, config_source: str = "", dry_run: bool = False) -> Path:
    """Train a potential as configured; returns the run directory.

    Everything that can be checked (config, data, devices, the output folder) is checked before the
    run directory is written. A run directory without a checkpoint (a start that failed or was
    interrupted before its first checkpoint) is started afresh by `train` and by `train --resume`.
    `dry_run`: check everything, log the plan, write nothing. multifi's log of every start (warnings about
    the data included) is appended to the run directory's train.log once the directory is written. The caller's
    process state is its own again afterwards (kept_process_state). `cfg` may be a mapping of the config's sections."""
    if isinstance(cfg, dict):  # the sections as a mapping, as load_config(None, base=…) takes them
        cfg = load_config(None, base=cfg)
    if not isinstance(cfg, RunConfig):
        raise MultifiError(
            f"train takes a RunConfig (load_config) or a mapping of its sections, not {type(cfg).__name__}"
        )
    with RunLog() as run_log, kept_process_state():
        return _train(cfg, resume, config_source, dry_run, run_log)


#: environment variables Lightning's seed_everything sets (its workers read them)
LIGHTNING_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def kept_process_state():
    """The caller's process state as it was before the block: torch's intra-op thread count (a training sets
    train.threads; a Python caller's MD afterwards kept running on that many), the global random generators
    (random, numpy, torch; Lightning's seed_everything reseeds them), Lightning's seed variables in os.environ,
    the warning filters and Lightning's logger levels (quieted for the run)."""
    import random
    import warnings

    threads = torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    env = {name: os.environ.get(name) for name in LIGHTNING_SEED_VARIABLES}
    loggers = {name: logging.getLogger(name).level for name in ("lightning", "lightning.pytorch", "lightning.fabric")}
    try:
        with warnings.catch_warnings():
            yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)


class RunLog:
    """multifi's log records of one start, held until the run directory may be written, then written to its
    train.log (appended on resume) together with everything after; nothing is written if the start stops
    before (a failed check leaves no file).

    Called from Python with logging left as it comes (no handler anywhere, multifi's level not set), the start
    shows what the command line shows: INFO and above on stderr and in train.log, for the start's duration;
    with logging configured, the caller's handlers and levels decide."""

    def __init__(self):
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self._hold = logging.Handler(logging.INFO)
        self._hold.emit = self.held.append
        self._console: logging.Handler | None = None
        self._level_set = False

    def __enter__(self) -> RunLog:
        if not log.hasHandlers():  # nothing would show the warnings (Python's last resort skips a logger with one)
            self._console = logging.StreamHandler()
            self._console.setFormatter(logging.Formatter("%(message)s"))
            self._console.addFilter(not_file_only)
            log.addHandler(self._console)
            if log.level == logging.NOTSET and log.getEffectiveLevel() > logging.INFO:
                log.setLevel(logging.INFO)  # the plan (run directory, splits, sampling) too, and in train.log
                self._level_set = True
        log.addHandler(self._hold)
        return self

    def write_to(self, path: Path) -> None:
        """From now on into `path`, starting with the records held so far."""
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.file.setLevel(logging.INFO)
        for record in self.held:
            self.file.handle(record)
        log.removeHandler(self._hold)
        log.addHandler(self.file)

    def to_file(self, message: str) -> None:
        """`message` into train.log only (e.g. what the terminal shows as a table)."""
        if self.file is not None:
            self.file.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))

    def discard(self) -> None:
        """Hold nothing more (a further process of a multi-process run: only the leader writes train.log)."""
        log.removeHandler(self._hold)
        self.held.clear()

    def __exit__(self, *exc) -> None:
        log.removeHandler(self._hold)
        if self.file is not None:
            log.removeHandler(self.file)
            self.file.close()
        if self._console is not None:
            log.removeHandler(self._console)
        if self._level_set:
            log.setLevel(logging.NOTSET)


def _train(cfg: RunConfig, resume: bool, config_source: str, dry_run: bool, run_log: RunLog) -> Path:
    run_dir = Path(cfg.output_dir)
    if cfg.extend is not None:
        raise MultifiError(
            f"{config_source or 'config'}: this config extends a model ('extend' section): "
            "run it with multifi extend --config"
        )
    leader = is_leader_process()
    if not leader:
        run_log.discard()
    ckpt = resume_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        check_resume_changes(run_dir, cfg)
        check_checkpoint_settings(run_dir / "config.yaml", ckpt, cfg)
        if check_more_to_train(run_dir, ckpt, cfg):
            return run_dir
    resume, blocked = _start_or_restart(run_dir, resume, ckpt is not None, leader, dry_run, config_source)
    stamp = _checkpoint_stamp(run_dir)  # the state checked; looked at again once the run directory is locked
    log.info("run directory: %s", run_dir.resolve())
    configure_threads(cfg)
    hush_lightning()
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    prep, sources_now = _prepared_data(cfg, run_dir, resume, leader, config_source)
    module, doubtful = _module_with_references(cfg, prep, resume, config_source)
    warn_unseen_in_evaluation(prep, module.potential)
    check_monitored_energies(cfg, prep, module.potential.head, config_source)
    data = _data_module(cfg, prep, module, config_source)
    trainer = build_trainer(cfg, run_dir, len(prep.pairs["val"]) > 0, config_source)
    resumed = None if ckpt is None else torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    if resumed is not None:
        check_world(trainer.world_size, resumed, cfg, run_dir)
    if dry_run:
        report_plan(cfg, prep, module, run_dir, ckpt, blocked is None)
        if blocked is not None:
            raise MultifiError(f"{blocked} (config and data are valid)")
        return run_dir
    # all checks passed: only now does the run directory get written, by one training at a time
    make_dir(run_dir)
    with held_lock(run_dir / RUN_LOCK, "this run directory") if leader else contextlib.nullcontext():
        if leader:
            _check_unchanged_since_start(run_dir, stamp)
            _log_start(resumed, ckpt, trainer.world_size)
        del resumed  # Lightning loads the checkpoint itself
        if leader:
            _write_start_files(cfg, run_dir, prep, resume, sources_now, run_log)
        _fit(trainer, module, data, ckpt, run_dir)
        best = final_checkpoint(trainer, run_dir)
        if trainer.global_rank == 0:
            _write_model_and_metrics(cfg, run_dir, prep, data, trainer, best, doubtful, run_log)
    return run_dir


def _start_or_restart(
    run_dir: Path, resume: bool, has_ckpt: bool, leader: bool, dry_run: bool, config_source: str = ""
):
    """(resume, blocked): a resume without a usable checkpoint starts the run again (not over a finished run's
    model); a new run needs a fresh folder. `blocked`: why a dry run's folder would stop the run itself (a dry
    run checks everything else first, then says so); None."""
    if leader:
        check_not_held(run_dir / RUN_LOCK, "this run directory")  # before any work (held_lock says it again)
        _check_output_not_redirected(run_dir)
    if resume and not has_ckpt:  # asked to continue this run: start it again (its unreadable checkpoints get replaced)
        _refuse_restarting_a_finished_run(run_dir)
        log.warning("%s: no checkpoint to resume from; starting the run from the beginning", run_dir)
        return False, None
    if leader and not resume:
        try:
            _check_fresh_run_dir(run_dir, config_source)
        except MultifiError as exc:
            if not dry_run:
                raise
            return resume, exc
    return resume, None


#: the file a training holds locked while it writes its run directory (and the mark that a start wrote there)
RUN_LOCK = ".multifi-run.lock"


def _checkpoint_stamp(run_dir: Path) -> tuple:
    """((name, size, modification time) of each checkpoint and of model.pt): what another training writing the
    run directory changes."""
    files = [*sorted((run_dir / "checkpoints").glob("*.ckpt")), run_dir / "model.pt"]
    return tuple((p.name, info.st_size, info.st_mtime_ns) for p in files if (info := _stat(p)) is not None)


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


def _check_unchanged_since_start(run_dir: Path, stamp: tuple) -> None:
    """Once the run directory is locked: its checkpoints and model are those this start checked (another training
    may have written them meanwhile, between the checks and the lock)."""
    if _checkpoint_stamp(run_dir) != stamp:
        raise MultifiError(
            f"{run_dir}: another training wrote this run directory while this one started; look at what it holds "
            f"(multifi train --resume {run_dir} continues it) or train into another output_dir"
        )


def _check_output_not_redirected(run_dir: Path) -> None:
    """The console output is not sent into the run's own train.log (`… > RUN/train.log`): the run writes that
    file itself, and the two would overwrite each other."""
    import sys

    log_file = run_dir / "train.log"
    try:
        target = log_file.stat()
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            info = os.fstat(stream.fileno())
        except (OSError, ValueError, AttributeError):  # no file behind it (captured, closed)
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            raise MultifiError(
                f"{log_file}: the console output is redirected into the run's own log, which the run writes itself; "
                "redirect it to a file outside the run directory"
            )


def _prepared_data(cfg: RunConfig, run_dir: Path, resume: bool, leader: bool, config_source: str):
    """(prep, sources_now): the run's data and splits (a resume reads its cached copy, checks its data files and
    its split), checked for repeats, reported per fidelity and split; sources_now: data-file fingerprints a
    resume records again (check_sources_unchanged), else None."""
    dataset, sources_now = None, None
    cached = run_dir / "dataset.npz"
    if resume:
        sources_now = check_sources_unchanged(run_dir, cfg, copied=cached.exists())
    if resume and cached.exists():
        from multifi.data.dataset import FidelityDataset

        dataset = FidelityDataset.load(cached)
    prep = prepare_data(cfg, dataset, config_source)
    if resume:
        check_resumed_split(run_dir, prep)
        if prep.atomic is not None and (run_dir / ATOMIC_ENERGIES).exists():
            now = as_table(prep.atomic, prep.dataset.fidelities.names)
            check_unchanged(json.loads((run_dir / ATOMIC_ENERGIES).read_text()), now, config_source or str(run_dir))
    if leader and not resume:
        groups = geometry_groups(prep.dataset)
        check_repeated_geometries(prep.dataset, groups)
        check_split_duplicates(prep.dataset, prep.split, groups)
    report_data(prep)
    check_monitor(cfg, prep, config_source)
    check_warmup(cfg, len(prep.pairs["train"]))
    return prep, sources_now


def _module_with_references(cfg: RunConfig, prep, resume: bool, config_source: str = ""):
    """(module, doubtful): the Lightning module (initialised from train.init_from on a fresh start) with the
    reference energies and scales fitted on this run's training labels; doubtful: the unit checks' findings."""
    spec = {"model": cfg.model, "fidelities": prep.dataset.fidelities.names}
    module = PotentialModule(spec, cfg.loss, cfg.train, prep.settings.loss_weights)
    if cfg.train.init_from and not resume:  # on resume the weights come from the checkpoint
        from multifi.train.init import init_from_potential

        init_from_potential(module.potential, cfg.train.init_from, cfg.train.init_fidelities)
    # always refitted on this run's data; one pooled fit for a fidelity-blind model (inject: single)
    refs = fit_references(
        prep.dataset,
        prep.pairs["train"],
        pooled=module.potential.head.shared_baseline,
        shared_scale=cfg.model.energy_scale == "shared",
        atomic=None if prep.atomic is None else prep.atomic.values,
    )
    if prep.atomic is not None:
        check_binding(refs, prep.dataset.fidelities.names, config_source or "config")
    # units are the labels' own: checked over every labelled split, as `data info` checks them (the training split
    # alone can leave a composition below a check's minimum count and skip it silently), against each fidelity's
    # own fit of those labels (a pooled fit of several methods lies far from every one of them, which blamed the
    # data for the pooling; a fit of the training split alone has no reference for an element only tested)
    labelled = np.concatenate(list(prep.pairs.values()))
    own = fit_references(prep.dataset, labelled)
    doubtful = doubtful_units(
        prep.dataset, labelled, own.ref, own.scale, prep.settings.known_units(prep.dataset.fidelities)
    )
    warn_isolated_atoms(prep.dataset, prep.pairs["train"])
    if not cfg.data.split.files:  # split files place them on purpose
        warn_isolated_atoms_held_out(prep.dataset, prep.pairs)
    report_references(refs, prep.dataset.fidelities.names, skip=untrained(prep))
    if cfg.model.energy_scale == "per_fidelity" and not module.potential.head.shared_baseline:
        warn_scale_gaps(refs, prep.dataset, prep.pairs["train"], skip={n for names in doubtful.values() for n in names})
    module.potential.head.set_baseline(
        refs.ref, refs.scale, refs.fitted, refs.null, refs.spread, refs.atomic_shift, refs.given
    )
    module.sync_ema()
    return module, doubtful


def _data_module(cfg: RunConfig, prep, module, config_source: str) -> MultiFidelityData:
    """The batches (neighbour lists built here), checked for overlapping atoms and structures without edges, the
    shortest contacts recorded in the model, the sampling checked; warns when nothing validates."""
    data = MultiFidelityData(
        prep.dataset,
        prep.pairs,
        cfg.model.cutoff,
        cfg.train.batch_size,
        cfg.train.num_workers,
        prep.settings.sampling,
        cfg.train.seed,
        progress=cfg.train.progress,
        neighbor_lists=cfg.data.neighbor_lists,
    )
    check_overlaps(prep.dataset, data.neighbors)
    check_length_unit(prep.dataset, data.neighbors, prep.pairs["train"])
    train_structures = np.unique(prep.pairs["train"][:, 0])
    warn_structures_without_edges(prep.dataset, data.neighbors, train_structures)
    module.potential.head.record_contacts(*shortest_contacts(prep.dataset, data.neighbors, train_structures))
    module.sync_ema()
    data.check_sampling(config_source)
    check_something_trains(cfg, data, prep.settings.loss_weights, config_source)
    if len(prep.pairs["val"]) == 0:
        log.warning(
            "%s: no validation labels (data.split): the checkpoint kept and early stopping follow the training loss, "
            "and metrics.json has no validation errors",
            config_source or "config",
        )
    return data


def _log_start(resumed: dict | None, ckpt: Path | None, world: int) -> None:
    if resumed is not None:
        log.info("resuming at step %d from checkpoints/%s on %d process(es)", resumed["global_step"], ckpt.name, world)
    elif world > 1:
        log.info("training on %d processes", world)


def _write_start_files(cfg: RunConfig, run_dir: Path, prep, resume: bool, sources_now, run_log: RunLog) -> None:
    """What the leader writes before the first step: train.log; on a fresh start config.yaml, splits.json, the
    labels train_limits kept, the data's copy and its files' fingerprints; on a resume the settings it now trains
    with and fingerprints read again (a checkpoint write the kill cut short is removed)."""
    if resume:
        record_resumed_config(run_dir, cfg)
        if sources_now is not None:
            atomic_write(run_dir / SOURCES, lambda f: f.write(json.dumps(sources_now).encode()))
        for stale in (run_dir / "checkpoints").glob(".*.tmp"):  # a checkpoint write the kill cut short
            stale.unlink(missing_ok=True)
    else:
        _clear_unstarted(run_dir)
    run_log.write_to(run_dir / "train.log")
    if resume:
        return
    atomic_write(run_dir / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
    prep.split.save(run_dir / "splits.json", prep.dataset)
    if cfg.data.train_limits:  # which labels the limits kept
        save_train_labels(run_dir / TRAIN_LABELS, prep.dataset, prep.pairs["train"])
    if cfg.data.cache and not _from_saved_dataset(cfg):
        prep.dataset.save(run_dir / "dataset.npz")
    atomic_write(run_dir / SOURCES, lambda f: f.write(json.dumps(source_fingerprints(cfg)).encode()))
    if prep.atomic is not None:  # what the references are made of: a resume checks its table against it
        table = as_table(prep.atomic, prep.dataset.fidelities.names)
        atomic_write(run_dir / ATOMIC_ENERGIES, lambda f: f.write(json.dumps(table, indent=1).encode()))


def _write_model_and_metrics(cfg: RunConfig, run_dir: Path, prep, data, trainer, best: Path, doubtful, run_log) -> None:
    """model.pt (the checkpoint kept, with the model card's data counts) and metrics.json (test and validation
    errors per fidelity, the run's progress, unit doubts); the outcome logged."""
    from multifi.models.registry import load_potential, save_potential

    potential = load_potential(best)
    potential.spec["data"] = {split: split_counts(prep, split) for split in ("train", "val", "test")}  # model card
    potential.spec["stress_labels"] = _stress_counts(prep)
    save_potential(potential, run_dir / "model.pt")
    metrics = evaluate_pairs(potential, prep.dataset, data.neighbors, prep.pairs["test"], cfg.train.batch_size)
    val = (
        evaluate_pairs(potential, prep.dataset, data.neighbors, prep.pairs["val"], cfg.train.batch_size)
        if len(prep.pairs["val"])
        else {}
    )
    payload = {
        "fidelities": metrics,
        "val_fidelities": val,
        "checkpoint": str(best),
        "n_train": split_counts(prep, "train"),
        **training_progress(trainer, best),
        "doubtful_units": doubtful,
    }
    atomic_write(run_dir / "metrics.json", lambda f: f.write(json_text(payload).encode()))
    log_result(payload, run_log)


#: a best checkpoint within this share of a run's first steps, picked on the loss of every fidelity, is said
EARLY_BEST = 0.1


def _warn_early_best(payload: dict) -> None:
    """The model kept is a checkpoint of the run's first EARLY_BEST of steps, picked on the validation loss of every
    fidelity (val_loss): with several fidelities (an extension's replay) the others' losses can keep it there while
    one fidelity has barely trained; say so and name train.monitor."""
    from multifi.keys import VAL_LOSS

    steps, best = payload.get("steps") or 0, payload.get("best_step")
    fidelities = payload.get("fidelities") or {}
    if payload.get("monitor") != VAL_LOSS or best is None or steps < 50 or best >= EARLY_BEST * steps:
        return
    if len(fidelities) < 2:
        return
    log.warning(
        "the model kept is the checkpoint of step %d of %d, where the validation loss over every fidelity was lowest "
        "(%s): a fidelity still far from trained there does not show in it when the others' losses rise; "
        "train.monitor: NAME (--set train.monitor=NAME) keeps the checkpoint best at one fidelity",
        best,
        steps,
        ", ".join(fidelities),
    )


def log_result(payload: dict, run_log: RunLog) -> None:
    """The run's outcome: why it ended, the model kept (logged) and its test errors per fidelity (train.log only:
    the command line prints them as a table)."""
    why = (
        f"stopped early ({payload['monitor']} did not improve in {payload['patience_validations']} validations)"
        if payload["stopped_early"]
        else "finished"
    )
    log.info(
        "%s after %d steps; the model kept is the checkpoint of step %d (%s)",
        why,
        payload["steps"],
        payload["best_step"],
        Path(payload["checkpoint"]).name,
    )
    _warn_early_best(payload)
    from multifi.keys import ENERGY_MAE, ENERGY_MAE_PER_ATOM, ENERGY_RMSE_PER_ATOM, FORCES_MAE, FORCES_RMSE, STRESS_MAE

    labels = {
        ENERGY_MAE: "energy MAE %.4g meV",
        ENERGY_MAE_PER_ATOM: "%.4g meV/atom",
        ENERGY_RMSE_PER_ATOM: "RMSE %.4g meV/atom",
        FORCES_MAE: "forces MAE %.4g meV/Å",
        FORCES_RMSE: "RMSE %.4g meV/Å",
        STRESS_MAE: "stress MAE %.4g GPa",
    }
    for name, m in payload["fidelities"].items():
        errors = [text % m[key] for key, text in labels.items() if m.get(key) is not None]
        run_log.to_file(f"test {name} ({m['n']} structures): {', '.join(errors) or 'no labels scored'}")
    if not payload["fidelities"]:
        run_log.to_file("no test structures: no test metrics")


#: what a run writes before its first checkpoint; a run directory holding only these was never started
UNSTARTED_FILES = frozenset(
    {
        "config.yaml",
        "splits.json",
        TRAIN_LABELS,
        "dataset.npz",
        "sources.json",
        "metrics.csv",
        "hparams.yaml",
        "checkpoints",
        "train.log",
        RUN_LOCK,
    }
)


def _has_checkpoint(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return (run_dir / "model.pt").exists() or (ckpts.is_dir() and any(ckpts.glob("*.ckpt")))


#: what a finished run leaves besides its checkpoints: a restart from the beginning would replace them
FINISHED_FILES = ("model.pt", "metrics.json")


def _refuse_restarting_a_finished_run(run_dir: Path) -> None:
    """--resume of a run without checkpoints starts it again, but not over a finished run's model (whose
    checkpoints were deleted, say to save space): an error instead of replacing it."""
    finished = [name for name in FINISHED_FILES if (run_dir / name).exists()]
    if finished:
        raise MultifiError(
            f"{run_dir}: a finished run ({', '.join(finished)}) without checkpoints: nothing to resume, and starting "
            "again would replace its model; train into another output_dir"
        )


def _check_fresh_run_dir(run_dir: Path, config_source: str = "") -> None:
    """The output folder must be new, empty, or a run directory whose start (its lock file, or its config.yaml
    beside its split or data files) wrote no checkpoint; and writable. A folder holding the config being trained as its config.yaml is not a run's."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MultifiError(f"{run_dir}: output_dir exists and is not a folder")
    if config_source and Path(config_source).resolve() == (run_dir / "config.yaml").resolve():
        raise MultifiError(
            f"{config_source}: the config lies in its own output_dir as config.yaml, which the run writes itself; "
            "keep it outside the run directory (or set another output_dir)"
        )
    if run_dir.is_dir() and any(run_dir.iterdir()):
        names = {p.name for p in run_dir.iterdir()}
        no_checkpoint = not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").glob("*.ckpt"))
        if no_checkpoint and (run_dir / "config.yaml").exists():  # a run's folder: --resume would not help it
            _refuse_restarting_a_finished_run(run_dir)
        # files of a start of multifi's (its lock file; before it, config.yaml with the split or data files beside),
        # not a user's own config.yaml or train.log
        started = RUN_LOCK in names or (
            "config.yaml" in names and bool(names & {"splits.json", SOURCES, "dataset.npz"})
        )
        if _has_checkpoint(run_dir) or not names <= UNSTARTED_FILES or not started:
            resumable = not no_checkpoint and (run_dir / "config.yaml").exists()
            raise MultifiError(
                f"{run_dir}: run directory exists and is not empty; use "
                + (
                    f"--resume {run_dir} (train(cfg, resume=True) from Python) or another output_dir"
                    if resumable
                    else "another output_dir"
                )
            )
        log.info("%s: the previous start wrote no checkpoint; starting afresh", run_dir)
    check_creatable(run_dir)


def check_creatable(run_dir: Path) -> None:
    """The output folder can be created (or written): a one-line error before any work, not a traceback after."""
    existing = next(p for p in [run_dir, *run_dir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise MultifiError(f"{run_dir}: cannot create output_dir ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MultifiError(f"{run_dir}: cannot create output_dir ({existing} is not writable)")
    try:  # permissions alone do not tell (root passes os.access; /proc, read-only mounts): make and remove a folder
        probe = tempfile.mkdtemp(prefix=".multifi-probe-", dir=existing)
    except OSError as exc:
        raise MultifiError(f"{run_dir}: cannot create output_dir ({existing}: {exc.strerror})") from None
    os.rmdir(probe)


def _clear_unstarted(run_dir: Path) -> None:
    """Remove what a start without checkpoint left (its metrics would be appended to)."""
    for name in ("metrics.csv", "hparams.yaml"):
        (run_dir / name).unlink(missing_ok=True)


def _fit(trainer: L.Trainer, module, data, ckpt: Path | None, run_dir: Path) -> None:
    """trainer.fit; Ctrl-C becomes KeyboardInterrupt (Lightning turns it into exit code 1) with a resume hint."""
    fit_or_interrupt(trainer, module, data, ckpt, run_dir, f"continue with: multifi train --resume {run_dir}")


def _stress_counts(prep) -> dict[str, int]:
    """Training structures with a stress label, per fidelity (the calculator says when a fidelity had none)."""
    return {n: c["stress"] for n, c in prep.dataset.label_counts(prep.pairs["train"]).items()}


def _from_saved_dataset(cfg: RunConfig) -> bool:
    """A single saved dataset (.npz or memory-mapped directory) is its own cache: don't copy it."""
    from multifi.data.sources import _is_saved_dataset

    return len(cfg.data.sources) == 1 and _is_saved_dataset(cfg.data.sources[0])


def hush_lightning() -> None:
    """Keep Lightning's tips and deprecation chatter out of the user's terminal (unless debugging)."""
    quiet_lightning(verbose=log.isEnabledFor(logging.DEBUG))


def configure_threads(cfg: RunConfig) -> None:
    """torch threads as configured (OMP_WAIT_POLICY is set where it takes effect: multifi/__init__.py)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def train_from_args(config: str | None, overrides: list[str], resume_dir: str | None, dry_run: bool = False) -> Path:
    if resume_dir:
        source = check_resume_args(config, overrides, resume_dir)
        cfg = load_run_config(source, overrides)
        cfg.output_dir = str(resume_dir)
        with blamed(str(source), overrides):
            return train(cfg, resume=True, config_source=str(source), dry_run=dry_run)
    if config is None:
        raise MultifiError("multifi train needs a CONFIG.yaml (or --resume RUN_DIR)")
    cfg = load_config(config, overrides)
    with blamed(str(config), overrides):
        return train(cfg, config_source=str(config), dry_run=dry_run)
