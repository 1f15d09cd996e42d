"""Add a fidelity to a trained potential (`multifi extend`): the fidelity table grows by name, only what
`extend.train` names is trained, and the old fidelities' test errors are measured before and after.

  embedding  the new fidelity's vector (its reference energies and scale are fitted by least squares on
             its training labels); every other weight is frozen, so old fidelities predict bit-for-bit
             what they did before
  head       also the readout MLP (in `heads` mode: only the new fidelity's own head, old heads frozen)
  all        every weight, on the new data mixed with `extend.replay` of the old run's training samples

The data (the old run read back, the new fidelity's, both combined) is extension_data.py's.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

from multifi.config import RunConfig, blamed, dump_config, load_config, with_backbone_defaults
from multifi.data.atomic_energies import ISOLATED
from multifi.data.checks import doubtful_units, warn_isolated_atoms, warn_isolated_atoms_held_out
from multifi.data.dataset import FidelityDataset, atomic_write
from multifi.data.fidelity import FidelityTable
from multifi.data.sources import warn_alike_names
from multifi.data.split import (
    Split,
)
from multifi.data.stats import MIN_SCALE_DOF, fit_new_fidelity, shared_estimates_with_error, shortest_contacts
from multifi.errors import MultifiError, unknown_name
from multifi.files import json_text, make_dir
from multifi.keys import COUNT, FORCES_COUNT
from multifi.train.extension_data import (
    OldRun,
    check_run_of_model,
    combine,
    find_old_run,
    load_old_run,
    log_followed_split,
    merged_run_data,
    read_new_data,
    sample_pairs,
    save_run_data,
)
from multifi.train.init import FIDELITY_AXIS
from multifi.train.module import PotentialModule
from multifi.train.prepare import FidelitySettings
from multifi.train.run_config import load_run_config

log = logging.getLogger("multifi")

_HEAD = re.compile(r"^head\.mlps\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------- checks
def check_request(old, x, where: str) -> int:
    """Errors for extensions that cannot work; returns the index of the fidelity the new one starts from."""
    names = list(old.fidelities.names)
    inject = old.config.fidelity_embedding.inject
    if x.fidelity in old.fidelities:
        raise MultifiError(
            f"{where}: fidelity {x.fidelity!r} exists already (fidelities: {', '.join(names)}); extend with a new name"
        )
    alike = [n for n in names if n.replace(" ", "").casefold() == x.fidelity.replace(" ", "").casefold()]
    if alike:  # predict --fidelity would then take a typo of the old name for the new fidelity
        raise MultifiError(
            f"{where}: fidelity {x.fidelity!r} differs from the model's {alike[0]!r} only in case or spaces; "
            "extend with a name of its own"
        )
    if inject == "single":
        raise MultifiError(
            f"{where}: inject: single has no fidelity information, so a new fidelity cannot be told "
            "apart from the others (fine-tune with train.init_from instead)"
        )
    if x.train == "embedding" and inject == "onehot":
        raise MultifiError(
            f"{where}: inject: onehot has no trainable fidelity vector for train: embedding "
            "(it needs input, readout or both); use train: head or all"
        )
    if x.train == "embedding" and inject == "heads":
        raise MultifiError(
            f"{where}: inject: heads has no fidelity vector; the new fidelity gets its own head: "
            "use train: head (only that head trains, the old fidelities stay unchanged)"
        )
    if x.replay > 0 and x.train == "embedding":
        raise MultifiError(
            f"{where}: extend.replay needs train: head or all (train: embedding leaves the old fidelities frozen)"
        )
    if x.replay_fidelities and x.replay == 0:
        raise MultifiError(
            f"{where}: extend.replay_fidelities ({', '.join(x.replay_fidelities)}) without extend.replay: nothing "
            "is replayed; give the fraction to replay (--replay F, 0 < F ≤ 1)"
        )
    for name in x.replay_fidelities or []:
        if name not in old.fidelities:
            raise unknown_name("fidelity", name, names, f"{where}: extend.replay_fidelities")
    if x.init_like is None:
        return 0
    return old.fidelities.index(x.init_like, where=f"{where}: extend.init_like")


# ---------------------------------------------------------------------------------------------- weights
def grow_weights(new, old, like: int) -> None:
    """Load `old`'s weights into `new` (the same model with one more fidelity, last): old fidelities keep
    their indices and values; the new one's vector, reference energies, scale and head (heads mode) are
    copies of fidelity `like`'s; in onehot mode its input column is a copy of `like`'s column."""
    src, K = old.state_dict(), len(old.fidelities)
    state = {}
    for key, target in new.state_dict().items():
        m = _HEAD.match(key)
        if key == "conditioning.onehot":
            value = target
        elif m and new.head.heads and int(m.group(1)) == K:
            value = src[f"head.mlps.{like}.{m.group(2)}"]
        else:
            value = src[key]
            axis = FIDELITY_AXIS.get(key)
            if axis is not None:
                value = torch.cat([value, value.narrow(axis, like, 1)], axis)
            elif value.shape != target.shape:  # onehot: one more input column, the new fidelity's entry
                value = torch.cat([value, value[:, value.shape[1] - K + like, None]], 1)
        state[key] = value.to(target.dtype)
    new.load_state_dict(state)


def unchanged_fidelities(old, new) -> bool:
    """True when every weight that an old fidelity's prediction depends on is bit-for-bit as in `old`."""
    src, K = old.state_dict(), len(old.fidelities)
    for key, value in new.state_dict().items():
        m = _HEAD.match(key)
        if key in ("conditioning.onehot", "head.contact", "head.reach", "head.spread") or (
            m and new.head.heads and int(m.group(1)) == K
        ):
            continue  # the new fidelity's own input column / head; training distances and the estimates' error
            # (no prediction uses them)
        if key in FIDELITY_AXIS:
            value = value.narrow(FIDELITY_AXIS[key], 0, K)
        if key not in src or value.shape != src[key].shape or not torch.equal(value, src[key].to(value.dtype)):
            return False
    return True


