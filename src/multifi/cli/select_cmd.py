"""multifi select MODEL POOL --fidelity NAME --n K --strategy S [--seed N] [--exclude FILE] --out picks.txt"""

from __future__ import annotations

import logging

import numpy as np

from multifi.cli.args import add_force, positive_int

log = logging.getLogger("multifi")


def register(sub):
    from multifi.select import STRATEGIES

    p = sub.add_parser("select", help="choose unlabelled structures to compute next at a fidelity")
    p.add_argument(
        "model",
        help="model.pt or its run directory: structures its run's data labels at the fidelity are never picked "
        "(uncertainty and batch need its LLPR calibration: multifi calibrate)",
    )
    p.add_argument("pool", help="candidate structures (any file ASE reads, labelled or not, or a multifi .npz)")
    p.add_argument("--fidelity", required=True, help="fidelity at which the picks will be computed")
    p.add_argument(
        "--n",
        type=positive_int,
        required=True,
        help="number of structures to pick (all eligible ones, with a warning, when fewer remain)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="batch",
        help="random | uncertainty (largest LLPR σ) | diversity (farthest points in feature space) | "
        "batch (greedy LLPR variance reduction: uncertain and diverse; default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", help="file of structure keys already labelled (one per line)")
    p.add_argument(
        "--out",
        required=True,
        help="picked structure keys, one per line, in pick order; a .extxyz/.xyz(.gz) file gets the picked "
        "structures themselves (keys in info['key']), e.g. for a pool without keys (an existing one: --force)",
    )
    add_force(p)
    p.add_argument("--batch-size", type=int, default=64, help="structures per forward pass (memory, not results)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from multifi.cli.args import is_extxyz_path, refuse_existing
    from multifi.data.checks import geometry_fingerprints
    from multifi.data.dataset import atomic_write
    from multifi.errors import MultifiError
    from multifi.models.registry import load_potential
    from multifi.select import copies_of, first_copies, labelled_mask, read_pool, select_structures, training_anchors
    from multifi.uncertainty import LLPR, llpr_path

    refuse_existing(args.out, force=args.force)
    potential = load_potential(args.model)
    potential.fidelities.index(args.fidelity, where=args.model)
    pool = read_pool(args.pool)
    exclude: list[str] = []
    if args.exclude:
        path = Path(args.exclude)
        if not path.exists():
            raise MultifiError(f"{path}: no such file")
        exclude = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        unknown = sorted(set(exclude) - {str(k) for k in pool.keys})
        named = {str(k).rsplit(":", 1)[-1] for k in pool.keys.tolist()}  # qm9:535 → 535
        if exclude and len(unknown) == len(set(exclude)) and set(unknown) <= named:  # 535 for qm9:535
            raise MultifiError(
                f"{path}: none of its {len(unknown)} keys is a structure of {args.pool} (e.g. {', '.join(unknown[:3])}), "
                f"but they are the ends of the pool's keys, which look like {', '.join(str(k) for k in pool.keys[:2])}"
            )
        if unknown:  # a key of another naming (file:index vs id) excludes nothing: say so, not pick them again
            log.warning(
                "%s: %d of %d keys are no structure of %s (e.g. %s): they exclude nothing",
                path,
                len(unknown),
                len(set(exclude)),
                args.pool,
                ", ".join(unknown[:3]),
            )
    known, known_geometries, run_set = labelled_in_run(args.model, args.fidelity)
    # the run's structures under another key (or none: a geometry hash) are the same structures
    pool_geometries = geometry_fingerprints(pool)
    in_run_mask = np.isin(pool.keys.astype(str), known) | np.isin(pool_geometries, known_geometries)
    if run_set is not None:  # rounded, shifted (molecules also rotated) coordinates of the run's structures
        in_run_mask |= copies_of(run_set, pool)
    exclude += known + [str(k) for k in pool.keys[in_run_mask]]
    copies = first_copies(pool)
    llpr = LLPR.load(llpr_path(args.model), potential) if args.strategy in ("uncertainty", "batch") else None
    anchors = None
    wanted = args.n > 0 and bool((~labelled_mask(pool, args.fidelity, exclude, copies)).any())
    if args.strategy == "diversity" and run_set is not None and wanted:  # (uncertainty, batch: LLPR has the run's data)
        outside = np.flatnonzero(~np.isin(known_geometries, pool_geometries))  # the others are pool rows
        anchors = training_anchors(potential, run_set.subset(outside), args.fidelity, args.batch_size, args.seed)
    picks = select_structures(
        potential,
        pool,
        args.fidelity,
        args.n,
        args.strategy,
        args.seed,
        exclude,
        llpr,
        args.batch_size,
        anchors=anchors,
        copies=copies,
    )
    keys = [str(k) for k in pool.keys[picks]]
    if args.strategy in ("uncertainty", "batch"):
        _warn_outside_geometry(
            potential, pool, picks, ~labelled_mask(pool, args.fidelity, exclude, copies), args.strategy
        )
    out = Path(args.out)
    if is_extxyz_path(out):  # the picked structures themselves (keys in info['key']), ready to compute
        import io

        import ase.io

        from multifi.files import encoded_for

        text = io.StringIO()
        ase.io.write(text, [pool.to_atoms(int(i)) for i in picks], format="extxyz")
        atomic_write(out, lambda f: f.write(encoded_for(out, text.getvalue().encode())))
    else:
        atomic_write(out, lambda f: f.write("".join(k + "\n" for k in keys).encode()))
    eligible = int((~labelled_mask(pool, args.fidelity, exclude, copies)).sum())
    distinct = int((copies == np.arange(len(pool))).sum())  # copies up to translation (or rotation) count once
    in_run = len(np.unique(copies[in_run_mask]))  # distinct structures, as `distinct` counts them
    by_geometry = in_run - len(np.unique(copies[in_run_mask & np.isin(pool.keys.astype(str), known)]))
    matched = f", {by_geometry} of them by geometry, not key" if by_geometry else ""
    print(
        f"picked {len(keys)} of {eligible} eligible structures (of {len(pool)} in the pool, {distinct} distinct by "
        f"geometry; the others labelled at {args.fidelity}, excluded or repeated geometries"
        + (f"; {in_run} labelled at {args.fidelity} in the model's run data{matched}" if in_run else "")
        + f") for {args.fidelity} ({args.strategy}) → {args.out}"
    )
    return 0


def labelled_in_run(model: str, fidelity: str) -> tuple[list[str], np.ndarray, object]:
    """Keys, geometry fingerprints (data.checks.geometry_fingerprints) and the FidelityDataset of the
    structures labelled at `fidelity` in the training data of the run `model` belongs to (its dataset.npz
    beside model.pt); none for a model file without its run."""
    from multifi.data.checks import geometry_fingerprints
    from multifi.data.dataset import FidelityDataset
    from multifi.models.registry import model_file

    cache = model_file(model).parent / "dataset.npz"
    if not cache.exists():  # a model file away from its run: its training structures cannot be left out
        log.warning(
            "%s: no dataset.npz beside the model (not in its run directory): structures it was trained on are "
            "not excluded; list them with --exclude if the pool holds any",
            model,
        )
        return [], np.zeros(0, np.int64), None
    ds = FidelityDataset.load(cache)
    if fidelity not in ds.fidelities:
        return [], np.zeros(0, np.int64), None
    run_set = ds.subset(np.flatnonzero(ds.energy_mask[:, ds.fidelities.index(fidelity)]))
    return [str(k) for k in run_set.keys], geometry_fingerprints(run_set), run_set


def _warn_outside_geometry(potential, pool, picks, eligible, strategy: str) -> None:
    """Say how many eligible structures lie outside the training geometries (select.outside_training_geometry)
    and how many of them were picked: the LLPR σ need not rank stretched or crushed structures high."""
    import numpy as np

    from multifi.select import outside_training_geometry

    outside = outside_training_geometry(potential, pool) & eligible
    if not outside.any():
        return
    picked = int(outside[picks].sum())
    log.warning(
        "%s: %d eligible structures lie outside the training geometries (atoms far closer, or bonds far longer, "
        "than in training; e.g. %s), where the model extrapolates and the LLPR σ need not be high; %s picked %d "
        "of them: inspect them, or use --strategy diversity",
        pool.source or "pool",
        int(outside.sum()),
        ", ".join(str(k) for k in pool.keys[np.flatnonzero(outside)[:3]]),
        strategy,
        picked,
    )
