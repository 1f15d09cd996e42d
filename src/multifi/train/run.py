"""Run driver: config → run directory with resolved config, checkpoints, metrics.csv and metrics.json."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from ase.data import chemical_symbols
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from multifi.config import RunConfig, blamed, dump_config, load_config
from multifi.data.checks import (
    check_overlaps,
    check_repeated_geometries,
    check_split_duplicates,
    doubtful_units,
    warn_isolated_atoms,
    warn_structures_without_edges,
)
from multifi.data.dataset import ranges
from multifi.data.split import TRAIN_LABELS, changed_split, save_train_labels
from multifi.data.stats import MIN_SCALE_DOF, fit_references, force_rms, shortest_contacts
from multifi.errors import MultifiError, Terminated, closest_name
from multifi.files import atomic_write, json_text, make_dir, reported
from multifi.keys import FORCES_MAE, STRESS_MAE, TRAIN_LOSS_EPOCH
from multifi.logs import is_leader_process, quiet_lightning
from multifi.train.datamodule import MultiFidelityData
from multifi.train.evaluate import evaluate_pairs
from multifi.train.logger import RunCSVLogger, progress_bar_wanted
from multifi.train.module import PotentialModule
from multifi.train.prepare import prepare_data
from multifi.train.resume_args import check_resume_args
from multifi.train.run_config import load_run_config

log = logging.getLogger("multifi")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: never half-written."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def train(cfg: RunConfig, resume: bool = False, config_source: str = "", dry_run: bool = False) -> Path:
    """Train a potential as configured; returns the run directory.

    Everything that can be checked (config, data, devices, the output folder) is checked before the
    run directory is written. A run directory without a checkpoint (a start that failed or was
    interrupted before its first checkpoint) is started afresh by `train` and by `train --resume`.
    `dry_run`: check everything, log the plan, write nothing. multifi's log of every start (warnings about
    the data included) is appended to the run directory's train.log once the directory is written. torch's thread
    count (train.threads) is the caller's again afterwards."""
    with RunLog() as run_log, kept_threads():
        return _train(cfg, resume, config_source, dry_run, run_log)


