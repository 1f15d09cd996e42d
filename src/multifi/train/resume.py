"""Resuming a run: which checkpoint to continue from, and the checks that a resume trains on the settings,
data files, split and number of processes its checkpoint was made with (one-line errors before anything is
written)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from multifi.config import RunConfig, dump_config
from multifi.data.split import changed_split
from multifi.errors import MultifiError
from multifi.files import atomic_write, reported
from multifi.train.run_config import load_run_config

log = logging.getLogger("multifi")


def resume_checkpoint(run_dir: Path) -> Path | None:
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
            f"batches, data); changed: {shown}. Start a new run instead (train.init_from: {weights_of(run_dir)} "
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
            f"start a new run (train.init_from: {weights_of(config.parent)} starts from its weights)"
            if "model" in sections
            else "start a new extension"
        )
        raise MultifiError(
            f"{config}: differs from the settings its checkpoint trained with ({shown}); a resumed run keeps the "
            f"checkpoint's model, loss, optimiser and schedule: undo the edit, or {new_run}"
        )


def weights_of(run_dir: Path) -> Path:
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
        f"resume on {before} process(es), or start a new run from its weights (train.init_from: {weights_of(run_dir)})"
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
    """A resume must have training left: fewer epochs than the checkpoint has done, or a step limit below its step,
    cannot resume (Lightning fails after config.yaml was rewritten; a step limit below ended in a traceback), and a finished run (model.pt, metrics.json) resumed with other
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
            f"train.init_from: {weights_of(run_dir)})"
        )
    if 0 < t.max_steps < step:
        raise MultifiError(
            f"{run_dir}: its checkpoint is at step {step}; train.max_steps={t.max_steps} is fewer: a resume can only "
            "train on (set train.max_steps above it, or start a new run from its weights with "
            f"train.init_from: {weights_of(run_dir)})"
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


def record_resumed_config(run_dir: Path, cfg: RunConfig) -> None:
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


def check_resumed_split(run_dir: Path, prep) -> None:
    """A resumed run must split its structures as it started (splits.json): changed data or split settings
    (--set data.split.seed=…) would train on former test structures and test on former training ones."""
    changed = changed_split(run_dir / "splits.json", prep.split, prep.dataset)
    if changed:
        path, name = changed
        raise MultifiError(
            f"{path}: the resumed run's {name} structures differ from those it started with (data or "
            "data.split settings changed); resume with the run's own settings, or start a new run"
        )
