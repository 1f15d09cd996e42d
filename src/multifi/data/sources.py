"""Read the configured sources and merge them into one FidelityDataset."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from multifi.data.dataset import FidelityDataset
from multifi.data.fidelity import alike_names, one_letter_apart
from multifi.data.same_geometry import MERGE_TOLERANCE
from multifi.errors import MultifiError
from multifi.files import reported

log = logging.getLogger("multifi")

MATPES_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def read_source(src, skip_invalid: bool = False, free_atoms: bool = False) -> FidelityDataset:
    """One SourceConfig (or a plain path string) → FidelityDataset. `free_atoms`: keep free atoms' energies that
    MACE's per-frame weights set to 0 (its E0 frames), for data.atomic_energies: isolated."""
    if isinstance(src, (str, Path)):
        from multifi.config import SourceConfig

        src = SourceConfig(path=str(src))
    if src.qm9 is not None:
        from multifi.data.readers.qm9 import read_qm9

        q = src.qm9
        indices = _read_indices(q.indices) if q.indices else None
        return read_qm9(
            labels=q.labels,
            fidelity=q.fidelity or src.fidelity,
            limit=q.limit,
            indices=indices,
            seed=q.seed,
            skip_invalid=skip_invalid,
            indices_source=str(q.indices) if q.indices else "indices",
        )
    path = Path(src.path)
    if not path.exists():
        raise MultifiError(f"{path}: no such file")
    fmt = src.format if src.format != "auto" else guess_format(path)
    if fmt == "ase" and path.name.lower().endswith((".csv", ".csv.gz")):
        raise MultifiError(
            f"{path}: a label table, not a structure file; it labels QM9 molecules: on the command "
            f"line give it as qm9:{path}, in a config as '- qm9: {{labels: {path}}}'"
        )
    keys = {"energy": src.energy_key, "forces": src.forces_key, "stress": src.stress_key}
    keys = {k: v for k, v in keys.items() if v is not None}  # the labels named (read_ase: what that means)
    custom = [f"{k}_key" for k, v in keys.items() if v != k]
    if custom and fmt != "ase":
        raise MultifiError(f"{path}: {', '.join(custom)} applies to files ASE reads, not to {fmt} files")
    if src.stress_order != "voigt" and fmt != "matpes":  # ASE files and datasets store 3×3 or ASE's Voigt order
        raise MultifiError(f"{path}: stress_order applies to MatPES records, not to {fmt} files")
    if src.fidelity_key not in (None, "fidelity") and fmt != "ase":
        raise MultifiError(f"{path}: fidelity_key applies to files ASE reads, not to {fmt} files")
    if src.index != ":" and fmt != "ase":  # else every structure would be read, silently
        raise MultifiError(f"{path}: index {src.index!r} picks frames of files ASE reads, not of {fmt} files")
    if fmt == "npz":
        ds = FidelityDataset.load(path)
        if src.fidelity is not None:
            raise MultifiError(
                f"{path}: a saved dataset carries its own fidelities; remove 'fidelity' from this source"
            )
        return ds
    if fmt == "matpes":
        from multifi.data.readers.matpes import read_matpes

        return read_matpes(
            path,
            fidelity=src.fidelity,
            skip_invalid=skip_invalid,
            stress_order=src.stress_order,
            order_chosen="stress_order" in src.model_fields_set,
        )
    from multifi.data.readers.ase_files import read_ase

    return read_ase(
        path,
        fidelity=src.fidelity,
        index=src.index,
        skip_invalid=skip_invalid,
        keys=keys,
        fidelity_key=src.fidelity_key,
        free_atoms=free_atoms,
    )


def guess_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".npz") or (path / "multifi_dataset.json").exists():
        return "npz"
    if name.endswith(MATPES_SUFFIXES):
        return "ase" if _is_ase_json_db(path) else "matpes"
    return "ase"


def fidelity_field(source: str | Path | None) -> str:
    """Where a data file names each structure's fidelity, for messages: a MatPES record's 'functional', else an
    ASE frame's info['fidelity']."""
    if source and guess_format(Path(str(source).split(", ")[0])) == "matpes":
        return "each record's 'functional'"
    return "the file's info['fidelity']"