@contextlib.contextmanager
def kept_threads():
    """torch's intra-op thread count as it was before the block (a training sets train.threads; a Python caller's MD
    afterwards kept running on that many)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


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
    ckpt = _resume_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        check_resume_changes(run_dir, cfg)
        check_checkpoint_settings(run_dir / "config.yaml", ckpt, cfg)
        if check_more_to_train(run_dir, ckpt, cfg):
            return run_dir
    blocked = None  # a dry run checks everything else first, then says why the run itself could not start
    if resume and ckpt is None:  # asked to continue this run: start it again (its unreadable checkpoints get replaced)
        _refuse_restarting_a_finished_run(run_dir)
        log.warning("%s: no checkpoint to resume from; starting the run from the beginning", run_dir)
        resume = False
    elif leader and not resume:
        try:
            _check_fresh_run_dir(run_dir)
        except MultifiError as exc:
            if not dry_run:
                raise
            blocked = exc
    log.info("run directory: %s", run_dir.resolve())
    _configure_threads(cfg)
    _quiet_lightning()
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    dataset, sources_now = None, None
    cached = run_dir / "dataset.npz"
    if resume:
        sources_now = check_sources_unchanged(run_dir, cfg, copied=cached.exists())
    if resume and cached.exists():
        from multifi.data.dataset import FidelityDataset

        dataset = FidelityDataset.load(cached)
    prep = prepare_data(cfg, dataset if dataset is not None else None, config_source)
    if resume:
        _check_resumed_split(run_dir, prep)
    if leader and not resume:
        check_repeated_geometries(prep.dataset)
        check_split_duplicates(prep.dataset, prep.split)
    _report_data(prep)
    _check_monitor(cfg, prep, config_source)
    check_warmup(cfg, len(prep.pairs["train"]))

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
    )
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
    report_references(refs, prep.dataset.fidelities.names, skip=_untrained(prep))
    if cfg.model.energy_scale == "per_fidelity" and not module.potential.head.shared_baseline:
        warn_scale_gaps(refs, prep.dataset, prep.pairs["train"], skip={n for names in doubtful.values() for n in names})
    module.potential.head.set_baseline(refs.ref, refs.scale, refs.fitted, refs.null)
    module.sync_ema()
    _warn_unseen_in_evaluation(prep, module.potential)
    _check_monitored_energies(cfg, prep, module.potential.head, config_source)

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
    trainer = _build_trainer(cfg, run_dir, len(prep.pairs["val"]) > 0, config_source)
    resumed = None if ckpt is None else torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    if resumed is not None:
        check_world(trainer.world_size, resumed, cfg, run_dir)
    if dry_run:
        _report_plan(cfg, prep, module, run_dir, ckpt, blocked is None)
        if blocked is not None:
            raise MultifiError(f"{blocked} (config and data are valid)")
        return run_dir
    # all checks passed: only now does the run directory get written
    make_dir(run_dir)
    if leader and resumed is not None:
        log.info(
            "resuming at step %d from checkpoints/%s on %d process(es)",
            resumed["global_step"],
            ckpt.name,
            trainer.world_size,
        )
    elif leader and trainer.world_size > 1:
        log.info("training on %d processes", trainer.world_size)
    del resumed  # Lightning loads the checkpoint itself
    if leader and resume:
        _record_resumed_config(run_dir, cfg)
        if sources_now is not None:
            atomic_write(run_dir / SOURCES, lambda f: f.write(json.dumps(sources_now).encode()))
        for stale in (run_dir / "checkpoints").glob(".*.tmp"):  # a checkpoint write the kill cut short
            stale.unlink(missing_ok=True)
    if leader and not resume:
        _clear_unstarted(run_dir)
    if leader:
        run_log.write_to(run_dir / "train.log")
    if leader and not resume:
        atomic_write(run_dir / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
        prep.split.save(run_dir / "splits.json", prep.dataset)
        if cfg.data.train_limits:  # which labels the limits kept
            save_train_labels(run_dir / TRAIN_LABELS, prep.dataset, prep.pairs["train"])
        if cfg.data.cache and not _from_saved_dataset(cfg):
            prep.dataset.save(cached)
        atomic_write(run_dir / SOURCES, lambda f: f.write(json.dumps(source_fingerprints(cfg)).encode()))
    _fit(trainer, module, data, ckpt, run_dir)
    best = final_checkpoint(trainer, run_dir)

    if trainer.global_rank == 0:
        from multifi.models.registry import load_potential, save_potential

        potential = load_potential(best)
        potential.spec["data"] = {split: _counts(prep, split) for split in ("train", "val", "test")}  # model card
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
            "n_train": _counts(prep, "train"),
            **_training_progress(trainer, best),
            "doubtful_units": doubtful,
        }
        atomic_write(run_dir / "metrics.json", lambda f: f.write(json_text(payload).encode()))
        _log_result(payload, run_log)
    return run_dir


def _log_result(payload: dict, run_log: RunLog) -> None:
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
    from multifi.keys import ENERGY_MAE, ENERGY_MAE_PER_ATOM, FORCES_MAE, STRESS_MAE

    labels = {
        ENERGY_MAE: "energy MAE %.4g meV",
        ENERGY_MAE_PER_ATOM: "%.4g meV/atom",
        FORCES_MAE: "forces MAE %.4g meV/Å",
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


def _check_fresh_run_dir(run_dir: Path) -> None:
    """The output folder must be new, empty, or a run directory whose start wrote no checkpoint; and writable."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MultifiError(f"{run_dir}: output_dir exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        names = {p.name for p in run_dir.iterdir()}
        no_checkpoint = not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").glob("*.ckpt"))
        if no_checkpoint and (run_dir / "config.yaml").exists():  # a run's folder: --resume would not help it
            _refuse_restarting_a_finished_run(run_dir)
        if _has_checkpoint(run_dir) or not names <= UNSTARTED_FILES:
            resumable = not no_checkpoint and (run_dir / "config.yaml").exists()
            raise MultifiError(
                f"{run_dir}: run directory exists and is not empty; use "
                + (f"--resume {run_dir} or another output_dir" if resumable else "another output_dir")
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


def _resume_checkpoint(run_dir: Path) -> Path | None:
    """last.ckpt, or best.ckpt when last.ckpt is unreadable (said so); None when no checkpoint is usable."""
    if not (run_dir / "config.yaml").exists():
        raise MultifiError(f"{run_dir}: nothing to resume (no config.yaml: not a multifi run directory)")
    last, best = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "best.ckpt"
    for path in (last, best):
        if not path.exists():
            continue
        problem = _checkpoint_problem(path)
        if problem is None:
            if path == best:
                log.warning("%s: resuming from checkpoints/best.ckpt instead (an earlier epoch)", run_dir)
            return path
        log.warning("%s: unreadable (%s)", path, problem)
    return None


def _checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be read (truncated, corrupted), or None; checks the zip container's CRCs."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return None if bad is None else f"corrupted member {bad}"
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _build_trainer(cfg: RunConfig, run_dir: Path, has_val: bool, config_source: str = "") -> L.Trainer:
    """make_trainer, with Lightning's complaints about devices and accelerators as one-line errors."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return make_trainer(cfg, run_dir, has_val=has_val)
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as exc:
        if isinstance(exc, TypeError) and "devices" not in str(exc):  # a bug, not a setting: its traceback
            raise
        prefix = f"{config_source}: " if config_source else ""
        t = cfg.train
        hint = ""
        if isinstance(t.devices, str) and "," in t.devices and "CPU" in str(exc):
            hint = f" (on CPU, devices is a number of processes: train.devices={len(t.devices.rstrip(',').split(','))})"
        raise MultifiError(
            f"{prefix}train.accelerator={t.accelerator}, train.devices={t.devices}: {' '.join(str(exc).split())}{hint}"
        ) from None


def _fit(trainer: L.Trainer, module, data, ckpt: Path | None, run_dir: Path) -> None:
    """trainer.fit; Ctrl-C becomes KeyboardInterrupt (Lightning turns it into exit code 1) with a resume hint."""
    fit_or_interrupt(trainer, module, data, ckpt, run_dir, f"continue with: multifi train --resume {run_dir}")


def fit_or_interrupt(trainer: L.Trainer, module, data, ckpt: Path | None, run_dir: Path, hint: str) -> None:
    """trainer.fit; Ctrl-C raises KeyboardInterrupt(hint) and SIGTERM Terminated(hint) instead of Lightning's
    silent exit code 1; another process of a multi-process run dying (gloo/NCCL lose their peer) is a one-line
    error with the hint instead of a traceback."""
    import signal

    try:
        with reported(run_dir):
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    except SystemExit:
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C
        raise (Terminated if trainer.received_sigterm else KeyboardInterrupt)(hint) from None
    except RuntimeError as exc:
        if trainer.world_size > 1 and _lost_a_peer(exc):
            log.debug("the collective's error in full", exc_info=exc)  # -v shows it
            raise MultifiError(f"{run_dir}: another training process stopped ({_first_line(exc)}); {hint}") from None
        raise
    if trainer.interrupted:
        raise (Terminated if trainer.received_sigterm else KeyboardInterrupt)(hint)


#: what gloo and NCCL say when the other end of a collective went away (killed, out of memory elsewhere); a slow
#: peer ("timed out") or this process's own failure (CUDA out of memory) is not it and keeps its traceback
LOST_PEER = ("connection reset by peer", "connection closed by peer", "broken pipe", "remote process exited")


def _lost_a_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another process of the run went away."""
    text = str(exc).lower()
    return any(words in text for words in LOST_PEER)


def _first_line(exc: BaseException) -> str:
    """The gist of a backend's message: its first sentence, without the source position gloo prefixes."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split("] ", 1)[-1] if text.startswith("[") else text
    return text.split(". ")[0]


class RunEarlyStopping(EarlyStopping):
    """EarlyStopping whose patience is the configuration's, also on resume (Lightning restores the checkpoint's,
    so a resume with a raised train.early_stopping_patience stopped at the old one while config.yaml said the new)."""

    @property
    def state_key(self) -> str:
        """EarlyStopping's key, so checkpoints written before this class resume with their state."""
        return "EarlyStopping" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    def on_train_start(self, trainer, pl_module) -> None:
        """A checkpoint written at the validation that stopped the run (the process killed before its final files):
        the resume stops before any step, as the run did (it trained on, and a later improvement changed the model)."""
        if self.wait_count >= self.patience:
            trainer.should_stop = True


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps its state when the run directory moved (Lightning drops the best score then,
    so the first validation after the resume would replace best.ckpt whatever its error): paths of the old
    checkpoint folder are read as the same files in this one. The latest-state checkpoint (no monitor) is also
    written at the end of the step during which SIGTERM came (a scheduler's time limit), in a single-process
    run: the resume continues from there, not from the last epoch end."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        terminated = trainer.received_sigterm and trainer.world_size == 1  # several: ranks learn of it at other steps
        if self.monitor is None and terminated and self._last_global_step_saved != trainer.global_step:
            if _nothing_else_due(trainer):
                self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key, so checkpoints written before this class resume with their state."""
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath and Path(old).name == Path(self.dirpath).name:
            moved = lambda p: str(Path(self.dirpath) / Path(p).name) if p else p  # noqa: E731
            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                **{k: moved(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path", "last_model_path")},
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)


def _nothing_else_due(trainer) -> bool:
    """Whether the step that just ended is all that happens before the next one: no validation due (Lightning runs
    it after the batch's hooks; a checkpoint before it made the resume skip it), no stop requested, not the
    epoch's last batch (Lightning closes the epoch after it). A checkpoint here is one a resume continues from
    exactly (ModelCheckpoint's step checkpoints are taken at the same point)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.should_stop or loop.batch_progress.is_last_batch or 0 < trainer.max_steps <= trainer.global_step:
        return False
    try:
        return not loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
    except (AttributeError, TypeError):  # another Lightning's internals: no checkpoint rather than a wrong one
        return False


def make_trainer(cfg: RunConfig, run_dir: Path, has_val: bool = True) -> L.Trainer:
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    monitor = t.monitor_key if has_val else TRAIN_LOSS_EPOCH
    # best.ckpt follows the monitored loss; last.ckpt is rewritten every epoch (or every N steps) whatever
    # the loss did, so a killed run resumes from its latest state (Lightning's save_last only follows saves)
    every_n = t.checkpoint_every_n_steps
    callbacks = [
        RunCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1, enable_version_counter=False
        ),
        RunCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every_n or None,
            every_n_epochs=None if every_n else 1,
            save_on_train_epoch_end=not every_n,
        ),
    ]
    if t.patience_validations and has_val:
        # checked after each validation (not at epoch end: a run may stop mid-epoch at max_steps, unvalidated)
        callbacks.append(
            RunEarlyStopping(
                monitor=monitor, patience=t.patience_validations, mode="min", check_on_train_epoch_end=False
            )
        )
    if t.max_cpu_seconds is not None:
        callbacks.append(CpuBudget(t.max_cpu_seconds))
    callbacks.append(FinalStepCheckpoint())  # after CpuBudget and EarlyStopping: sees their stop
    callbacks.append(ClosedEpochResume())
    # validate (and checkpoint the best model) every N steps across epochs, e.g. for step budgets
    every = (
        {"val_check_interval": t.val_every_n_steps, "check_val_every_n_epoch": None}
        if t.val_every_n_steps and has_val
        else {}
    )
    logger = RunCSVLogger(run_dir)
    # torch's linear backward gives the [1, H] weight of a one-output layer (the readout's last) the strides
    # (1, 1) instead of (H, 1): as contiguous, but DDP's bucket copy reports it as a mismatch on every process
    # (a copy of H numbers per step; nothing else differs)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    trainer = L.Trainer(
        **every,
        default_root_dir=run_dir,
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        gradient_clip_val=t.grad_clip,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        inference_mode=False,
        enable_progress_bar=progress_bar_wanted(t.progress),
        enable_model_summary=False,
        precision="64-true" if t.precision == "64" else "32-true",
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        limit_val_batches=1.0 if has_val else 0,
    )
    logger.steps_done = lambda: trainer.global_step
    return trainer