class ExtendModule(PotentialModule):
    """PotentialModule that trains only what `trainable` names for the fidelity at index `new`.

    Partly trainable tensors (the fidelity table, onehot input columns) get a gradient mask and no weight
    decay, so their other rows keep their exact values (Adam's update of an always-zero gradient is 0)."""

    def __init__(self, model_spec, loss, train, fidelity_weights=None, trainable: str = "all", new: int = 0):
        super().__init__(model_spec, loss, train, fidelity_weights)
        self.save_hyperparameters({**self.hparams, "trainable": trainable, "new": new}, ignore=["fidelity_weights"])
        self.trainable, self.new = trainable, new
        self._masked: list[torch.nn.Parameter] = []
        self._trained_entries: dict[int, int] = {}  # id of a masked tensor → its entries that train

    def freeze(self) -> list[str]:
        """Set requires_grad and gradient masks for `trainable`; returns the names of the trained tensors."""
        pot = self.potential
        if self.trainable == "all":
            return [n for n, _ in pot.named_parameters()]
        pot.requires_grad_(False)
        cond = pot.conditioning
        if getattr(cond, "table", None) is not None:
            self._mask(cond.table.weight, 0)
        if self.trainable == "head":
            if pot.head.heads:
                pot.head.mlps[self.new].requires_grad_(True)
            else:
                pot.head.mlps.requires_grad_(True)
                if cond.mode == "onehot" and cond.project is not None:
                    self._mask(cond.project.weight, 1)
        return [n for n, p in pot.named_parameters() if p.requires_grad]

    def _mask(self, p: torch.nn.Parameter, axis: int) -> None:
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep.select(axis, self.new).fill_(True)
        p.requires_grad_(True)
        p.register_hook(lambda g: torch.where(keep, g, torch.zeros_like(g)))
        self._masked.append(p)
        self._trained_entries[id(p)] = int(keep.sum())

    def trained_parameters(self) -> int:
        """The number of parameters that train: of a masked tensor (the fidelity table), its new fidelity's."""
        return sum(self._trained_entries.get(id(p), p.numel()) for p in self.potential.parameters() if p.requires_grad)

    def param_groups(self) -> list[dict]:
        masked = {id(p) for p in self._masked}
        free = [p for p in self.potential.parameters() if p.requires_grad and id(p) not in masked]
        return ([{"params": free}] if free else []) + (
            [{"params": self._masked, "weight_decay": 0.0}] if self._masked else []
        )


def _say_if_checkpoint(model, old) -> None:
    """Extending a training checkpoint of a finished run whose weights are not the run's model.pt (last.ckpt;
    model.pt holds the best validation's EMA weights): the old fidelities then keep the checkpoint's predictions,
    not model.pt's. Said, since the extension's "unchanged" report compares with the checkpoint."""
    from multifi.models.registry import checkpoint_run, load_potential

    run = checkpoint_run(model)
    if run is None:
        return
    kept, ours = load_potential(run / "model.pt", compile=False).state_dict(), old.state_dict()
    if kept.keys() != ours.keys() or not all(torch.equal(kept[k], ours[k]) for k in ours):
        log.warning(
            "%s: a training checkpoint, not %s (the model the run kept): the extension starts from the checkpoint's "
            "weights, and its old fidelities keep the checkpoint's predictions, which differ from model.pt's; give "
            "%s to extend the run's model",
            model,
            run / "model.pt",
            run,
        )


