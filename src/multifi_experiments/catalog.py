"""What an experiment's data provides: methods (fidelities), labelled structures, and how a run reads them.

Two catalogs share one interface (structures are integer ids; a run's inputs are files of ids or keys):
- LabelCatalog: the shared QM9 folder. QM9's own B3LYP/6-31G(2df,p) energies come from qm9pack; every
  other method is a label table `index,energy_eV` listed in qm9mf/manifest.json (and in the manifests of the
  spec's further `label_folders`, e.g. qm9mf/pool). Methods are read from
  the manifest, never hard-coded, so later releases of the shared folder add methods without code
  changes. Ids are QM9 indices.
- SourceCatalog: the structure files of a spec's `data` section (MatPES, ASE, .npz), merged by
  structure key; ids are positions in the merged dataset, written to run inputs as keys. Each run
  trains on a derived .npz holding exactly its labels (build_subset).

Interface used by the planners: noun, methods(), has(), check(), labelled(), plan_data(), split_keys(),
composition(); and read() for code that evaluates models on the catalog's structures (selection).
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from multifi.data.readers.qm9 import QM9_FIDELITY, load_qm9_geometries, read_label_table
from multifi.data.stats import N_ELEMENTS
from multifi.errors import MultifiError, unknown_name

QM9MF = "qm9mf"
log = logging.getLogger("multifi.experiments")


class LabelCatalog:
    """QM9 label tables listed in the manifests of one or more folders of the shared data (default `qm9mf`;
    e.g. also `qm9mf/pool`, labels on molecules outside the blocks). A method listed in several folders has
    the union of their molecules (a molecule labelled in two tables is an error)."""

    noun = "molecules"

    def __init__(self, shared: Path, folders: list[str] = (QM9MF,)):
        self.shared = Path(shared)
        self.folder = self.shared / folders[0]
        self.files: dict[str, list[Path]] = {}  # method → its label tables (paths relative to `shared`)
        for folder in folders:
            manifest = self.shared / folder / "manifest.json"
            if not manifest.is_file():
                if folder != QM9MF:
                    raise MultifiError(f"{manifest}: no such file (label_folders of the spec)")
                continue
            try:
                for entry in json.loads(manifest.read_text())["files"]:
                    self.files.setdefault(str(entry["fidelity"]), []).append(Path(folder) / str(entry["file"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise MultifiError(f"{manifest}: malformed manifest ({type(exc).__name__}: {exc})") from None

    def methods(self) -> list[str]:
        """Every method with labels: QM9's own, then the manifests' (files that exist)."""
        return [QM9_FIDELITY] + [m for m, fs in self.files.items() if any((self.shared / f).is_file() for f in fs)]

    def has(self, method: str) -> bool:
        return method in self.methods()

    def check(self, method: str, where: str) -> None:
        if not self.has(method) and method in self.files:  # listed in a manifest, its table not in this copy
            missing = ", ".join(str(self.shared / f) for f in self.files[method])
            raise MultifiError(
                f"{where}: method {method!r} is listed in the manifest but its label table is not there ({missing}): "
                "a later release of the shared data, or an incomplete copy"
            )
        if not self.has(method):
            folders = ", ".join(sorted({str(self.shared / f.parent) for fs in self.files.values() for f in fs}))
            raise unknown_name("method", method, self.methods(), f"{where} (labels in {folders or self.folder})")

    def tables(self, method: str) -> list[Path]:
        """The label tables of `method` that exist (empty for QM9's own, which comes from qm9pack)."""
        if method == QM9_FIDELITY:
            return []
        self.check(method, "labels")
        return [self.shared / f for f in self.files[method] if (self.shared / f).is_file()]

    def source(self, method: str, indices: str, table: Path | None = None) -> dict:
        """A `data.sources` entry (template: {shared} is the shared-data folder) for `method` on `indices`,
        read from `table` (default: the method's only table)."""
        if method == QM9_FIDELITY:
            labels = None
        else:
            table = table or self.table_of(method)
            labels = "{shared}/" + table.relative_to(self.shared).as_posix()
        return {"qm9": {"labels": labels, "fidelity": method, "indices": indices}}

    def labelled(self, method: str) -> np.ndarray:
        """Sorted QM9 indices labelled at `method`."""
        return self._table(method)[0]

    def plan_data(self, sources: list[tuple[str, np.ndarray]]) -> tuple[dict, list[dict], list[dict]]:
        """Run inputs for (method, QM9 indices) label sets: (files, data.sources templates, derived datasets).
        A method with several tables gets one source per table, each with the molecules that table labels."""
        files, data_sources = {}, []
        for i, (method, ids) in enumerate(sources):
            tables = self.tables(method)
            if len(tables) <= 1:
                files[f"source{i}.idx"] = sorted(int(x) for x in ids)
                data_sources.append(self.source(method, "{inputs}/" + f"source{i}.idx"))
                continue
            ids = np.asarray(ids, dtype=np.int64)
            for j, table in enumerate(tables):
                part = ids[np.isin(ids, _read_table(str(table), method)[0])]
                if len(part):
                    files[f"source{i}_{j}.idx"] = sorted(int(x) for x in part)
                    data_sources.append(self.source(method, "{inputs}/" + f"source{i}_{j}.idx", table))

        return files, data_sources, []

    def split_keys(self, ids) -> list[int]:
        """A split's entry in a plan's files: QM9 indices (written as keys qm9:<index>)."""
        return sorted(int(x) for x in ids)

    def composition(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), 119] element counts of the molecules `ids`."""
        geo = load_qm9_geometries()
        rows = np.searchsorted(geo.index, np.asarray(ids, dtype=np.int64))
        return _counts(geo.numbers, geo.offsets, rows)

    def read(self, method: str, ids: np.ndarray):
        """The molecules `ids` (QM9 indices, in that order) with their `method` energies, keys qm9:<index>."""
        from multifi.data.readers.qm9 import read_qm9

        ids = np.asarray(ids, dtype=np.int64)
        labels = None if method == QM9_FIDELITY else self.table_of(method)
        ds = read_qm9(labels=labels, fidelity=method, indices=ids)
        return _in_order(ds, [f"qm9:{int(i)}" for i in ids], f"labels of {method}")

    def labels_digest(self, methods: list[str], indices: np.ndarray) -> str:
        """A hash of the labels of QM9 `indices` at `methods` (their values, NaN where unlabelled): what a run read,
        whatever else its tables hold (a release that adds molecules to a table keeps the hash of those it had)."""
        h = hashlib.sha1()
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        for method in sorted(set(methods)):
            h.update(method.encode() + b"\0")
            h.update(np.ascontiguousarray(self.energies(method, indices), dtype=np.float64).tobytes())
        h.update(indices.tobytes())
        return h.hexdigest()[:16]

    def energies(self, method: str, indices: np.ndarray) -> np.ndarray:
        """[n] eV at `method` for QM9 `indices` (NaN where unlabelled)."""
        idx, energy = self._table(method)
        indices = np.asarray(indices, dtype=np.int64)
        pos = np.clip(np.searchsorted(idx, indices), 0, max(len(idx) - 1, 0))
        found = (idx[pos] == indices) if len(idx) else np.zeros(len(indices), bool)
        return np.where(found, energy[pos] if len(idx) else np.nan, np.nan)

    def table_of(self, method: str) -> Path:
        """The one label table of `method` (an error when it has several)."""
        tables = self.tables(method)
        if len(tables) != 1:
            raise MultifiError(
                f"labels of {method}: {len(tables)} tables ({', '.join(map(str, tables))}); expected one"
            )
        return tables[0]

    def _table(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        self.check(method, "labels")
        if method == QM9_FIDELITY:
            geo = load_qm9_geometries()
            return geo.index, geo.energy
        return _merged_tables(tuple(str(t) for t in self.tables(method)), method)


@lru_cache(maxsize=16)
def _merged_tables(paths: tuple[str, ...], method: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted QM9 indices, eV) of the union of `method`'s tables; a molecule in two tables is an error."""
    parts = [_read_table(p, method) for p in paths]
    if len(parts) == 1:
        return parts[0]
    idx = np.concatenate([p[0] for p in parts])
    energy = np.concatenate([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")
    idx, energy = idx[order], energy[order]
    twice = idx[1:][idx[1:] == idx[:-1]]
    if len(twice):
        raise MultifiError(
            f"labels of {method}: molecule {int(twice[0])} is labelled in more than one of {', '.join(paths)}"
        )
    return idx, energy


@lru_cache(maxsize=16)
def _read_table(path: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    t = read_label_table(path, method)
    return t.index, t.energy


def read_blocks(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """blocks.json → (methods in the file's order, method → QM9 indices of its block)."""
    from multifi.data.readers.qm9 import read_qm9_blocks

    blocks = read_qm9_blocks(path)
    try:
        order = [str(m) for m in json.loads(Path(path).read_text()).get("methods", list(blocks))]
    except (ValueError, AttributeError):
        order = list(blocks)
    order = [m for m in order if m in blocks] + [m for m in blocks if m not in order]
    return order, blocks


# ---------------------------------------------------------------------------------------------- structure files
class SourceCatalog:
    """The structure files of a spec's `data` section, merged by key (e.g. matpes:<id>): one dataset.

    Read once when the runs are planned and cached as <work>/data/<fingerprint>.npz (the fingerprint
    hashes the files' contents and the source settings), which the runs' derived datasets are cut from;
    `write_cache=False` (experiment status) reads the files without writing the cache.
    """

    noun = "structures"

    def __init__(self, data, shared: Path, root: Path, work: Path, write_cache: bool = True):
        from multifi_experiments.plan import fill

        self.sources = []
        for s in data.sources:
            path = Path(fill(s.path, {"shared": str(shared)})).expanduser()
            path = path if path.is_absolute() else root / path
            self.sources.append(
                {
                    "path": str(path.resolve()),
                    "fidelity": s.fidelity,
                    "format": s.format,
                    "index": s.index,
                    "stress_order": s.stress_order,
                }
            )
        self.skip_invalid = data.skip_invalid
        self.work = Path(work)
        self.write_cache = write_cache
        self._ds = None
        self._fingerprint: str | None = None
        self._id_of: dict | None = None

    def __getstate__(self):  # runs in other processes reload the cached .npz instead of pickling the data
        state = dict(self.__dict__)
        state.update(_ds=None, _id_of=None)
        return state

    # ------------------------------------------------------------------ data
    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha1()
            for s in self.sources:
                path = Path(s["path"])
                if not path.is_file():
                    raise MultifiError(f"data.sources: {path}: no such file")
                h.update(json.dumps(_fingerprinted(s), sort_keys=True).encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
            h.update(str(self.skip_invalid).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def cache_path(self) -> Path:
        return self.work / "data" / f"{self.fingerprint}.npz"

    def dataset(self):
        """The merged dataset of all sources (read once, then from the cache file)."""
        if self._ds is None:
            from multifi.config import SourceConfig
            from multifi.data.dataset import FidelityDataset
            from multifi.data.sources import read_sources

            if self.cache_path.exists():
                self._ds = FidelityDataset.load(self.cache_path)
            else:
                configs = [SourceConfig(**s) for s in self.sources]
                self._ds = read_sources(configs, self.skip_invalid)
                if not self.write_cache:
                    return self._ds
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                self._ds.save(self.cache_path)
                log.info(
                    "data: %d structures, %s (cached in %s)",
                    len(self._ds),
                    ", ".join(f"{k} {v['energy']}" for k, v in self._ds.label_counts().items()),
                    self.cache_path,
                )
        return self._ds

    # ------------------------------------------------------------------ catalog interface
    def methods(self) -> list[str]:
        return list(self.dataset().fidelities.names)

    def has(self, method: str) -> bool:
        return method in self.methods()

    def check(self, method: str, where: str) -> None:
        if not self.has(method):
            raise unknown_name("method", method, self.methods(), f"{where} (fidelities of data.sources)")

    def labelled(self, method: str) -> np.ndarray:
        """Ids (positions in the merged dataset) of the structures with an energy label at `method`."""
        self.check(method, "labels")
        ds = self.dataset()
        return np.flatnonzero(ds.energy_mask[:, ds.fidelities.index(method)]).astype(np.int64)

    def keys(self, ids) -> list[str]:
        keys = self.dataset().keys
        return [str(keys[int(i)]) for i in sorted(int(x) for x in ids)]

    def split_keys(self, ids) -> list[str]:
        """A split's entry in a plan's files: the structure keys, in id order."""
        return self.keys(ids)

    def plan_data(self, sources: list[tuple[str, np.ndarray]]) -> tuple[dict, list[dict], list[dict]]:
        """Run inputs for (method, ids) label sets: key files, one derived .npz with exactly those labels."""
        files, labels = {}, {}
        for i, (method, ids) in enumerate(sources):
            name = f"source{i}.keys"
            files[name] = self.keys(ids)
            labels.setdefault(method, []).append(name)
        derived = [{"kind": "subset", "path": "{inputs}/data.npz", "labels": labels, "data": self.fingerprint}]
        return files, [{"path": "{inputs}/data.npz", "format": "npz"}], derived

    def composition(self, ids: np.ndarray) -> np.ndarray:
        ds = self.dataset()
        return _counts(ds.numbers, ds.offsets, np.asarray(ids, dtype=np.int64))

    def read(self, method: str, ids: np.ndarray):
        """The structures `ids` (in that order) with the labels of `method` only (energy, forces, stress)."""
        self.check(method, "labels")
        return self.dataset().subset(np.asarray(ids, dtype=np.int64)).select_fidelities([method])

    def build_subset(self, spec: dict, inputs: Path, out: Path) -> None:
        """Write the run's dataset: the structures of its key files, each with the labels of its method only."""
        if spec.get("data") != self.fingerprint:
            raise MultifiError(
                f"{out}: planned for data {spec.get('data')}, but data.sources are now {self.fingerprint}"
            )
        ds = self.dataset()
        if self._id_of is None:
            self._id_of = {str(k): i for i, k in enumerate(ds.keys.tolist())}
        wanted: dict[str, np.ndarray] = {}
        for method, names in spec["labels"].items():
            keys = [line for name in names for line in (inputs / name).read_text().split()]
            try:
                wanted[method] = np.array([self._id_of[k] for k in keys], dtype=np.int64)
            except KeyError as exc:
                raise MultifiError(f"{inputs}: structure {exc.args[0]!r} is not in data.sources") from None
        ids = np.unique(np.concatenate(list(wanted.values())))
        sub = ds.subset(ids).select_fidelities(list(wanted), where="experiment data")
        for k, method in enumerate(wanted):
            drop = ~np.isin(ids, wanted[method])
            sub.energy[drop, k] = np.nan
            if sub.forces_mask is not None:
                sub.forces_mask[drop, k] = False
            if sub.stress_mask is not None:
                sub.stress_mask[drop, k] = False
        sub.save(out)


def _in_order(ds, keys: list[str], where: str):
    """`ds` with its rows in the order of `keys` (every key must be in it)."""
    if ds.keys.astype(str).tolist() == keys:
        return ds
    row_of = {str(k): i for i, k in enumerate(ds.keys.tolist())}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise MultifiError(f"{where}: {missing[0]} is not labelled ({len(missing)} such structures)")
    return ds.subset(np.array([row_of[k] for k in keys], dtype=np.int64))


def _counts(numbers: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), 119] element counts of structures `rows` of a columnar (numbers, offsets) layout."""
    from multifi.data.dataset import ranges

    n = offsets[rows + 1] - offsets[rows]
    atoms = ranges(offsets[rows], n)
    out = np.zeros((len(rows), N_ELEMENTS), np.int64)
    np.add.at(out, (np.repeat(np.arange(len(rows)), n), numbers[atoms].astype(np.int64)), 1)
    return out


def make_catalog(spec, paths, write_cache: bool = True):
    """The catalog of a spec: its `data` section's files, else the shared QM9 folder."""
    if spec.data is not None:
        return SourceCatalog(spec.data, paths.shared, paths.root, paths.work, write_cache)
    return LabelCatalog(paths.shared, spec.label_folders)


def _fingerprinted(source: dict) -> dict:
    """A source's settings as its data's fingerprint holds them: not its path (a moved file is the same data); the
    stress order only for MatPES files read in MatPES's order (the way they are read since the setting exists:
    other files ignore it, and VASP's order is how MatPES files were read before, so that experiments planned then
    keep their fingerprint)."""
    from multifi.data.sources import guess_format

    fmt = source["format"] if source["format"] != "auto" else guess_format(Path(source["path"]))
    kept = fmt == "matpes" and source["stress_order"] != "vasp"
    return {k: v for k, v in source.items() if k != "path" and (k != "stress_order" or kept)}