class FinalStepCheckpoint(Callback):
    """Checkpoints written after the step that ends a run (max_steps, CPU budget, early stopping at a validation
    inside an epoch) record the loop as it stood at
    that step. Lightning closes an epoch cut short by the stop as if it were complete (and the epoch-end
    checkpoint says so), so a resume with a higher max_steps skipped the rest of that epoch and shifted every
    later epoch's sample order; now it continues that epoch where the run stopped, as an uninterrupted run."""

    def __init__(self):
        self.final: dict | None = None

    def on_train_batch_end(self, trainer, *args) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            # a stop requested at this batch makes Lightning validate it (reaching max_steps alone does not:
            # the steps after the last validation inside the epoch never counted for the model kept)
            trainer.should_stop = True
        if trainer.should_stop:
            self._capture(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Early stopping at a validation inside an epoch (val_every_n_steps) ends the run there too."""
        loop = trainer.fit_loop.epoch_loop.batch_progress.current
        inside = loop.processed < trainer.num_training_batches
        if trainer.should_stop and not trainer.sanity_checking and self.final is None and inside:
            self._capture(trainer)

    def _capture(self, trainer) -> None:
        data = trainer.datamodule
        self.final = {
            "fit_loop": copy.deepcopy(trainer.fit_loop.state_dict()),
            "epoch": trainer.current_epoch,
            "data": None if data is None else (type(data).__qualname__, copy.deepcopy(data.state_dict())),
            "sums": _epoch_sums_state(trainer),
        }

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.final is None:
            return
        checkpoint["loops"]["fit_loop"] = self.final["fit_loop"]
        checkpoint["epoch"] = self.final["epoch"]
        if self.final["data"] is not None:
            key, state = self.final["data"]
            checkpoint[key] = state
        if self.final["sums"] is not None:  # the cut epoch's training-loss sums, so its logged means cover it all
            checkpoint["train_epoch_sums"] = self.final["sums"]


class ClosedEpochResume(Callback):
    """Resuming from a checkpoint written after an epoch's last batch but before the epoch closed (a step
    checkpoint, a stop at max_steps or the CPU budget, Ctrl-C before the epoch-end save), Lightning closes that
    epoch when it restarts but keeps its mid-epoch restart stage: the next epoch then ran without its
    epoch-start hooks and without being counted as started, and every later checkpoint carried epoch counters
    one behind (a resume from one of them mid-epoch ran extra steps, a resume with more epochs one epoch too
    few). Once Lightning has closed the epoch, the restart is over.

    Resuming from a checkpoint written by an epoch-end hook (the epoch counted as processed, not yet as
    completed), Lightning ends that epoch once more and counts it processed twice; samplers take their epoch
    from that count, so every later epoch drew the next epoch's sample order (the run differed from an
    uninterrupted one). The count is set back before Lightning repeats the epoch's end.

    A checkpoint at an epoch's last batch also holds that epoch's training-loss sums; where Lightning closes the
    epoch on restart without running its end, they are dropped (they were added to the next epoch's means)."""

    def on_train_start(self, trainer, pl_module) -> None:
        loop = trainer.fit_loop
        done = loop.epoch_progress.total
        closed = done.ready == done.started == done.processed == done.completed
        if getattr(loop, "restarted_mid_epoch", False) and closed:  # (restart stages: Lightning ≥ 2.5)
            loop.reset_restart_stage()
            # Lightning closed the epoch without its epoch-end hooks: its training-loss sums (kept by a checkpoint
            # at its last batch) must not enter the next epoch's means
            if hasattr(pl_module, "epoch_sums"):
                pl_module.epoch_sums = type(pl_module.epoch_sums)()
        if getattr(loop, "restarted_on_epoch_end", False) and done.processed == done.completed + 1:
            for progress in (loop.epoch_progress.total, loop.epoch_progress.current):
                progress.processed -= 1


def _epoch_sums_state(trainer) -> dict | None:
    sums = getattr(trainer.lightning_module, "epoch_sums", None)
    return None if sums is None else copy.deepcopy(sums.state_dict())


class CpuBudget(Callback):
    """Stops training (after the current optimiser step) once it has used `seconds` of this process's CPU time,
    counted from the start of fitting and summed over resumed starts (the spent time is kept in checkpoints)."""

    def __init__(self, seconds: float):
        self.seconds, self.spent, self.reached = seconds, 0.0, False
        self._since: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._since = time.process_time()

    def on_train_start(self, trainer, pl_module) -> None:
        """A checkpoint written at the step that used up the budget (the process killed before its final files):
        the resume stops before any step, as the run did. Resumed with a larger budget, the run trains on (and
        is no longer said to have reached it)."""
        if self.reached and self.spent >= self.seconds:
            trainer.should_stop = True
        else:
            self.reached = False

    def _update(self) -> None:
        now = time.process_time()
        if self._since is not None:
            self.spent += now - self._since
        self._since = now

    #: optimiser steps between checks in a multi-process run (each check is a collective over the ranks)
    EVERY_N_STEPS_DISTRIBUTED = 20

    def on_train_batch_end(self, trainer, *args) -> None:
        self._update()
        if trainer.world_size == 1:
            if self.spent >= self.seconds:
                self.reached = trainer.should_stop = True
            return
        # any rank at the budget stops every rank (their clocks differ a little); every rank checks at the same steps
        if trainer.global_step % self.EVERY_N_STEPS_DISTRIBUTED == 0:
            if trainer.strategy.reduce_boolean_decision(self.spent >= self.seconds, all=False):
                self.reached = trainer.should_stop = True

    def state_dict(self) -> dict:
        self._update()
        return {"spent": self.spent, "reached": self.reached}

    def load_state_dict(self, state: dict) -> None:
        self.spent, self.reached = float(state["spent"]), bool(state["reached"])


def _training_progress(trainer, best: Path) -> dict:
    """Steps run, the step of the best checkpoint, whether early stopping ended the run, the monitored value."""
    best_step = int(torch.load(best, map_location="cpu", weights_only=False).get("global_step", -1))
    stopper = next((cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)), None)
    monitor = trainer.checkpoint_callback.monitor if trainer.checkpoint_callback else None
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    budget = next((cb for cb in trainer.callbacks if isinstance(cb, CpuBudget)), None)
    return {
        "steps": int(trainer.global_step),
        "best_step": best_step,
        "stopped_early": bool(stopper is not None and stopper.wait_count >= stopper.patience),
        "patience_validations": None if stopper is None else int(stopper.patience),
        "monitor": monitor,
        "best_monitored": None if score is None else float(score),
        **({} if budget is None else {"cpu_budget_s": budget.seconds, "cpu_budget_reached": budget.reached}),
    }