# ---------------------------------------------------------------------------------------------- driver
def _check_new_run_dir(run_dir: Path) -> None:
    """An extension writes a new folder (or an empty one) that can be created."""
    from multifi.train.run import check_creatable

    if run_dir.exists() and not run_dir.is_dir():
        raise MultifiError(f"{run_dir}: output directory exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if _unfinished_extension(run_dir):
            raise MultifiError(
                f"{run_dir}: an extension that did not finish (no model.pt): continue it with multifi extend "
                f"--resume {run_dir}, or remove the folder, or choose another output directory"
            )
        raise MultifiError(f"{run_dir}: run directory exists and is not empty; choose another output directory")
    check_creatable(run_dir)


def _unfinished_extension(run_dir: Path) -> bool:
    """An extension's folder (config.yaml with an `extend` section) without its model.pt."""
    return not (run_dir / "model.pt").exists() and _is_extension(run_dir)


def _is_extension(run_dir: Path) -> bool:
    """A run directory whose config.yaml has an `extend` section."""
    if not (run_dir / "config.yaml").is_file():
        return False
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("extend") is not None


def extend(cfg: RunConfig, config_source: str = "", dry_run: bool = False, resume: bool = False) -> Path:
    """Extend cfg.extend.model by the fidelity cfg.extend.fidelity; returns the run directory
    (model.pt, metrics.json with the new fidelity's test errors and the old fidelities' before/after, train.log
    with multifi's log of the extension, warnings about the data included).
    `dry_run`: check model, config and data, log the plan, write nothing. `resume`: continue the unfinished
    extension in cfg.output_dir from its last checkpoint (cfg: its config.yaml; its data files unchanged)."""
    from multifi.train.run import RunLog, kept_process_state

    out = Path(cfg.output_dir)
    if resume and _is_extension(out) and (out / "model.pt").exists() and (out / "metrics.json").exists():
        log.info("%s: the extension finished (model.pt is written); nothing to resume, nothing rewritten", out)
        return out  # as `multifi train --resume` of a finished run
    with RunLog() as run_log, kept_process_state():
        return _extend(cfg, config_source, dry_run, run_log, resume)


def _resume_point(run_dir: Path, cfg: RunConfig) -> Path:
    """The checkpoint an unfinished extension continues from; one-line errors for a finished or foreign folder
    and for data files edited since it started."""
    from multifi.train.resume import check_checkpoint_settings, check_sources_unchanged, resume_checkpoint

    if not _is_extension(run_dir):
        raise MultifiError(f"{run_dir}: not an extension's run directory (no config.yaml with an 'extend' section)")
    if (run_dir / "model.pt").exists():
        raise MultifiError(f"{run_dir}: the extension finished (model.pt is written); nothing to resume")
    ckpt = resume_checkpoint(run_dir)
    if ckpt is None:
        raise MultifiError(f"{run_dir}: the extension wrote no checkpoint before it stopped; remove it and start again")
    check_sources_unchanged(run_dir, cfg, copied=False)
    check_checkpoint_settings(run_dir / "config.yaml", ckpt, cfg, sections=("loss", "train"))
    return ckpt


def _extend(cfg: RunConfig, config_source: str, dry_run: bool, run_log, resume: bool = False) -> Path:
    from multifi.logs import is_leader_process
    from multifi.models.registry import load_potential
    from multifi.train.datamodule import MultiFidelityData
    from multifi.train.preflight import check_something_trains, check_warmup, unmeasured_monitor
    from multifi.train.resume import SOURCES, source_fingerprints
    from multifi.train.run import configure_threads, hush_lightning, log_result
    from multifi.train.trainer import final_checkpoint, fit_or_interrupt, make_trainer, training_progress

    x = cfg.extend
    where = config_source or x.model
    run_dir = Path(cfg.output_dir)
    ckpt = _resume_point(run_dir, cfg) if resume else None
    if not resume:
        _check_new_run_dir(run_dir)
    old = load_potential(x.model, compile=False)
    _say_if_checkpoint(x.model, old)
    like = check_request(old, x, where)
    cfg = _with_model_precision(with_backbone_defaults(cfg, old.config.backbone), old, where)
    configure_threads(cfg)
    hush_lightning()
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    table = FidelityTable([*old.fidelities.names, x.fidelity])
    warn_alike_names(table.names, where)
    ds, pairs, old_run, replay, settings, run_data = _extension_data(cfg, old, table, where, config_source)
    atomic, pairs = _new_atomic_energies(cfg, old, ds, pairs, where)
    warn_isolated_atoms(ds, pairs["train"])  # free atoms trained as ordinary structures raise the scale
    if not cfg.data.split.files:
        warn_isolated_atoms_held_out(ds, pairs)
    _warn_split_duplicates(*(run_data or (ds, pairs)))
    module = ExtendModule(
        {"model": old.config, "fidelities": table.names},
        cfg.loss,
        cfg.train,
        settings.loss_weights,
        x.train,
        len(old.fidelities),
    )
    grow_weights(module.potential, old, like)
    doubtful = _fit_new_baseline(
        module.potential,
        ds,
        pairs["train"],
        len(old.fidelities),
        old.config.energy_scale,
        np.concatenate(list(pairs.values())),
        settings.known_units(table),
        atomic,
    )
    if x.train == "embedding":
        _warn_scale_apart(module.potential, like, len(old.fidelities))
    trained = module.freeze()
    module.sync_ema()
    problem = unmeasured_monitor(cfg, ds, pairs["val"], module.potential.head)
    if problem:
        module.energies_scored_everywhere = [table.index(cfg.train.monitor)]
        log.warning(
            "%s: %s; its validation energy error is measured on all of them instead, including the error of "
            "the estimated references",
            where,
            problem,
        )
    log.info(
        "extend %s by %r (train: %s): %d trainable tensors; train %s",
        x.model,
        x.fidelity,
        x.train,
        len(trained),
        _count_text(pairs["train"], table),
    )

    data = MultiFidelityData(
        ds,
        pairs,
        old.cutoff,
        cfg.train.batch_size,
        cfg.train.num_workers,
        settings.sampling,
        cfg.train.seed,
        progress=cfg.train.progress,
        neighbor_lists=cfg.data.neighbor_lists,
    )
    data.check_sampling(config_source)
    check_something_trains(cfg, data, settings.loss_weights, config_source)
    check_warmup(cfg, len(pairs["train"]))
    _warn_unmeasured(pairs, table, len(old.fidelities))
    if dry_run:
        _report_extension_plan(cfg, module, pairs, table, run_dir)
        return run_dir
    make_dir(run_dir)
    if is_leader_process():
        run_log.write_to(run_dir / "train.log")
    if ckpt is None:
        atomic_write(run_dir / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
        atomic_write(run_dir / SOURCES, lambda f: f.write(json.dumps(source_fingerprints(cfg)).encode()))
    else:
        log.info("%s: resuming the extension from %s", run_dir, ckpt.relative_to(run_dir))
    trainer = make_trainer(cfg, run_dir, has_val=len(pairs["val"]) > 0)
    hint = f"continue with: multifi extend --resume {run_dir}"
    try:
        fit_or_interrupt(trainer, module, data, ckpt, run_dir, hint)
    except (KeyboardInterrupt, MultifiError) as exc:
        if not any((run_dir / "checkpoints").glob("*.ckpt")):  # nothing to continue from: the folder goes
            shutil.rmtree(run_dir, ignore_errors=True)
            gone = f"the extension stopped before its first checkpoint and {run_dir} was removed; run it again"
            raise type(exc)(gone if isinstance(exc, KeyboardInterrupt) else str(exc)) from None  # SIGTERM: 143
        raise
    best_path = final_checkpoint(trainer, run_dir)
    best = load_potential(best_path, compile=False)
    contact, reach = shortest_contacts(data.dataset, data.neighbors, np.unique(pairs["train"][:, 0]))
    # a model saved before contacts and reaches were recorded: its old fidelities' are unknown, the new data's
    # alone would call their ordinary geometries crushed, stretched or never seen
    if not bool(best.head.contact.any()):
        contact = np.zeros_like(contact)
    best.head.record_contacts(contact, reach if bool(best.head.reach.any()) else None)
    doubtful = _with_old_doubtful_units(doubtful, find_old_run(x), old.fidelities.names)
    progress = {"checkpoint": str(best_path), **training_progress(trainer, best_path), "doubtful_units": doubtful}
    log_result(_finish(cfg, old, best, data, pairs, table, old_run, replay, progress), run_log)
    if run_data is not None:  # without the old run's data the run keeps none (a further extension cannot replay)
        save_run_data(run_dir, *run_data)
    return run_dir


def _with_old_doubtful_units(new: dict, old_run: Path | None, old_names: list[str]) -> dict:
    """{label: [fidelity]} of the unit checks on the new fidelity's labels, with those the old model's run recorded
    for its fidelities (its metrics.json): the extension predicts the old fidelities in the units they were
    trained in, so its model card keeps saying which were doubted."""
    from multifi.train.run_config import doubtful_units_of_run

    merged = {label: list(names) for label, names in new.items()}
    for label, names in (doubtful_units_of_run(old_run) if old_run is not None else {}).items():
        kept = [n for n in names if n in old_names and n not in merged.get(label, [])]
        if kept:
            merged[label] = kept + merged.get(label, [])
    return merged


def _warn_split_duplicates(ds: FidelityDataset, pairs: dict[str, np.ndarray]) -> None:
    """New structures repeating a geometry of another split under another key (of the old run's test
    structures, say) would make test errors and the forgetting report optimistic: warned, as `train` does."""
    from multifi.data.checks import check_split_duplicates

    train = np.unique(pairs["train"][:, 0])
    val = np.setdiff1d(np.unique(pairs["val"][:, 0]), train)
    test = np.setdiff1d(np.unique(pairs["test"][:, 0]), np.concatenate([train, val]))
    check_split_duplicates(ds, Split(train=train, val=val, test=test))


def _report_extension_plan(cfg: RunConfig, module, pairs: dict, table: FidelityTable, run_dir: Path) -> None:
    """What an extension would do (extend --dry-run)."""
    from multifi.train.preflight import steps_per_epoch

    trainable = module.trained_parameters()
    steps = steps_per_epoch(cfg, len(pairs["train"]))
    cap = f", at most {cfg.train.max_steps} step{'s' * (cfg.train.max_steps != 1)}" if cfg.train.max_steps > 0 else ""
    log.info(
        "training: %d samples (%s), batch %d: %s per epoch, %s%s; %s trainable parameters",
        len(pairs["train"]),
        _count_text(pairs["train"], table),
        cfg.train.batch_size,
        f"{steps} step{'s' * (steps != 1)}",
        f"{cfg.train.epochs} epoch{'s' * (cfg.train.epochs != 1)}",
        cap,
        f"{trainable:,}",
    )
    log.info("validation: %s; test: %s", _count_text(pairs["val"], table), _count_text(pairs["test"], table))
    log.info("dry run: model, config and data are valid; nothing written (the run would go to %s)", run_dir.resolve())


def _with_model_precision(cfg: RunConfig, old, where: str) -> RunConfig:
    """cfg with train.precision = the model's (a different one set by the user is an error)."""
    precision = "64" if next(old.parameters()).dtype == torch.float64 else "32"
    if "precision" in cfg.train.model_fields_set and cfg.train.precision != precision:
        raise MultifiError(
            f"{where}: train.precision {cfg.train.precision} differs from the model's ({precision}); "
            "an extension keeps the model's precision"
        )
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})