def check_given_fidelity(names: list[str], fidelity: str, files: list[str], action: str) -> None:
    """--fidelity FIDELITY for data whose structures carry the fidelities `names`: an error naming the files when
    none is FIDELITY (--fidelity applies only to structures that name none). `action`: what dropping it does."""
    if fidelity in names:
        return
    where = ", ".join(str(f) for f in files)
    alike = [b for a, b in alike_names([fidelity, *names]) if a == fidelity]
    if alike:
        raise MultifiError(
            f"{where}: its structures name fidelity {alike[0]!r}, equal up to case or spaces to --fidelity "
            f"{fidelity!r}, but a name the data gives is used as written (--fidelity applies only to structures that "
            f"name none): write {fidelity!r} into {fidelity_field(files[0])}"
        )
    raise MultifiError(
        f"{where}: no labels at {fidelity!r}: its structures name their own fidelity ({', '.join(names)}), and "
        f"--fidelity applies only to structures that name none; drop --fidelity to {action}"
    )


def _is_ase_json_db(path: Path) -> bool:
    """An ASE database written as .json (`{"1": {"cell": …`, rows keyed by id), not MatPES records."""
    import gzip
    import re

    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rt") as f:
            head = f.read(64)
    except (OSError, EOFError, UnicodeDecodeError):
        return False
    return re.match(r'\s*\{\s*"\d+"\s*:\s*\{', head) is not None


def is_qm9_text(text: str) -> bool:
    """Whether a command-line source names QM9 (`qm9`, `qm9:LABELS.csv`) rather than a file."""
    return text == "qm9" or text.startswith("qm9:")


def source_from_text(text: str, fidelity: str | None = None, index: str = ":", **keys):
    """A SourceConfig from a source named on the command line: a file, `qm9` (QM9's own B3LYP energies) or
    `qm9:LABELS.csv`, as in a config's data.sources; `keys`: energy_key / forces_key / stress_key of a file;
    `index`: its frames, as ASE's index (files ASE reads only)."""
    from multifi.config import SourceConfig
    from multifi.validation import validate

    if index != ":" and (is_qm9_text(text) or guess_format(Path(text)) != "ase"):
        raise MultifiError(f"{text}: --index {index} picks frames of files ASE reads, not of this source")
    if is_qm9_text(text):
        raw = {"qm9": {"labels": text[4:] or None, "fidelity": fidelity}}
    else:
        raw = {"path": text, "fidelity": fidelity, "index": index, **{k: v for k, v in keys.items() if v}}
    return validate(SourceConfig, raw, text)  # a bad fidelity name or index is a one-line error


def read_labelled(
    text: str, fidelity: str | None = None, skip_invalid: bool = False, index: str = ":", **keys
) -> FidelityDataset:
    """Labelled data named on the command line, with the fidelities it names per structure; `fidelity` only
    for structures naming none (and for a QM9 label table without a manifest); `index`: ASE's frame index."""
    if is_qm9_text(text):
        try:
            return read_source(source_from_text(text, index=index), skip_invalid)
        except MultifiError:
            if fidelity is None:
                raise
            return read_source(source_from_text(text, fidelity, index=index), skip_invalid)
    try:
        return read_source(source_from_text(text, None, index, **keys), skip_invalid)
    except MultifiError:
        if fidelity is None or guess_format(Path(text)) == "npz":
            raise
        return read_source(source_from_text(text, fidelity, index, **keys), skip_invalid)  # fails again unless missing


def read_sources(sources, skip_invalid: bool = False, free_atoms: bool = False) -> FidelityDataset:
    """All sources merged (structures with equal keys share one entry); `free_atoms` as read_source."""
    parts = [read_source(s, skip_invalid, free_atoms) for s in sources]
    if len(parts) == 1 and _is_saved_dataset(sources[0]):
        report_dropped(parts)
        return parts[0].drop_fidelities_without_labels()  # already merged when saved; keeps memory maps
    return merge_parts(parts).drop_fidelities_without_labels()