def _check_monitor(cfg: RunConfig, prep, config_source: str = "") -> None:
    """The monitored fidelity must exist and have validation labels; otherwise say so before training
    (`config_source`, the config file, prefixes the error)."""
    name = cfg.train.monitor
    prefix = f"{config_source}: " if config_source else ""
    if name is None:
        return
    names = list(prep.dataset.fidelities.names)
    index = prep.dataset.fidelities.index(name, where="train.monitor")
    if not (prep.pairs["val"][:, 1] == index).any():
        raise MultifiError(
            f"{prefix}train.monitor: fidelity {name!r} has no validation structures to monitor "
            f"(validation labels: {', '.join(n for i, n in enumerate(names) if (prep.pairs['val'][:, 1] == i).any()) or 'none'})"
        )
    metric = cfg.train.monitor_metric
    kind = "forces" if metric == FORCES_MAE else "stress" if metric == STRESS_MAE else "energy"
    rows = prep.pairs["val"][prep.pairs["val"][:, 1] == index, 0]
    ds = prep.dataset
    mask = {
        "energy": ~np.isnan(ds.energy[rows, index]),
        "forces": ds.forces_mask[rows, index] if ds.forces_mask is not None else np.zeros(len(rows), bool),
        "stress": ds.stress_mask[rows, index] if ds.stress_mask is not None else np.zeros(len(rows), bool),
    }[kind]
    if not mask.any():
        raise MultifiError(
            f"{prefix}train.monitor_metric: {metric} needs {kind} labels at {name!r} in the validation split; it has none"
        )


def check_something_trains(cfg: RunConfig, data, loss_weights: np.ndarray, config_source: str = "") -> None:
    """No fidelity both sampled and weighted (train.fidelity_sampling 0 for the one, loss.fidelity_weights 0
    for the other): a one-line error, not a run of zero losses. A monitored fidelity that does not train:
    a warning (the checkpoint is picked by a fidelity the gradient never sees)."""
    trained = data.trained_fidelities(loss_weights)
    names = data.dataset.fidelities.names
    if not trained.any():
        prefix = f"{config_source}: " if config_source else ""
        raise MultifiError(
            f"{prefix}no fidelity is both sampled (train.fidelity_sampling > 0) and weighted "
            "(loss.fidelity_weights > 0): nothing would be trained"
        )
    name = cfg.train.monitor
    if name is not None and not trained[data.dataset.fidelities.index(name, where="train.monitor")]:
        log.warning(
            "train.monitor: %s does not train (sampling or loss weight 0, or no training labels): the checkpoint "
            "is picked by a fidelity the gradient never sees (trained: %s)",
            name,
            ", ".join(n for n, t in zip(names, trained) if t),
        )


def _warn_unseen_in_evaluation(prep, potential) -> None:
    """Validation or test structures holding an element no training label holds are left out of their errors
    (the model cannot predict them): said before training, not only by the test report at its end."""
    from multifi.train.evaluate import holds_unknown, unknown_symbols

    ds, known = prep.dataset, potential.head.known().cpu().numpy()
    for part, use in (("val", "validation errors (and the checkpoint choice)"), ("test", "test errors")):
        rows = np.unique(prep.pairs[part][:, 0])
        unseen = rows[holds_unknown(known, ds, rows)] if len(rows) else rows
        if len(unseen):
            log.warning(
                "%d of %d %s structures (e.g. %s) contain %s, which no training label contains: they are left out "
                "of the %s; the model cannot predict them",
                len(unseen),
                len(rows),
                "validation" if part == "val" else part,
                ds.keys[unseen[0]],
                unknown_symbols(known, ds, unseen),
                use,
            )


def _check_monitored_energies(cfg: RunConfig, prep, head, config_source: str = "") -> None:
    """A monitored energy error needs validation structures whose reference energy at the monitored fidelity
    the training labels determine (validation leaves the others out): none is a one-line error before
    training (Lightning otherwise fails at the first validation, the metric never logged)."""
    prefix = f"{config_source}: " if config_source else ""
    unseen = unscored_monitored_labels(cfg, prep.dataset, prep.pairs["val"], head)
    if unseen:
        raise MultifiError(
            f"{prefix}train.monitor_metric: {unseen}, which validation leaves out (the model cannot predict them), so "
            f"{cfg.train.monitor_metric} is never measured; monitor another fidelity or metric, or add training "
            "labels with these elements"
        )
    problem = unmeasured_monitor(cfg, prep.dataset, prep.pairs["val"], head)
    if problem:
        raise MultifiError(
            f"{prefix}train.monitor: {problem}, so its validation energy error (which leaves such structures out) is never "
            f"measured; monitor {FORCES_MAE} or another fidelity, or add "
            f"{cfg.train.monitor} training labels with these elements"
        )
    # the monitored fidelity's case is the error above; a fidelity without training labels is warned about already
    warn_unmeasured_energies(prep.dataset, prep.pairs["val"], head, skip={cfg.train.monitor, *_untrained(prep)})


def unscored_monitored_labels(cfg: RunConfig, ds, val: np.ndarray, head) -> str | None:
    """For a monitored force or stress error: why it would never be measured (None: it will be), namely every
    validation structure with such labels at train.monitor holds an element no training label holds."""
    name, metric = cfg.train.monitor, cfg.train.monitor_metric
    mask = {FORCES_MAE: ds.forces_mask, STRESS_MAE: ds.stress_mask}.get(metric)
    if name is None or mask is None:
        return None
    k = ds.fidelities.index(name, where="train.monitor")
    rows = val[val[:, 1] == k, 0]
    rows = rows[mask[rows, k]]
    from multifi.train.evaluate import holds_unknown, unknown_symbols

    known = head.known().cpu().numpy()
    if len(rows) == 0 or not holds_unknown(known, ds, rows).all():
        return None
    symbols = unknown_symbols(known, ds, rows)
    kind = "force" if metric == FORCES_MAE else "stress"
    return f"every one of the {len(rows)} validation structures with {kind} labels at {name!r} holds {symbols}"


def unmeasured_monitor(cfg: RunConfig, ds, val: np.ndarray, head) -> str | None:
    """Why the monitored validation energy error would never be measured (None: it will be): none of the
    validation structures [P, 2] (structure, fidelity) at train.monitor has a reference energy that the
    training labels determine (head.determined_structures)."""
    name, metric = cfg.train.monitor, cfg.train.monitor_metric
    if name is None or metric in (FORCES_MAE, STRESS_MAE):
        return None
    return unmeasured_energies(ds, val, head, ds.fidelities.index(name, where="train.monitor"))