def _extension_data(cfg: RunConfig, old, table: FidelityTable, where: str, config_source: str):
    """Training dataset laid out as `table`, its split pairs, the old run's data (or None), the replay, the
    config's per-fidelity settings resolved against `table`, and the data the run keeps (merged_run_data;
    None without the old run's data)."""
    x = cfg.extend
    run = find_old_run(x)
    if run is not None and x.old_run is not None:
        check_run_of_model(run, x, old)
    old_run = _old_run_data(run, explicit=x.old_run is not None or x.replay > 0)
    new_ds, new_pairs = read_new_data(cfg, x.fidelity, old_run)
    if cfg.data.atomic_energies == ISOLATED:  # references, not data: out of every split the run keeps
        from multifi.data.atomic_energies import resolve_atomic_energies, without_frames

        new_pairs = without_frames(new_pairs, resolve_atomic_energies(ISOLATED, new_ds, where))
    if len(new_pairs["train"]) == 0:
        raise MultifiError(f"{where}: no training structures at {x.fidelity!r} after the split")
    replay = _replay(x, old, old_run, cfg.train.seed, where)
    ds, pairs = combine(table, new_ds, new_pairs, old_run, replay)
    settings = FidelitySettings.resolve(cfg, ds.fidelities, config_source)
    if old_run is not None and replay:
        _warn_settings_not_carried(old_run.path, cfg)
    _check_elements(old, new_ds, x.fidelity, x.train, where)
    sources = ", ".join(str(src.path or "qm9") for src in cfg.data.sources)
    run_data = None if old_run is None else merged_run_data(table, new_ds, new_pairs, old_run, sources)
    if old_run is not None and not cfg.data.split.files:  # said once the data merged (a key clash is an error)
        log_followed_split(new_ds, old_run)
    return ds, pairs, old_run, replay, settings, run_data


