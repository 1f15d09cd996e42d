"""multifi data info SOURCE… | --config CONFIG.yaml; multifi data convert SOURCE… | --config CONFIG.yaml --out FILE.npz"""

from __future__ import annotations

from multifi.cli.args import add_force


def register(sub):
    p = sub.add_parser("data", help="inspect or convert datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    info = dsub.add_parser("info", help="structures, elements and label counts per fidelity")
    _sources(info)
    info.set_defaults(func=run_info)
    conv = dsub.add_parser("convert", help="read and merge sources into one multifi .npz for reuse")
    _sources(conv)
    conv.add_argument(
        "--out",
        required=True,
        help="the .npz (or dataset folder) to write, or an .extxyz/.xyz(.gz): one frame per structure and fidelity "
        "label, info['key'] and info['fidelity'] (an existing one: --force)",
    )
    add_force(conv)
    conv.set_defaults(func=run_convert)


def _sources(p):
    from multifi.cli.args import add_label_keys

    p.add_argument("sources", nargs="*", help="files (extxyz, db, MatPES json/jsonl, .npz) or qm9[:LABELS.csv]")
    p.add_argument(
        "--config",
        help="read the data a run config's data section names, as training reads it (each source with its own "
        "fidelity and label keys, data.fidelities applied), instead of SOURCE files",
    )
    p.add_argument(
        "--fidelity", help="fidelity of structures that name none (a structure naming another one is an error)"
    )
    p.add_argument("--skip-invalid", action="store_true", help="drop NaN/inf labels instead of failing")
    add_label_keys(p)


def _read(args):
    from multifi.data.sources import merge_parts, read_source

    if args.config is not None:
        return _read_config(args)
    return merge_parts([read_source(source, args.skip_invalid) for source in _source_configs(args)])


def _source_configs(args) -> list:
    """The SourceConfigs of the SOURCE arguments (an error without any)."""
    from multifi.cli.args import source_config
    from multifi.errors import MultifiError

    if not args.sources:
        raise MultifiError("multifi data: give SOURCE files (or qm9[:LABELS.csv]), or --config CONFIG.yaml")
    return [source_config(s, args.fidelity, args) for s in args.sources]


def _read_config(args):
    """The data of a run config, read as `multifi train` reads it (its own fidelities and keys per source)."""
    from multifi.data.sources import read_sources
    from multifi.errors import MultifiError
    from multifi.train.run_config import load_any_config

    flags = (("SOURCE", args.sources), ("--fidelity", args.fidelity), ("--energy-key", args.energy_key))
    flags += (
        ("--forces-key", args.forces_key),
        ("--stress-key", args.stress_key),
        ("--fidelity-key", args.fidelity_key),
        ("--stress-order", args.stress_order),
    )
    given = [flag for flag, v in flags if v]
    if given:
        raise MultifiError(
            f"{args.config}: --config reads the config's data.sources; {' and '.join(given)} too is ambiguous"
        )
    data = load_any_config(args.config).data  # a run's config.yaml: as the run read its data
    if not data.sources:
        raise MultifiError(f"{args.config}: data.sources: empty; no data to read")
    from multifi.data.atomic_energies import ISOLATED

    ds = read_sources(data.sources, data.skip_invalid or args.skip_invalid, data.atomic_energies == ISOLATED)
    if data.fidelities is not None:
        ds = ds.select_fidelities(data.fidelities, where=f"{args.config}: data.fidelities")
    return ds


def _read_or_unlabelled(args):
    """The data as training reads it; a single file without any label (e.g. a pool for `multifi select`) as
    its bare structures, instead of the labelled reader's complaint about a missing fidelity."""
    from multifi.errors import MultifiError
    from multifi.select import read_pool

    try:
        return _read(args)
    except MultifiError:
        if args.config is not None or len(args.sources) != 1 or args.fidelity or _any_label(args.sources[0]):
            raise
        try:
            return read_pool(args.sources[0])
        except MultifiError:
            pass
        raise


LABEL_WORDS = ("energy", "forces", "stress", "virial")


def _any_label(path: str) -> bool:
    """Whether any frame ASE reads from `path` carries something that looks like a label (calculator results,
    or info/arrays keys naming an energy, forces, stress or virial); True when ASE cannot read it."""
    from pathlib import Path

    try:
        from multifi.data.readers.ase_files import from_multifi_calculator, read_frames

        for atoms in read_frames(Path(path), ":"):
            if from_multifi_calculator(atoms):
                continue  # a multifi trajectory: its results are no labels, its frames are structures
            if atoms.calc is not None and getattr(atoms.calc, "results", None):
                return True
            keys = [*atoms.info, *atoms.arrays]
            if any(word in key.lower() for key in keys for word in LABEL_WORDS):
                return True
    except Exception:  # noqa: BLE001 - not an ASE file: the labelled reader's error stands
        return True
    return False


def _periodicity(pbc) -> str:
    """'N' periodic structures, with how many are slabs or wires when some are: 'N (3-D a, slabs b, wires c)'."""
    dims = pbc.sum(1)
    n = int((dims > 0).sum())
    parts = [
        f"{what} {int((dims == d).sum())}" for d, what in ((3, "3-D"), (2, "slabs"), (1, "wires")) if (dims == d).any()
    ]
    return f"{n} ({', '.join(parts)})" if (dims == 1).any() or (dims == 2).any() else str(n)


def run_info(args) -> int:
    from ase.data import chemical_symbols

    ds = _read_or_unlabelled(args)
    known = _units_known(args, ds)  # before anything is printed: a name the data lacks is an error
    n_atoms = ds.n_atoms
    print(
        f"structures: {len(ds)}   atoms: {int(n_atoms.sum())} (per structure {n_atoms.min()}–{n_atoms.max()}, "
        f"mean {n_atoms.mean():.1f})   periodic: {_periodicity(ds.pbc)}"
    )
    print("elements:", " ".join(chemical_symbols[z] for z in ds.elements))
    counts = ds.label_counts()
    if not counts:
        print("labels: none (structures only: a pool for `multifi select` or `multifi predict`)", flush=True)
        _check_geometry(ds)
        return 0
    width = max(len("fidelity"), *(len(n) for n in counts)) + 2
    print("fidelity".ljust(width) + "energy".rjust(10) + "forces".rjust(10) + "stress".rjust(10))
    for name, c in counts.items():
        print(name.ljust(width) + "".join(str(c[k]).rjust(10) for k in ("energy", "forces", "stress")))
    multi = int(((ds.energy_mask | ds.has_forces()).sum(1) > 1).sum())
    print(f"structures labelled at more than one fidelity: {multi}", flush=True)  # before the checks' warnings
    _check_geometry(ds)
    _check_labels(ds, known)
    return 0


def _check_geometry(ds) -> None:
    """Atoms closer than 0.1 Å: the error training, evaluate and predict give (data.checks.check_overlaps). A
    neighbour list per structure (~0.1 ms each: 7 s for all of QM9), so `data info` runs it and `data convert`, on
    the large-data path, does not (training checks the converted data with its own neighbour lists)."""
    from multifi.data.checks import MIN_DISTANCE, check_overlaps
    from multifi.data.neighbors import NeighborCache

    check_overlaps(ds, NeighborCache(ds, 10 * MIN_DISTANCE, progress=False))


def _units_known(args, ds) -> list[str]:
    """data.units_known of --config (none without one), each a fidelity of the data (else an error)."""
    if args.config is None:
        return []
    from multifi.train.run_config import load_any_config

    known = load_any_config(args.config).data.units_known
    ds.fidelities.per_index(dict.fromkeys(known, 1.0), 0.0, f"{args.config}: data.units_known")
    return known


def _check_labels(ds, known_units=()) -> None:
    """The unit checks and reference-energy warnings training runs (in the log), on every label of the data (unit
    checks not for the fidelities in `known_units`: a config's data.units_known)."""
    import numpy as np

    from multifi.data.checks import check_repeated_geometries, doubtful_units
    from multifi.data.split import labelled_pairs
    from multifi.data.stats import fit_references
    from multifi.train.preflight import report_references

    check_repeated_geometries(ds)
    pairs = labelled_pairs(ds, np.arange(len(ds)))
    refs = fit_references(ds, pairs)
    doubtful_units(ds, pairs, refs.ref, refs.scale, known_units)
    report_references(refs, ds.fidelities.names, labels="labels of these files")


def run_convert(args) -> int:
    from pathlib import Path

    from multifi.cli.args import is_extxyz_path, refuse_existing
    from multifi.train.run_config import load_any_config

    refuse_existing(args.out, force=args.force, folder_ok=not is_extxyz_path(args.out))  # before reading
    ds = _read(args)
    sources = load_any_config(args.config).data.sources if args.config is not None else _source_configs(args)
    warn_info_not_kept(sources, args.out)
    if is_extxyz_path(args.out):
        frames = write_labelled_extxyz(ds, Path(args.out))
        print(f"wrote {len(ds)} structures, {_fidelities(ds)} as {frames} frames to {args.out}")
        return 0
    path = ds.save(args.out)
    print(f"wrote {len(ds)} structures, {_fidelities(ds)} to {path}")
    return 0


#: frames of each file looked at for per-frame values a converted dataset does not keep
INFO_FRAMES = 1000
#: info keys the readers take in (fidelity, key, labels, MACE's head and weights) or check (charge, spin state)
READ_INFO = {"fidelity", "key", "head", "energy", "free_energy", "stress", "virial", "virials", "ref_fidelity"}
READ_INFO |= {"charge", "total_charge", "spin", "total_spin", "multiplicity", "spin_multiplicity", "predicted_by"}


def warn_info_not_kept(sources, out) -> None:
    """Warn of the per-frame info keys (MACE's config_type, a system name…) of the ASE-readable `sources`
    (SourceConfigs; each file's first INFO_FRAMES frames looked at, read lazily) that the converted dataset `out`
    does not keep: it holds structures, their keys, fidelities and labels (those any source reads from the file)."""
    import itertools
    import logging
    from pathlib import Path

    import ase.io

    from multifi.data.readers.ase_files import MACE_WEIGHTS
    from multifi.data.sources import guess_format

    read: dict[str, set] = {}  # file → the info keys some source reads from it
    for src in sources:
        if src.path is None or src.format not in ("auto", "ase") or guess_format(Path(src.path)) != "ase":
            continue
        keys = {k for k in (src.energy_key, src.forces_key, src.stress_key, src.fidelity_key) if k}
        read.setdefault(src.path, READ_INFO | set(MACE_WEIGHTS.values())).update(keys)
    for path, kept in read.items():
        frames: dict[str, int] = {}
        looked = 0
        try:  # the file was read already: a second look that fails says nothing new
            for atoms in itertools.islice(ase.io.iread(path, index=":"), INFO_FRAMES):
                looked += 1
                for key in atoms.info:
                    if key not in kept:
                        frames[key] = frames.get(key, 0) + 1
        except Exception:  # noqa: BLE001 - ASE raises many kinds
            continue
        if frames:
            logging.getLogger("multifi").warning(
                "%s: info %s of its frames not kept in %s, which holds the structures, their keys, fidelities and "
                "labels (evaluate --group-by %s reads the original file)",
                path,
                ", ".join(f"{k!r} (in {n} of {looked} frames read)" for k, n in frames.items()),
                out,
                next(iter(frames)),
            )


def _fidelities(ds) -> str:
    """'1 fidelity (PBE)', '2 fidelities (PBE, R2SCAN)'."""
    names = ds.fidelities.names
    return f"{len(names)} {'fidelity' if len(names) == 1 else 'fidelities'} ({', '.join(names)})"


def write_labelled_extxyz(ds, path) -> int:
    """The dataset as extxyz, written as it goes (gzip-compressed for .gz): one frame per (structure, fidelity)
    label (energy eV, forces eV/Å, stress eV/Å³ in ASE's sign, as a SinglePointCalculator) with info['key'] and
    info['fidelity'], which multifi reads back as the same structures and labels; a structure without labels as
    one bare frame (a pool's structure: select and predict read it, training refuses unlabelled frames). A key
    that ASE would read back as another value (000123 → 123, T → True) is an error before anything is written.
    Returns the frames written."""
    import gzip
    import io

    import ase.io
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io.extxyz import key_val_str_to_dict

    from multifi.errors import MultifiError
    from multifi.files import atomic_write
    from multifi.predict import label_results

    for key in ds.keys.tolist():
        back = key_val_str_to_dict(f"key={key}" if " " not in key else f'key="{key}"').get("key")
        if str(back) != key:
            raise MultifiError(
                f"{path}: key {key!r} would be read back from extxyz as {back} (ASE reads numbers and T/F as "
                "values): write a saved dataset (.npz) instead, or give such structures keys with letters"
            )
    labels = ds.energy_mask | ds.has_forces() | ds.has_stress()
    frames = 0

    def write(f) -> None:
        nonlocal frames
        stream = gzip.GzipFile(fileobj=f, mode="wb", mtime=0) if path.name.lower().endswith(".gz") else f
        text = io.TextIOWrapper(stream, encoding="utf-8")
        for i in range(len(ds)):
            for k in np.flatnonzero(labels[i]).tolist() or [None]:
                atoms = ds.to_atoms(i)
                if k is not None:
                    results = label_results(ds, i, k)
                    if np.isnan(results["energy"]):  # forces (or stress) without an energy
                        del results["energy"]
                    atoms.calc = SinglePointCalculator(atoms, **results)
                    atoms.info["fidelity"] = ds.fidelities.names[k]
                ase.io.write(text, atoms, format="extxyz")
                frames += 1
        text.flush()
        text.detach()
        if stream is not f:
            stream.close()

    atomic_write(path, write)
    return frames