def warn_unmeasured_energies(ds, val: np.ndarray, head, skip=()) -> None:
    """A warning for each fidelity (but those in `skip`) whose validation energy error is never measured
    (validation leaves out structures whose reference energy the training labels do not determine, and that is
    all of them)."""
    for k, name in enumerate(ds.fidelities.names):
        if name not in skip and (why := unmeasured_energies(ds, val, head, k)):
            log.warning(
                "%s: %s: its validation energy error is never measured (no validation energy curve; forces and "
                "stress are measured)",
                name,
                why,
            )


def unmeasured_energies(ds, val: np.ndarray, head, k: int) -> str | None:
    """Why fidelity k's validation energy error would never be measured (None: it will be, or there is no
    validation energy label at k): none of the validation structures [P, 2] (structure, fidelity) with an energy
    at k has a reference energy that the training labels determine (head.determined_structures)."""
    name = ds.fidelities.names[k]
    rows = val[(val[:, 1] == k) & ~np.isnan(ds.energy[val[:, 0], k]), 0]
    counts = ds.n_atoms[rows]
    atoms = ranges(ds.offsets[rows], counts)
    numbers = torch.as_tensor(ds.numbers[atoms].astype(np.int64))
    structure = torch.as_tensor(np.repeat(np.arange(len(rows)), counts))
    determined = head.determined_structures(numbers, structure, torch.full((len(rows),), k), len(rows))
    if len(rows) == 0 or bool(determined.any()):
        return None
    fitted = set(np.flatnonzero(head.fitted[:, k].cpu().numpy()).tolist())
    unfitted = sorted(set(ds.numbers[atoms].tolist()) - fitted)
    why = (
        f"no {name} training label contains {', '.join(chemical_symbols[z] for z in unfitted)}"
        if unfitted
        else f"its {name} training labels hold their elements only in other proportions"
    )
    return (
        f"none of the {len(rows)} validation structures at {name!r} has a reference energy the training labels "
        f"determine ({why})"
    )


def final_checkpoint(trainer, run_dir: Path) -> Path:
    """After fit (every rank): checkpoints/last.ckpt brought to the final state when a run ended between two
    checkpoint intervals, and the checkpoint of the model to keep: best.ckpt in the run's own folder (a run
    resumed after its directory moved still names the old absolute path in its checkpoint state), else the
    final state, with a warning when validation was expected but never ran."""
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None
    if saved != trainer.global_step:
        trainer.save_checkpoint(last)
    best = _best_checkpoint(trainer, last)
    if best == last and trainer.limit_val_batches and trainer.global_rank == 0:
        every = trainer.val_check_interval if trainer.check_val_every_n_epoch is None else None
        log.warning(
            "%s: no validation ran in this run's %d steps%s: the model kept is the final state, not the best on "
            "validation",
            run_dir,
            trainer.global_step,
            f" (validation every {every} steps)" if every else "",
        )
    return best


def _best_checkpoint(trainer, last: Path) -> Path:
    """best.ckpt in the run's own checkpoint folder (a run resumed after its directory moved still names the
    old absolute path in its checkpoint state), else `last`."""
    for cb in trainer.checkpoint_callbacks:
        if cb.filename == "best" and cb.best_model_path:
            here = Path(cb.dirpath) / "best.ckpt"
            if here.exists():
                return here
    return last


def _stress_counts(prep) -> dict[str, int]:
    """Training structures with a stress label, per fidelity (the calculator says when a fidelity had none)."""
    return {n: c["stress"] for n, c in prep.dataset.label_counts(prep.pairs["train"]).items()}


def _counts(prep, split: str) -> dict[str, int]:
    names = prep.dataset.fidelities.names
    c = torch.bincount(torch.as_tensor(prep.pairs[split][:, 1]), minlength=len(names)).tolist()
    return {n: int(x) for n, x in zip(names, c)}


#: settings a resumed run may change: how long it trains and how it runs; data only by where its files are
#: (splits.json guards the structures). Everything else is fixed by the checkpoint (weights, optimiser and
#: schedule state, sampler) and would be recorded in config.yaml without taking effect.
RESUMABLE = (
    "output_dir",
    "train.epochs",
    "train.max_steps",
    "train.max_cpu_seconds",
    "train.early_stopping_patience",
    "train.early_stopping_steps",
    "train.checkpoint_every_n_steps",
    "train.val_every_n_steps",
    "train.progress",
    "train.threads",
    "train.num_workers",
    "train.accelerator",
    "train.devices",
    "train.num_nodes",
    "train.init_from",
    "train.init_fidelities",
    "model.compile",
    "data.cache",
    "data.neighbor_lists",
    "data.split.files.train",
    "data.split.files.val",
    "data.split.files.test",
)


def check_resume_changes(run_dir: Path, cfg: RunConfig) -> None:
    """Error (before anything is written) when a resume changes a setting its checkpoint fixes."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    checked = _fingerprinted_qm9_files(run_dir)
    before, after = _resume_view(load_run_config(path), checked), _resume_view(cfg, checked)
    fixed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and not _resumable(k))
    if fixed:
        shown = ", ".join(f"{k}: {before.get(k)!r} → {after.get(k)!r}" for k in fixed[:3])
        raise MultifiError(
            f"{path}: a resumed run keeps the settings its checkpoint holds (model, loss, optimiser, schedule, "
            f"batches, data); changed: {shown}. Start a new run instead (train.init_from: {_weights_of(run_dir)} "
            "starts from its weights)"
        )


def _resumable(key: str) -> bool:
    """A flat setting key a resume may change: one of RESUMABLE or an entry of one (train.init_fidelities.lo)."""
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def check_checkpoint_settings(config: Path, ckpt: Path, cfg: RunConfig, sections=("model", "loss", "train")) -> None:
    """Error (before anything is written) when the settings to resume with differ from those the checkpoint was
    trained with (its hyper-parameters) in a setting a resume cannot change: an edited config.yaml (the check
    above compares config.yaml with itself) would be recorded while the checkpoint's optimiser state, e.g. its
    learning rate, decides. Settings the checkpoint does not hold (older versions) are not compared; `sections`:
    those of the config compared (an extension's model comes with the model it extends)."""
    import json

    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)  # hyper-parameters only
    hp = state.get("hyper_parameters") or {}
    held = {"model": (hp.get("model_spec") or {}).get("model"), "loss": hp.get("loss"), "train": hp.get("train")}
    held = json.loads(json.dumps({k: v for k, v in held.items() if v is not None and k in sections}, default=str))
    now = cfg.model_dump(mode="json")
    # field by field, a dict-valued field (loss.fidelity_weights, train.fidelity_sampling) compared whole: flattened,
    # an entry added to an empty dict has no key on the other side
    before = {f"{sec}.{field}": value for sec, fields in held.items() for field, value in fields.items()}
    after = {f"{sec}.{field}": value for sec in held for field, value in now[sec].items()}
    changed = sorted(k for k in before if k in after and before[k] != after[k] and not _resumable(k))
    if changed:
        shown = ", ".join(f"{k}: {before[k]!r} in the checkpoint, {after[k]!r} now" for k in changed[:3])
        new_run = (
            f"start a new run (train.init_from: {_weights_of(config.parent)} starts from its weights)"
            if "model" in sections
            else "start a new extension"
        )
        raise MultifiError(
            f"{config}: differs from the settings its checkpoint trained with ({shown}); a resumed run keeps the "
            f"checkpoint's model, loss, optimiser and schedule: undo the edit, or {new_run}"
        )