def _new_atomic_energies(cfg: RunConfig, old, ds, pairs: dict, where: str) -> tuple[np.ndarray | None, dict]:
    """(the new fidelity's atomic energies [119] eV or None, the pairs without the one-atom frames read for them):
    a model whose references are atomic energies needs the new fidelity's (data.atomic_energies), one with
    least-squares references cannot take them (the two kinds differ by each element's bonding)."""
    from multifi.data.atomic_energies import check_atomic_coverage, resolve_atomic_energies

    x, k = cfg.extend, len(old.fidelities)
    model_atomic = bool(old.head.atomic.any())
    if not model_atomic and cfg.data.atomic_energies is None:
        return None, pairs
    if not model_atomic:
        raise MultifiError(
            f"{where}: data.atomic_energies: the model's references are least-squares fits to its labels, not atomic "
            f"energies; {x.fidelity}'s atomic energies could not be compared with them (leave data.atomic_energies "
            "out)"
        )
    if cfg.data.atomic_energies is None:
        raise MultifiError(
            f"{where}: the model's reference energies are atomic energies (data.atomic_energies); give "
            f"{x.fidelity}'s: data.atomic_energies: {{{x.fidelity}: {{element: eV, …}}}} or isolated (one-atom "
            "frames in the data)"
        )
    setting = cfg.data.atomic_energies
    if setting != ISOLATED:
        from multifi.data.atomic_energies import read_table

        given_old = [n for n in (read_table(setting) if isinstance(setting, str) else setting) if n in old.fidelities]
        if given_old:
            log.warning(
                "%s: data.atomic_energies of %s not used: the model's references at its fidelities stay as trained",
                where,
                ", ".join(given_old),
            )
    atomic = resolve_atomic_energies(setting, ds, where, frozenset(old.fidelities.names))
    check_atomic_coverage(atomic, ds, pairs["train"][pairs["train"][:, 1] == k], where)
    return atomic.values[:, k], pairs


def _warn_settings_not_carried(run: Path, cfg: RunConfig) -> None:
    """The old run's per-fidelity training settings (loss weights, sampling) are not carried over to the
    replayed fidelities: an extension trains with its own config's. Said when they differ."""
    try:
        raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    for section, key, now in (
        ("loss", "fidelity_weights", cfg.loss.fidelity_weights),
        ("train", "fidelity_sampling", cfg.train.fidelity_sampling),
    ):
        before = (raw.get(section) or {}).get(key) or {}
        if before and before != now:
            log.warning(
                "%s.%s of the old run (%s) is not carried over to the replayed fidelities: the extension trains "
                "with its own (%s); set it in the extension's config to keep it",
                section,
                key,
                before,
                now or "none",
            )


def _finish(
    cfg: RunConfig, old, potential, data, pairs: dict, table: FidelityTable, old_run, replay, progress: dict
) -> dict:
    """Check the freeze, evaluate the new fidelity and the old ones (before/after), write model.pt and
    metrics.json (with `progress`: the checkpoint kept, its step, the steps run) into the run directory; returns
    what metrics.json holds."""
    from multifi.models.registry import save_potential
    from multifi.train.evaluate import evaluate_pairs

    x, run_dir, K = cfg.extend, Path(cfg.output_dir), len(old.fidelities)
    unchanged = unchanged_fidelities(old, potential)
    if x.train == "embedding" and not unchanged:  # a broken freeze must never pass silently
        raise RuntimeError("extend: train: embedding changed weights of the old fidelities")
    new_metrics = evaluate_pairs(
        potential, data.dataset, data.neighbors, pairs["test"][pairs["test"][:, 1] == K], cfg.train.batch_size
    )
    forgetting = _forgetting(old, potential, old_run, cfg.train.batch_size)
    potential.spec.update(_card_data(old, x, pairs, table, replay, old_run))
    # stress-labelled training structures: the old fidelities' as the old model recorded them (if it did), the new
    # one's counted in its training data
    trained = data.dataset.label_counts(pairs["train"][pairs["train"][:, 1] == K])[x.fidelity]["stress"]
    potential.spec["stress_labels"] = {**old.spec.get("stress_labels", {}), x.fidelity: trained}
    save_potential(potential, run_dir / "model.pt")
    payload = {
        "fidelities": {**{n: f["after"] for n, f in forgetting.items()}, **new_metrics},
        "new_fidelity": x.fidelity,
        "train": x.train,
        "replay": x.replay,
        "old_fidelities_unchanged": unchanged,
        "forgetting": forgetting,
        "old_run": str(old_run.path) if old_run else None,
        "n_train": _counts(pairs["train"], table),
        **progress,
    }
    atomic_write(run_dir / "metrics.json", lambda f: f.write(json_text(payload).encode()))
    return payload