def merge_parts(parts) -> FidelityDataset:
    """The sources' datasets merged (structures with equal keys share one entry, also within one source), with
    what reading dropped and what merging counted once in the log."""
    report_dropped(parts)
    warn_disagreeing_sources(parts)
    ds = FidelityDataset.merge(parts)
    report_repeats(parts, ds)
    holders = {
        name: ", ".join(dict.fromkeys(p.source for p in parts if p.source and name in p.fidelities.names))
        for name in ds.fidelities.names
    }
    files = ", ".join(sorted({p.source for p in parts if p.source})) or "data"
    ds.label_sources = {name: text for name, text in holders.items() if text}
    warn_alike_names(ds.fidelities.names, files, ds.label_sources)
    return ds


#: eV per atom; two sources of one fidelity whose energies differ on average by more than this (and than
#: DISAGREE_SPREADS × the fit's own residual) after per-element references hold another method's labels
DISAGREE_EV_PER_ATOM = 0.1
DISAGREE_SPREADS = 5.0


def warn_disagreeing_sources(parts, max_structures: int = 5000) -> None:
    """Warn when the labels one fidelity has in two sources disagree systematically: per-element reference
    energies fitted to one source's totals predict the other's off by a mean per-atom offset far beyond the
    fit's residual (e.g. GFN1-xTB labels added under the name GFN2-xTB: ~1 eV/atom; halves of one method's
    labels: a few meV/atom). At most `max_structures` structures of each source are looked at."""
    from multifi.data.stats import composition_matrix

    by_name: dict[str, list] = {}
    for part in parts:
        for k, name in enumerate(part.fidelities.names):
            s = np.flatnonzero(part.energy_mask[:, k])
            if len(s) >= 20:
                s = s[:: max(1, len(s) // max_structures)]
                elements, counts = composition_matrix(part.subset(s))
                n = part.n_atoms[s].astype(np.float64)
                by_name.setdefault(name, []).append((part.source or "data", elements, counts, part.energy[s, k], n))
    for name, fits in by_name.items():
        for a_src, a_el, a_counts, a_e, a_n in fits:
            a_counts = a_counts.astype(np.float64)
            ref, _, a_rank, _ = np.linalg.lstsq(a_counts, a_e, rcond=None)
            spread = float(np.sqrt(np.mean(((a_counts @ ref - a_e) / a_n) ** 2)))
            for b_src, b_el, b_counts, b_e, b_n in fits:
                if b_src == a_src or not np.isin(b_el, a_el).all():
                    continue
                cols = np.searchsorted(a_el, b_el)
                b_full = np.zeros((len(b_counts), len(a_el)))
                b_full[:, cols] = b_counts
                if np.linalg.matrix_rank(np.vstack([a_counts, b_full])) > a_rank:
                    continue  # A's compositions (one molecule's trajectory: rank 1) do not fix B's references
                offset = float(np.mean((b_e - b_counts @ ref[cols]) / b_n))
                if abs(offset) > max(DISAGREE_EV_PER_ATOM, DISAGREE_SPREADS * spread):
                    log.warning(
                        "%s and %s: their %r energies differ by %+.2f eV/atom on average after per-element "
                        "references (the fit's own residual: %.3f eV/atom): another method's labels under this name?",
                        a_src,
                        b_src,
                        name,
                        offset,
                        spread,
                    )
                    return


def warn_alike_names(names, where: str, sources: dict[str, str] | None = None) -> None:
    """Warn about fidelity names equal up to case and spaces, or one letter apart (a typo?): kept as separate
    fidelities, as written. `sources`: the files holding each name, named instead of `where` when given."""
    for pairs, why in (
        (alike_names(names), "differ only in case or spaces: they are two fidelities"),
        (
            one_letter_apart(names),
            "are one letter apart: a typo? They are two fidelities, and labels under the misspelt name do not "
            "train the other",
        ),
    ):
        for a, b in pairs:
            log.warning("%s%s", _naming(a, b, where, sources or {}), why)


def _naming(a: str, b: str, where: str, sources: dict[str, str]) -> str:
    """'file: fidelities 'a' and 'b' ' where one file (or `where`) holds both, else each name with its files."""
    if sources.get(a, where) == sources.get(b, where):
        return f"{sources.get(a, where)}: fidelities {a!r} and {b!r} "
    return f"fidelities {a!r} ({sources.get(a, where)}) and {b!r} ({sources.get(b, where)}) "


def report_repeats(parts, merged) -> None:
    """Warn when frames repeat a label of the same structure and fidelity (same key, or the same geometry where
    frames have no key) with the same value: merged counts it once (a different value is merge's error)."""
    given = sum(int((p.energy_mask | p.has_forces()).sum()) for p in parts)
    repeated = given - int((merged.energy_mask | merged.has_forces()).sum())
    frames = sum(len(p) for p in parts)
    if frames > len(merged) and not repeated:  # labels at several fidelities of one structure, or bare copies
        log.info(
            "%d frames are %d structures (frames of one key, or without keys of one geometry within %g Å, are one "
            "structure with all their labels)",
            frames,
            len(merged),
            MERGE_TOLERANCE,
        )
    if repeated:
        log.warning(
            "%s: %d repeated labels (the same structure at the same fidelity, by key or, where frames have no key, "
            "by geometry, with the same value): each counted once (%d structures from %d frames)",
            ", ".join(_sources_repeating(parts)) or "data",
            repeated,
            len(merged),
            sum(len(p) for p in parts),
        )


def _sources_repeating(parts) -> list[str]:
    """The sources holding a (structure key, fidelity) label that some source, this one or another, holds again
    (array operations: data sets of 10⁵ structures and several fidelities)."""
    names = {n: i for i, n in enumerate(dict.fromkeys(n for p in parts for n in p.fidelities.names))}
    keys, fids, owner = [], [], []
    for j, part in enumerate(parts):
        s, k = np.nonzero(part.energy_mask | part.has_forces())
        keys.append(np.asarray(part.keys, dtype=str)[s])
        fids.append(np.array([names[n] for n in part.fidelities.names], dtype=np.int64)[k])
        owner.append(np.full(len(s), j))
    _, key_code = np.unique(np.concatenate(keys), return_inverse=True)
    label = key_code.astype(np.int64) * len(names) + np.concatenate(fids)
    _, inverse, counts = np.unique(label, return_inverse=True, return_counts=True)
    repeating = np.unique(np.concatenate(owner)[counts[inverse] > 1])
    return sorted({parts[j].source for j in repeating.tolist() if parts[j].source})


def report_dropped(parts) -> None:
    """Log, per source, how many non-finite labels `skip_invalid` dropped."""
    for part in parts:
        if getattr(part, "n_dropped", 0):
            log.warning(
                "%s: skipped %d non-finite (NaN/inf) labels; other labels of the same structures (e.g. the energy "
                "beside NaN forces) are kept: remove those frames if the whole calculation failed",
                part.source,
                part.n_dropped,
            )


def _is_saved_dataset(src) -> bool:
    path = getattr(src, "path", src)
    if path is None:
        return False
    fmt = getattr(src, "format", "auto")
    return fmt == "npz" or (fmt == "auto" and guess_format(Path(path)) == "npz")


def _read_indices(path) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise MultifiError(f"{p}: no such index file")
    with reported(p, "read"):
        lines = [line.split("#", 1)[0] for line in p.read_text().splitlines()]
    words = [w for line in lines for w in line.replace(",", " ").split()]
    if not words:
        raise MultifiError(f"{p}: no indices in the file (one QM9 index per line; # starts a comment)")
    bad = next((w for w in words if not re.fullmatch(r"[+-]?\d+", w)), None)
    if bad is not None:
        raise MultifiError(f"{p}: {bad!r} is not an integer index (one QM9 index per line; # starts a comment)")
    out = np.asarray([int(w) for w in words], dtype=np.int64)
    repeated = len(out) - len(np.unique(out))
    if repeated:
        log.warning("%s: %d index(es) listed more than once; each molecule is used once", p, repeated)
    return out