def _weights_of(run_dir: Path) -> Path:
    """The file a new run can start from: model.pt, or for a run that never finished its best (else last)
    checkpoint."""
    for name in ("model.pt", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        if (run_dir / name).exists():
            return run_dir / name
    return run_dir / "model.pt"


def check_world(world: int, resumed: dict, cfg: RunConfig, run_dir: Path) -> None:
    """A resume on another number of processes than the checkpoint's: the structures per step and the steps
    per epoch change. Mid-epoch, the epoch cannot go on where it stopped (Lightning counts the batches done
    per process), and a cosine schedule, planned over the steps, cannot follow: one-line errors, before
    anything is written. At an epoch's end with another schedule: a warning. Checkpoints of versions that
    did not record the number: not checked. `resumed`: the checkpoint's contents (loaded with mmap)."""
    state = resumed.get("MultiFidelityData") or {}
    before = state.get("world")
    if before is None or int(before) == world:
        return
    change = f"{before} → {world} processes"
    keep = (
        f"resume on {before} process(es), or start a new run from its weights (train.init_from: {_weights_of(run_dir)})"
    )
    if cfg.train.schedule == "cosine":
        raise MultifiError(
            f"{run_dir}: a cosine learning-rate schedule is planned over the run's steps, whose number depends on "
            f"the number of processes ({change}): {keep}"
        )
    if state.get("batches_done", 0):
        raise MultifiError(
            f"{run_dir}: its checkpoint is inside an epoch, which cannot continue on another number "
            f"of processes ({change}): {keep}"
        )
    log.warning(
        "%s: resumed on another number of processes (%s): a step now takes train.batch_size structures per "
        "process, so the structures per optimiser step and the steps per epoch change",
        run_dir,
        change,
    )


def check_more_to_train(run_dir: Path, ckpt: Path, cfg: RunConfig) -> bool:
    """A resume must have training left: fewer epochs than the checkpoint has done cannot resume (Lightning
    fails after config.yaml was rewritten), and a finished run (model.pt, metrics.json) resumed with other
    settings that leave nothing more to train would rewrite its record with nothing gained: one-line errors,
    before anything is written. True: finished, resumed with its own settings (nothing to do). A run killed
    after its last step but before its final files were written resumes to write them."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)  # loop state only: no tensor read
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    # "processed" counts an epoch whose batches all ran (a checkpoint at its end), "completed" not yet
    epoch, step = int(progress.get("processed", state.get("epoch", 0))), int(state.get("global_step", 0))
    t = cfg.train
    if epoch > t.epochs:
        raise MultifiError(
            f"{run_dir}: its checkpoint has completed {epoch} epochs (step {step}); train.epochs={t.epochs} is fewer: "
            "a resume can only train on (set train.epochs above it, or start a new run from its weights with "
            f"train.init_from: {_weights_of(run_dir)})"
        )
    waited = _validations_without_improvement(state)
    stopped_early = waited is not None and t.patience_validations is not None and waited >= t.patience_validations
    done = epoch >= t.epochs or 0 < t.max_steps <= step or stopped_early
    if not (done and (run_dir / "model.pt").exists() and (run_dir / "metrics.json").exists()):
        return False
    saved = load_run_config(run_dir / "config.yaml")
    saved.output_dir = cfg.output_dir
    last = max(epoch, int(progress.get("started", epoch)))  # the epoch of the last step, 1-based as the log's
    how = f"stopped early: no improvement in {waited} validations" if stopped_early else "finished"
    if dump_config(saved) == dump_config(cfg):
        log.info("%s: %s (%d steps, in epoch %d); nothing to resume, nothing rewritten", run_dir, how, step, last)
        return True
    raise_one = (
        "raise train.early_stopping_patience (or train.early_stopping_steps) above it"
        if stopped_early
        else "raise one of them"
    )
    raise MultifiError(
        f"{run_dir}: {how} ({step} steps, in epoch {last}); train.epochs={t.epochs}, train.max_steps={t.max_steps}, "
        f"patience {t.patience_validations} validations leave nothing more to train: {raise_one} to train on"
    )


def _validations_without_improvement(state: dict) -> int | None:
    """The early-stopping counter a checkpoint holds (validations since the best one), None without one."""
    for key, value in (state.get("callbacks") or {}).items():
        if key.startswith("EarlyStopping") and isinstance(value, dict) and "wait_count" in value:
            return int(value["wait_count"])
    return None


def _resume_view(cfg: RunConfig, checked: list[set[str]] = ()) -> dict:
    """Flat settings, sources without the paths of their files (a file moved elsewhere is the same data): a
    source's path (splits.json and its fingerprint check it) and a QM9 source's label table and indices file
    where the run's sources.json holds their fingerprints (`checked`: per source, the roles it holds; a table
    added or dropped, or moved in a run that recorded no fingerprint, stays a change of setting)."""
    tree = cfg.model_dump(mode="json")
    sources = [{k: v for k, v in src.items() if k != "path"} for src in tree["data"]["sources"]]
    for i, src in enumerate(sources):
        roles = checked[i] if i < len(checked) else set()
        if isinstance(src.get("qm9"), dict):
            src["qm9"] = {
                k: "(a file whose contents are checked)" if k in roles and v is not None else v
                for k, v in src["qm9"].items()
            }
    tree["data"]["sources"] = sources
    return _flat(tree)


def _fingerprinted_qm9_files(run_dir: Path) -> list[set[str]]:
    """Per data source of the run, the QM9 file roles (labels, indices) its sources.json holds fingerprints of."""
    try:
        recorded = json.loads((run_dir / SOURCES).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(recorded, list):
        return []
    return [set(r["qm9"]) if isinstance(r, dict) and isinstance(r.get("qm9"), dict) else set() for r in recorded]


def _record_resumed_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run resumed with other settings (e.g. --set train.epochs=…) gets config.yaml = the settings it now
    trains with, so that the folder describes its model; the first start's settings are kept once as
    config.start.yaml and the changed keys are logged."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    saved = load_run_config(path)
    saved.output_dir = cfg.output_dir
    before, after = _flat(saved.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not changed:
        return
    first = run_dir / "config.start.yaml"
    if not first.exists():
        atomic_write(first, lambda f: f.write(path.read_bytes()))
    atomic_write(path, lambda f: f.write(dump_config(cfg).encode()))
    log.info(
        "%s: resumed with other settings (%s); config.yaml updated, the first start's in %s",
        path,
        ", ".join(f"{k}: {before.get(k)!r} → {after.get(k)!r}" for k in changed),
        first.name,
    )
    if cfg.train.schedule == "cosine" and {"train.max_steps", "train.epochs"} & set(changed):
        log.warning(
            "%s: the cosine learning-rate schedule spans the run's steps, whose number changed: it is recomputed "
            "over the new number, so the learning rate jumps where the run resumes",
            run_dir,
        )


def _flat(tree, prefix: str = "") -> dict:
    """{"train.epochs": 3, "data.sources.0.path": …} of nested dicts and lists (entries by position), so that a
    change is named by its own key; an empty dict or list has no entries (as an absent one)."""
    if isinstance(tree, list):
        tree = {str(k): v for k, v in enumerate(tree)}
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


#: size and SHA-1 of each data source file when the run cached its data (dataset.npz): a resume reads the cache
SOURCES = "sources.json"


def source_fingerprints(cfg: RunConfig) -> list[dict | None]:
    """Per data source: the _fingerprint of its file, or for a QM9 source {"qm9": {"labels"|"indices": …}} of
    its label table and indices file (None: no file, e.g. QM9's own energies or a folder)."""
    out: list[dict | None] = []
    for files in _source_files(cfg):
        if "path" in files:
            out.append(_fingerprint(files["path"]))
        else:
            out.append({"qm9": {role: _fingerprint(path) for role, path in files.items()}} if files else None)
    return out


def _source_files(cfg: RunConfig) -> list[dict[str, Path]]:
    """Per data source, its existing files by role: {"path": …}, or {"labels": …, "indices": …} of a QM9 source."""
    out = []
    for src in cfg.data.sources:
        roles = {"path": src.path} if src.qm9 is None else {"labels": src.qm9.labels, "indices": src.qm9.indices}
        out.append({role: Path(f) for role, f in roles.items() if f and Path(f).is_file()})
    return out


def _fingerprint(path: Path, content: bool = True) -> dict:
    """{"size", "mtime_ns", "ctime_ns", "inode"} of a file and (`content`) the SHA-1 of its bytes (the change
    time cannot be set back by cp -p, rsync -a or touch -r, as the modification time can)."""
    stat = path.stat()
    out = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    if content:
        digest = hashlib.sha1()
        with reported(path, "read"), open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out["sha1"] = digest.hexdigest()
    return out


def check_sources_unchanged(run_dir: Path, cfg: RunConfig, copied: bool = True) -> list | None:
    """A resume trains on the run's cached data (dataset.npz; `copied`) or reads its data files again: a data
    file edited since the run started would be ignored silently, or change the labels mid-run, so that is an
    error (a file moved elsewhere, same content, is fine). A file whose size,
    modification and change times and inode are as recorded is taken as unchanged without reading it
    (multi-GB data). Returns the fingerprints to record when a file was read again and found unchanged
    (touched, copied or moved: the next resume need not read it), else None."""
    recorded = run_dir / SOURCES
    if not recorded.exists():
        return None  # a run of an older version: nothing to compare
    then = json.loads(recorded.read_text())
    updated = list(then)
    for i, (files, was) in enumerate(zip(_source_files(cfg), then)):
        if was is None:  # no file then (runs of older versions recorded none for QM9 sources)
            continue
        recorded_files = was["qm9"] if "qm9" in was else {"path": was}
        if copied:
            for role in recorded_files.keys() - files.keys():
                named = cfg.data.sources[i].path if role == "path" else getattr(cfg.data.sources[i].qm9, role)
                log.warning(
                    "%s: not found; the resume trains on the run's copy of the data made when it started (%s)",
                    named,
                    run_dir / "dataset.npz",
                )
        now = {
            role: _unchanged(files[role], before, run_dir, copied) if role in files else before
            for role, before in recorded_files.items()
        }
        updated[i] = {"qm9": now} if "qm9" in was else now["path"]
    return updated if updated != then else None


def _unchanged(path: Path, before: dict, run_dir: Path, copied: bool = True) -> dict:
    """`path`'s fingerprint if its bytes are those recorded (`before`), read only when size or times differ;
    else the one-line error."""
    now = _fingerprint(path, content=False)
    if now == {k: before.get(k) for k in now}:
        return before
    if now["size"] == before["size"] and (full := _fingerprint(path))["sha1"] == before["sha1"]:
        return full  # touched, copied or moved: same bytes
    why = (
        f"the run trains on its copy in {run_dir / 'dataset.npz'}, so a resume would ignore the change"
        if copied
        else "a resume reads the data again and would train on other labels than the run started with"
    )
    raise MultifiError(
        f"{path}: changed since the run started ({why}); start a new run with the changed data, or restore the file"
    )


def _check_resumed_split(run_dir: Path, prep) -> None:
    """A resumed run must split its structures as it started (splits.json): changed data or split settings
    (--set data.split.seed=…) would train on former test structures and test on former training ones."""
    changed = changed_split(run_dir / "splits.json", prep.split, prep.dataset)
    if changed:
        path, name = changed
        raise MultifiError(
            f"{path}: the resumed run's {name} structures differ from those it started with (data or "
            "data.split settings changed); resume with the run's own settings, or start a new run"
        )


def _report_data(prep) -> None:
    """Samples per fidelity and split; a warning for each fidelity labelled only outside training."""
    counts = {split: _counts(prep, split) for split in ("train", "val", "test")}
    for split, c in counts.items():
        log.info("%s: %s", split, ", ".join(f"{k}={v}" for k, v in c.items()))
    for name in _untrained(prep):
        trained = [other for other, n in counts["train"].items() if n]
        near = closest_name(name, trained)
        log.warning(
            "%s: no training labels (val: %d, test: %d samples): the model cannot learn this fidelity; its "
            "predictions and errors are those of an untrained fidelity vector with reference energies "
            "estimated from the other fidelities%s",
            name,
            counts["val"][name],
            counts["test"][name],
            f" (its name is close to {near!r}, trained on {counts['train'][near]} samples: a typo in the data's "
            "fidelity names?)"
            if near
            else "",
        )
    if any(counts["val"].values()):
        for name, n in counts["train"].items():
            if n and not counts["val"][name]:
                log.warning(
                    "%s: no validation labels (train: %d samples): its errors take no part in picking the best "
                    "checkpoint or in early stopping, and plots have no validation curve for it",
                    name,
                    n,
                )


def _untrained(prep) -> list[str]:
    """Fidelities of the dataset without a single training sample."""
    return [name for name, n in _counts(prep, "train").items() if n == 0]


def _total_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimiser steps the run is set to take over n_train training samples (epochs × steps per epoch, or
    max_steps if fewer)."""
    import math

    t = cfg.train
    per_epoch = math.ceil(n_train / t.batch_size)
    return t.epochs * per_epoch if t.max_steps < 0 else min(t.max_steps, t.epochs * per_epoch)


def check_warmup(cfg: RunConfig, n_train: int) -> None:
    """A warm-up longer than the run (n_train training samples) keeps the learning rate below train.lr
    throughout: warn (train and extend)."""
    total, warm = _total_steps(cfg, n_train), cfg.train.warmup_steps
    if warm and total < warm:  # the last warm-up step (warm − 1, 0-based) is at train.lr
        log.warning(
            "train.warmup_steps=%d is longer than the run (%d steps): the learning rate never reaches "
            "train.lr=%g (it peaks at %.2g); lower warmup_steps or train longer",
            warm,
            total,
            cfg.train.lr,
            cfg.train.lr * total / warm,
        )


def _report_plan(cfg: RunConfig, prep, module, run_dir: Path, ckpt: Path | None, can_start: bool = True) -> None:
    """What a run would do (train --dry-run); `can_start`: False when the run directory blocks it (the error
    that follows says why; no "valid" line before it)."""
    import math

    t = cfg.train
    n_params = sum(p.numel() for p in module.potential.parameters())
    steps = math.ceil(len(prep.pairs["train"]) / t.batch_size)
    total = _total_steps(cfg, len(prep.pairs["train"]))
    log.info(
        "model: %s, %d features, %d interactions, cutoff %g Å, fidelity embedding %s: %s parameters",
        cfg.model.backbone,
        cfg.model.features,
        cfg.model.interactions,
        cfg.model.cutoff,
        cfg.model.fidelity_embedding.inject,
        f"{n_params:,}",
    )
    log.info(
        "training: %d samples, batch %d: %s per epoch, %s, at most %s%s",
        len(prep.pairs["train"]),
        t.batch_size,
        f"{steps} step{'s' * (steps != 1)}",
        f"{t.epochs} epoch{'s' * (t.epochs != 1)}",
        f"{total} step{'s' * (total != 1)}",
        f"; resuming from {ckpt}" if ckpt else "",
    )
    if can_start:
        log.info("dry run: config and data are valid; nothing written (the run would go to %s)", run_dir.resolve())


def warn_open_references(name: str, elements: list[int], labels: str = "training labels") -> None:
    """Warn that fidelity `name`'s `labels` (training labels, or those of data files) contain `elements` only in
    fixed proportions."""
    from ase.data import chemical_symbols

    symbols = ", ".join(chemical_symbols[z] for z in elements)
    log.warning(
        "%s: the %s contain %s only in fixed proportions (e.g. Ga and As only as GaAs), which fixes the sum of "
        "their %s reference energies but not each one: the split is estimated, so energies of structures with "
        "other proportions of %s may be off by eV per atom or more; add %s labels of such structures",
        name,
        labels,
        symbols,
        name,
        symbols,
        name,
    )


#: a fidelity with fewer training energy labels than this (and than half the best-labelled fidelity's) whose
#: scale-to-forces ratio lies more than SCALE_GAP× from the best-labelled fidelity's gets a warning
SCALE_GAP_LABELS = 200
SCALE_GAP = 2.5


def warn_scale_gaps(refs, dataset, pairs: np.ndarray, skip: set[str] = frozenset()) -> None:
    """Warn for fidelities with few training labels whose own output scale (per-fidelity scales) is far from the
    best-labelled fidelity's while their forces are not: the head multiplies each fidelity's output by its scale,
    so there the shared layers must learn gradients that many times larger or smaller, which few labels do
    poorly. Fidelities in `skip` (labels in a doubtful unit) and any without force labels are left out."""
    names = dataset.fidelities.names
    if dataset.forces is None:
        return
    has_energy = ~np.isnan(dataset.energy[pairs[:, 0], pairs[:, 1]])
    counts = np.bincount(pairs[has_energy, 1], minlength=len(names))
    forces = np.bincount(pairs[dataset.forces_mask[pairs[:, 0], pairs[:, 1]], 1], minlength=len(names))
    base = int(np.argmax(counts))
    if names[base] in skip or not forces[base] or not refs.scale[base] > 0:
        return
    with_forces = pairs[dataset.forces_mask[pairs[:, 0], pairs[:, 1]]]
    for k, name in enumerate(names):
        few = 0 < counts[k] < min(SCALE_GAP_LABELS, counts[base] / 2)
        if k == base or name in skip or refs.borrowed_scale[k] or not few or not forces[k] or not refs.scale[k] > 0:
            continue
        scale_ratio = float(refs.scale[k] / refs.scale[base])
        force_ratio, compared = _force_ratio(dataset, with_forces, k, base)
        gap = force_ratio / scale_ratio  # how much larger the gradients of k's raw output must be
        if 1 / SCALE_GAP <= gap <= SCALE_GAP:
            continue
        log.warning(
            "%s: its energy scale from %d training labels, %.3g eV, is %s× that of %s (%.3g eV, %d labels), its "
            "forces %s× as large (RMS, %s); the head multiplies each fidelity's output by its scale, so the shared "
            "layers must learn %s× %s gradients at %s, which few labels do poorly; model.energy_scale: shared fits "
            "one scale for all fidelities",
            name,
            counts[k],
            refs.scale[k],
            _times(scale_ratio),
            names[base],
            refs.scale[base],
            counts[base],
            _times(force_ratio),
            compared,
            _times(max(gap, 1 / gap)),
            "larger" if gap > 1 else "smaller",
            name,
        )


def _force_ratio(dataset, with_forces: np.ndarray, k: int, base: int, min_common: int = 5) -> tuple[float, str]:
    """RMS of fidelity k's force labels over the base fidelity's, on the structures force-labelled at both when
    there are at least `min_common` (else over each one's own structures), and which of the two it is.
    with_forces: [P, 2] force-labelled pairs."""
    mine, theirs = with_forces[with_forces[:, 1] == k], with_forces[with_forces[:, 1] == base]
    common = np.intersect1d(mine[:, 0], theirs[:, 0])
    if len(common) >= min_common:
        mine, theirs = mine[np.isin(mine[:, 0], common)], theirs[np.isin(theirs[:, 0], common)]
    where = f"on the {len(common)} structures labelled at both" if len(common) >= min_common else "each on its own"
    return force_rms(dataset, mine, [k]) / force_rms(dataset, theirs, [base]), where


def _times(x: float) -> str:
    """A ratio for a message: two significant digits, whole numbers from 10 on (137, not 1.4e+02)."""
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def report_references(refs, names, skip=(), labels: str = "training labels") -> None:
    """One warning per fidelity whose training labels lack elements that other fidelities have (except
    `skip`: fidelities without training labels, warned about as such); `labels` names what was fitted
    ("training labels", or the labels of data files for `multifi data info`)."""
    from ase.data import chemical_symbols

    for k, name in enumerate(names):
        if refs.borrowed_scale is not None and refs.borrowed_scale[k] and name not in skip:
            log.warning(
                "%s: its %s do not determine an energy scale (the reference fit leaves fewer than %d degrees of "
                "freedom, or fits exactly); it takes the median of the other fidelities' scales, %.3g eV",
                name,
                labels,
                MIN_SCALE_DOF,
                refs.scale[k],
            )
        if refs.open(k) and name not in skip:
            warn_open_references(name, refs.open(k), labels)
        missing = refs.estimated(k)
        if not missing or name in skip:
            continue
        symbols = ", ".join(chemical_symbols[z] for z in missing)
        shared = int((refs.fitted[:, k] & (refs.fitted.sum(1) >= 2)).sum())  # the elements the error is over
        error = (
            ""
            if np.isnan(refs.spread[k])
            else f" (leave-one-out error of that estimate over the {shared} element{'s' if shared != 1 else ''} "
            f"labelled at {name} and another fidelity: {refs.spread[k]:.2f} eV/atom"
            + ("; from so few elements a rough guide only" if shared < 4 else "")
            + ")"
        )
        log.warning(
            "%s: no energy labels with %s in the %s; their %s reference energies are estimated from "
            "the other fidelities' references as a shared per-element reference plus a %s shift smooth in Z%s",
            name,
            symbols,
            labels,
            name,
            name,
            error,
        )


def _from_saved_dataset(cfg: RunConfig) -> bool:
    """A single saved dataset (.npz or memory-mapped directory) is its own cache: don't copy it."""
    from multifi.data.sources import _is_saved_dataset

    return len(cfg.data.sources) == 1 and _is_saved_dataset(cfg.data.sources[0])


def _quiet_lightning() -> None:
    """Keep Lightning's tips and deprecation chatter out of the user's terminal (unless debugging)."""
    quiet_lightning(verbose=log.isEnabledFor(logging.DEBUG))


def _configure_threads(cfg: RunConfig) -> None:
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