def _old_run_data(run: Path | None, explicit: bool) -> OldRun | None:
    """The old run's data; a run directory found beside the model without its data only gets a warning, unless
    the extension needs it (explicit: --old-run given, or replay)."""
    if run is None:
        return None
    load_config(run / "config.yaml")  # a damaged config of the model's own run: an error, not a lost forgetting check
    try:
        return load_old_run(run)
    except MultifiError as exc:
        if explicit:
            raise
        log.warning("the old fidelities' errors are not measured: %s", exc)
        return None


def _replay(x, old, old_run: OldRun | None, seed: int, where: str) -> dict[str, np.ndarray]:
    if x.replay == 0:
        return {}
    if old_run is None:
        raise MultifiError(
            f"{where}: extend.replay needs the model's run directory (dataset.npz, and splits.json or pairs.npz): "
            "set extend.old_run (--old-run)"
        )
    names = x.replay_fidelities or list(old.fidelities.names)
    absent = [n for n in names if n not in old_run.dataset.fidelities]
    if absent:  # an earlier run of the model's history (extended since), or another model's
        held = [n for n in names if n in old_run.dataset.fidelities]
        raise MultifiError(
            f"{where}: replay: {old_run.path} holds no data of {', '.join(absent)} (the model's fidelities since "
            f"extensions, or not its run); name the run that trained {x.model} (--old-run), or replay only what "
            f"{old_run.path} holds ({', '.join(held) or 'nothing of the model'}: --replay-fidelity)"
        )
    ks = [old_run.dataset.fidelities.index(n) for n in names]
    empty = [n for n, k in zip(names, ks) if not (old_run.train[:, 1] == k).any()]
    if empty and x.replay_fidelities:
        raise MultifiError(f"{where}: replay of {', '.join(empty)}: {old_run.path} holds no training structures there")
    return {
        "train": sample_pairs(old_run.train, x.replay, ks, seed),
        "val": sample_pairs(old_run.val, x.replay, ks, seed),
    }


def _check_new_units(ds, pairs: np.ndarray, k: int, ref, scale, known_ref, known_fitted, known_units=()) -> dict:
    """The unit checks (data.checks.doubtful_units) of the new fidelity's labelled `pairs` of every split, against
    its own fit of those labels (a fit of the training split has no reference for an element only tested)."""
    own = fit_new_fidelity(ds, pairs, k, known_ref, known_fitted)
    ref, scale = ref.copy(), scale.copy()
    ref[:, k] = own.ref[:, 0]
    scale[k] = scale[k] if np.isnan(own.scale[0]) else own.scale[0]
    return doubtful_units(ds, pairs, ref, scale, known_units)


def _fit_new_baseline(
    potential,
    ds: FidelityDataset,
    train_pairs: np.ndarray,
    k: int,
    energy_scale,
    labelled: np.ndarray,
    known_units: list[str] = (),
    atomic: np.ndarray | None = None,
) -> dict:
    """Reference energies [119] and scale of the new fidelity k by least squares on its training labels,
    next to the model's known references (elements its labels lack get the shared estimate, flagged in
    head.fitted); the old columns are not touched. With energy_scale: shared, the new fidelity takes the
    shared scale. Returns the unit checks' findings on its `labelled` pairs, every split (data.checks.doubtful_units).
    `atomic` [119] eV (NaN: not given): its atomic energies, for a model whose references are atomic energies."""
    head = potential.head
    known_ref = head.ref[:, :k].detach().double().cpu().numpy()
    known_fitted = head.fitted[:, :k].cpu().numpy()
    new = fit_new_fidelity(
        ds,
        train_pairs,
        k,
        known_ref,
        known_fitted,
        atomic=atomic,
    )
    if atomic is not None:
        from multifi.data.atomic_energies import check_binding

        check_binding(new, [potential.fidelities.names[k]], "extend")
    if new.open(0):
        from multifi.train.preflight import warn_open_references

        warn_open_references(potential.fidelities.names[k], new.open(0))
    ref = head.ref.detach().double().cpu().numpy().copy()
    ref[:, k] = new.ref[:, 0]
    scale = head.scale.detach().double().cpu().numpy().copy()
    if np.isnan(new.scale[0]) and energy_scale != "shared":  # too few labels to fit its scale: the others' median
        new.scale[0] = float(np.median(scale[:k]))
        log.warning(
            "%s: its %d training labels do not determine an energy scale (the reference fit leaves fewer than "
            "%d degrees of freedom); it takes the median of the other fidelities' scales, %.3g eV",
            potential.fidelities.names[k],
            int((train_pairs[:, 1] == k).sum()),
            MIN_SCALE_DOF,
            new.scale[0],
        )
    scale[k] = new.scale[0]
    doubtful = _check_new_units(ds, labelled[labelled[:, 1] == k], k, ref, scale, known_ref, known_fitted, known_units)
    with torch.no_grad():
        head.ref[:, k] = torch.as_tensor(new.ref[:, 0], dtype=head.ref.dtype)
        head.fitted[:, k] = torch.as_tensor(new.fitted[:, 0])
        head.set_open(k, new.null[0])
        head.set_atomic([k], new.atomic_shift, new.given)
        head.scale[k] = head.scale[0] if energy_scale == "shared" else float(new.scale[0])
        new_elements = new.fitted[:, 0] & ~known_fitted.any(1)
        all_ref = np.concatenate([np.where(known_fitted, known_ref, 0.0), new.ref], axis=1)
        all_fitted = np.concatenate([known_fitted, new.fitted], axis=1)
        prior, loo = shared_estimates_with_error(all_ref, all_fitted)
        head.set_spread([k], loo[[k]])
        if new_elements.any():  # elements only the new fidelity has: the old fidelities' references estimated
            known = np.flatnonzero(np.isfinite(loo[:k]))  # their estimates' error, as _report_estimates says it
            head.set_spread(known, loo[known])
            head.ref[new_elements, :k] = torch.as_tensor(prior[new_elements, :k], dtype=head.ref.dtype)
            _report_estimates(potential.fidelities.names, k, new_elements, loo)
    from multifi.train.preflight import warn_free_atoms_only, warn_given_references

    warn_given_references(potential.fidelities.names[k], np.flatnonzero(new.given[:, 0]).tolist())
    free = np.zeros(len(new.fitted), bool) if new.free_only is None else new.free_only[:, 0]
    warn_free_atoms_only(potential.fidelities.names[k], np.flatnonzero(free).tolist())
    _report_unlabelled(potential.fidelities.names[k], known_fitted.any(1) & ~new.fitted[:, 0] & ~free, loo[k])
    return doubtful


