"""What a run checks and reports before its first step: samples per fidelity and split, the monitored
fidelity and metric, fidelities that would not train or not be measured, reference-energy and scale warnings,
and the plan of a dry run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from ase.data import chemical_symbols

from multifi.config import RunConfig
from multifi.data.dataset import ranges
from multifi.data.stats import MIN_SCALE_DOF, force_rms
from multifi.errors import MultifiError, closest_name
from multifi.keys import FORCES_MAE, STRESS_MAE

log = logging.getLogger("multifi")


def check_monitor(cfg: RunConfig, prep, config_source: str = "") -> None:
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
    check_labels_weighted(cfg, data, trained, config_source)
    name = cfg.train.monitor
    if name is not None and not trained[data.dataset.fidelities.index(name, where="train.monitor")]:
        log.warning(
            "train.monitor: %s does not train (sampling or loss weight 0, or no training labels): the checkpoint "
            "is picked by a fidelity the gradient never sees (trained: %s)",
            name,
            ", ".join(n for n, t in zip(names, trained) if t),
        )


def check_labels_weighted(cfg: RunConfig, data, trained: np.ndarray, config_source: str = "") -> None:
    """Training samples of the `trained` fidelities [K] whose every label has loss weight 0 (loss.energy,
    loss.forces, loss.stress): a one-line error when that is all of them (nothing would be trained), a warning with
    their count otherwise (they add nothing to the gradient, a batch of them alone a step of zero gradient)."""
    ds, pairs = data.dataset, data.pairs["train"]
    s, k = pairs[trained[pairs[:, 1]]].T
    held = {
        "energy": ~np.isnan(ds.energy[s, k]),
        "forces": ds.forces_mask[s, k] if ds.forces_mask is not None else np.zeros(len(s), bool),
        "stress": ds.stress_mask[s, k] if ds.stress_mask is not None else np.zeros(len(s), bool),
    }
    weights = {kind: getattr(cfg.loss, kind) for kind in held}
    weighted = np.zeros(len(s), bool)
    for kind, has in held.items():
        weighted |= has & (weights[kind] > 0)
    if weighted.all():
        return
    zero = [kind for kind, has in held.items() if has[~weighted].any()]
    held_text = ", ".join(f"{kind} of {int(held[kind].sum())}" for kind in held if held[kind].any())
    settings = " and ".join(f"loss.{kind}: 0" for kind in zero)
    if not weighted.any():
        prefix = f"{config_source}: " if config_source else ""
        raise MultifiError(
            f"{prefix}{settings}: the training labels ({held_text} samples) have no weight, so nothing would be trained"
        )
    log.warning(
        "%d of %d training samples hold only labels weighted 0 (%s): they add nothing to the gradient",
        int((~weighted).sum()),
        len(s),
        settings,
    )


def warn_unseen_in_evaluation(prep, potential) -> None:
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


def check_monitored_energies(cfg: RunConfig, prep, head, config_source: str = "") -> None:
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
    warn_unmeasured_energies(prep.dataset, prep.pairs["val"], head, skip={cfg.train.monitor, *untrained(prep)})


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


def split_counts(prep, split: str) -> dict[str, int]:
    names = prep.dataset.fidelities.names
    c = torch.bincount(torch.as_tensor(prep.pairs[split][:, 1]), minlength=len(names)).tolist()
    return {n: int(x) for n, x in zip(names, c)}


def report_data(prep) -> None:
    """Samples per fidelity and split; a warning for each fidelity labelled only outside training."""
    counts = {split: split_counts(prep, split) for split in ("train", "val", "test")}
    for split, c in counts.items():
        log.info("%s: %s", split, ", ".join(f"{k}={v}" for k, v in c.items()))
    for name in untrained(prep):
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


def untrained(prep) -> list[str]:
    """Fidelities of the dataset without a single training sample."""
    return [name for name, n in split_counts(prep, "train").items() if n == 0]


def processes(cfg: RunConfig) -> int:
    """Training processes train.devices starts: a number, or one per listed device id; 'auto' all GPUs (one
    process on CPU, as Lightning's)."""
    import torch

    devices, accelerator = cfg.train.devices, cfg.train.accelerator
    if isinstance(devices, int):
        return devices
    if devices == "auto":
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    return len([d for d in str(devices).split(",") if d.strip()])


def steps_per_epoch(cfg: RunConfig, n_train: int) -> int:
    """Optimiser steps of one epoch over n_train training samples: each of the processes takes its share of them
    (padded to equal shares) in batches of train.batch_size."""
    import math

    return math.ceil(math.ceil(n_train / processes(cfg)) / cfg.train.batch_size)


def _total_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimiser steps the run is set to take over n_train training samples (epochs × steps per epoch, or
    max_steps if fewer)."""
    t = cfg.train
    per_epoch = steps_per_epoch(cfg, n_train)
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


def report_plan(cfg: RunConfig, prep, module, run_dir: Path, ckpt: Path | None, can_start: bool = True) -> None:
    """What a run would do (train --dry-run); `can_start`: False when the run directory blocks it (the error
    that follows says why; no "valid" line before it)."""

    t = cfg.train
    n_params = sum(p.numel() for p in module.potential.parameters())
    steps = steps_per_epoch(cfg, len(prep.pairs["train"]))
    total = _total_steps(cfg, len(prep.pairs["train"]))
    world = processes(cfg)
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
        "training: %d samples, batch %d%s: %s per epoch, %s, at most %s%s",
        len(prep.pairs["train"]),
        t.batch_size,
        f" in each of {world} processes" if world > 1 else "",
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


def warn_given_references(name: str, elements: list[int], labels: str = "training labels") -> None:
    """Fidelity `name` takes given atomic energies as references of `elements` (atomic numbers) without labels."""
    from ase.data import chemical_symbols

    if elements:
        log.warning(
            "%s: no energy labels with %s in the %s; their %s references are their given atomic energies "
            "(data.atomic_energies) plus its shift, and their bonding is learnt at the other fidelities only",
            name,
            ", ".join(chemical_symbols[z] for z in elements),
            labels,
            name,
        )


def warn_free_atoms_only(name: str, elements: list[int]) -> None:
    """Fidelity `name` holds `elements` (atomic numbers) only as free atoms: their references are estimated."""
    from ase.data import chemical_symbols

    if elements:
        symbols = ", ".join(chemical_symbols[z] for z in elements)
        log.warning(
            "%s: its only energy labels with %s are free atoms (one-atom structures): a free atom's energy fits "
            "its reference but says nothing of its bonding, so the %s reference energies of %s are estimated as "
            "for an element without labels (data.atomic_energies: isolated takes free atoms as atomic energies)",
            name,
            symbols,
            name,
            symbols,
        )


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
        if refs.given is not None and name not in skip:
            warn_given_references(name, np.flatnonzero(refs.given[:, k]).tolist(), labels)
        missing = refs.estimated(k)
        free = [] if refs.free_only is None else [z for z in missing if refs.free_only[z, k]]
        if name not in skip:
            warn_free_atoms_only(name, free)
        missing = [z for z in missing if z not in free]
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
        how = f"the other fidelities' references as a shared per-element reference plus a {name} shift smooth in Z"
        log.warning(
            "%s: no energy labels with %s in the %s; their %s reference energies are estimated from %s%s",
            name,
            symbols,
            labels,
            name,
            how,
            error,
        )