#: new/old energy scale ratios beyond this (either way) make a frozen network a poor start (a trial: 1.8×, 33× the
#: error; 1.4× between ordinary fidelities)
SCALE_APART = 1.5


def _warn_scale_apart(potential, like: int, k: int) -> None:
    """train: embedding keeps the network that fidelity `like` was trained through, whose outputs the new fidelity
    k multiplies by its own energy scale: warn when the two scales lie more than SCALE_APART apart."""
    names, scale = potential.fidelities.names, potential.head.scale
    ratio = float(scale[k] / scale[like])
    if 1 / SCALE_APART <= ratio <= SCALE_APART:
        return
    log.warning(
        "%s: its energy scale (%.3g eV, from its labels) is %.1f× %s than that of %s (%.3g eV), whose network it "
        "reuses frozen (train: embedding): the network's outputs keep %s's proportions; if %s's scale was raised by "
        "isolated atoms or outliers (its training said so), extend with train: head or all, or retrain without them",
        names[k],
        float(scale[k]),
        max(ratio, 1 / ratio),
        "larger" if ratio > 1 else "smaller",
        names[like],
        float(scale[like]),
        names[like],
        names[like],
    )


def _report_unlabelled(name: str, elements: np.ndarray, loo: float) -> None:
    """Old elements (bool [119]) that no label of the new fidelity holds: its references for them are estimated
    from the other fidelities, off by about the estimate's leave-one-out error per atom of them."""
    from ase.data import chemical_symbols

    if not elements.any():
        return
    error = "unknown: no element to leave out" if np.isnan(loo) else f"{loo:.2f} eV per atom"
    log.warning(
        "elements %s have no labels at %s: its reference energies for them are estimated from the other fidelities "
        "(leave-one-out error of that estimate over the elements labelled at both: %s); %s energies of structures "
        "containing them may be off by that much per atom of them",
        ", ".join(chemical_symbols[z] for z in np.flatnonzero(elements)),
        name,
        error,
        name,
    )


def _report_estimates(names, k: int, elements: np.ndarray, loo: np.ndarray) -> None:
    """Say how far off the old fidelities' estimated references of the new elements (bool [119]) may be: the
    leave-one-out error of the estimate at each (elements labelled at it and at the new fidelity k)."""
    from ase.data import chemical_symbols

    symbols = ", ".join(chemical_symbols[z] for z in np.flatnonzero(elements))
    for f, name in enumerate(names[:k]):
        error = "unknown: no element to leave out" if np.isnan(loo[f]) else f"{loo[f]:.2f} eV per atom"
        log.warning(
            "%s: its reference energies of %s are estimated from the %s ones (leave-one-out error of that estimate "
            "over the elements labelled at both: %s); %s energies of structures with %s may be off by that much "
            "per atom of them",
            name,
            symbols,
            names[k],
            error,
            name,
            symbols,
        )


def _forgetting(old, new, old_run: OldRun | None, batch_size: int) -> dict[str, dict]:
    """Per old fidelity: its test metrics (validation if the run had no test split) before and after."""
    if old_run is None:
        return {}
    from multifi.data.neighbors import make_neighbors
    from multifi.train.evaluate import evaluate_pairs

    pairs = old_run.test if len(old_run.test) else old_run.val
    ds = old_run.dataset
    alien = np.add.reduceat(~np.isin(ds.numbers, list(old.elements)), ds.offsets[:-1]) > 0  # [S]
    left_out = int(alien[np.unique(pairs[:, 0])].sum()) if len(pairs) else 0
    pairs = pairs[~alien[pairs[:, 0]]]  # before and after on the same structures: those the old model can predict
    if len(pairs) == 0:
        return {}
    neighbors = make_neighbors(old_run.dataset, old.cutoff, progress=False)
    before = evaluate_pairs(old, old_run.dataset, neighbors, pairs, batch_size)
    after = evaluate_pairs(new, old_run.dataset, neighbors, pairs, batch_size)
    out = {}
    for name in before:
        b, a = before[name], after[name]
        out[name] = {
            "split": "test" if len(old_run.test) else "val",
            "left_out": left_out,  # structures with elements the old model was not trained on
            "before": b,
            "after": a,
            "change": _change(b, a),
        }
    unmeasured = [n for n in old.fidelities.names if n not in out]
    if unmeasured:  # e.g. a fidelity added by an earlier extension, absent from the original run's data
        log.warning(
            "forgetting not measured at %s: %s has no %s labels of these fidelities",
            ", ".join(unmeasured),
            old_run.path,
            "test" if len(old_run.test) else "validation",
        )
    return out


def _change(before: dict, after: dict) -> dict:
    """after − before for every metric of `before` but the counts; nested metric groups (keys.FITTED_ONLY: the
    metrics without structures whose references were estimated) the same way; None where either lacks it."""
    out = {}
    for k, b in before.items():
        a = after.get(k)
        if k in (COUNT, FORCES_COUNT):
            continue
        if isinstance(b, dict):
            out[k] = _change(b, a) if isinstance(a, dict) else None
        else:
            out[k] = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
    return out


def _counts(pairs: np.ndarray, table: FidelityTable) -> dict[str, int]:
    c = np.bincount(pairs[:, 1], minlength=len(table)) if len(pairs) else np.zeros(len(table), np.int64)
    return {n: int(v) for n, v in zip(table.names, c)}


def _count_text(pairs: np.ndarray, table: FidelityTable) -> str:
    return ", ".join(f"{n}={v}" for n, v in _counts(pairs, table).items() if v) or "none"


def _warn_unmeasured(pairs: dict, table: FidelityTable, k: int) -> None:
    """The new fidelity k without validation structures (its error picks no checkpoint) or without test
    structures (its errors are not measured): said before training."""
    for split, consequence in (
        ("val", "its error takes no part in picking the checkpoint"),
        ("test", "its test errors are not measured"),
    ):
        if not (pairs[split][:, 1] == k).any():
            log.warning(
                "%s: no %s structures (%s); give data.split.%s > 0 or a split file",
                table.names[k],
                {"val": "validation", "test": "test"}[split],
                consequence,
                split,
            )


def _card_data(old, x, pairs: dict, table: FidelityTable, replay: dict, old_run) -> dict:
    """Model-card entries: structures per fidelity (old fidelities as the old model recorded them, the new
    one as trained here) and the history of extensions."""
    data = {s: dict(old.spec.get("data", {}).get(s, {})) for s in ("train", "val", "test")}
    for s in data:
        data[s][x.fidelity] = _counts(pairs[s], table)[x.fidelity]
    event = {
        "fidelity": x.fidelity,
        "train": x.train,
        "from": str(x.model),
        "replay": x.replay,
        "replayed": _counts(replay["train"], old_run.dataset.fidelities) if replay else {},
    }
    return {"data": data, "history": [*old.spec.get("history", []), event]}


def _check_elements(old, new_ds: FidelityDataset, name: str, trainable: str, where: str) -> None:
    """Elements new to the model: an error when their atom embeddings would stay frozen at their random start
    (--train embedding/head), else a warning that the old fidelities know nothing of them; old elements absent
    from the new data: a warning that the new fidelity's references for them are not determined."""
    from ase.data import chemical_symbols

    known, seen = set(old.elements), set(new_ds.elements)
    new = ", ".join(chemical_symbols[z] for z in sorted(seen - known))
    if new and trainable != "all":
        raise MultifiError(
            f"{where}: elements {new} of the {name} data are new to the model, and --train {trainable} keeps the atom "
            "embeddings frozen, so theirs would stay random: extend with --train all (and replay), or leave out the "
            "structures containing them"
        )
    if new:
        log.warning(
            "elements %s appear only in the %s data: the old fidelities (%s) have no labels with them; their "
            "reference energies for them are estimated from the %s ones, and their atom environments were learned "
            "from %s labels only: expect larger errors at %s for structures containing them",
            new,
            name,
            ", ".join(old.fidelities.names),
            name,
            name,
            ", ".join(old.fidelities.names),
        )
    # old elements absent from the new data: said where the new fidelity's references are fitted, with the
    # estimate's leave-one-out error (_report_unlabelled)


def extend_from_args(
    config: str | None, overrides: list[str], dry_run: bool = False, resume_dir: str | None = None
) -> Path:
    """Config file (optional) + `key=value` overrides (the command-line flags) → extend; or `resume_dir`: the
    unfinished extension there, with its own config.yaml."""
    if resume_dir is not None:
        if config is not None or overrides:
            raise MultifiError("multifi extend --resume RUN_DIR takes the run's own settings (its config.yaml) only")
        path = Path(resume_dir) / "config.yaml"
        if not path.is_file():
            raise MultifiError(f"{resume_dir}: nothing to resume (no config.yaml: not a multifi run directory)")
        cfg = load_run_config(path)
        cfg.output_dir = str(resume_dir)
        with blamed(str(path), []):
            return extend(cfg, config_source=str(path), dry_run=dry_run, resume=True)
    cfg = load_config(config, overrides)
    if cfg.extend is None:
        raise MultifiError(f"{config or 'multifi extend'}: nothing to extend (give MODEL.pt or an 'extend' section)")
    source = str(config or cfg.extend.model)
    with blamed(source, overrides):
        return extend(cfg, config_source=source, dry_run=dry_run)
