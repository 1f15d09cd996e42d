"""What the shared QM9 data provides: methods (fidelities), their label files, labelled molecules, energies.

QM9's own B3LYP/6-31G(2df,p) energies come from qm9pack; every other method is a label table
`index,energy_eV` listed in qm9mf/manifest.json. Methods are read from the manifest, never hard-coded,
so later releases of the shared folder add methods without code changes.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from multifi.data.readers.qm9 import QM9_FIDELITY, load_qm9_geometries, read_label_table
from multifi.errors import MultifiError, unknown_name

QM9MF = "qm9mf"


class LabelCatalog:
    def __init__(self, shared: Path):
        self.shared = Path(shared)
        self.folder = self.shared / QM9MF
        self.files: dict[str, str] = {}  # method → file name in qm9mf/
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            try:
                for entry in json.loads(manifest.read_text())["files"]:
                    self.files[str(entry["fidelity"])] = str(entry["file"])
            except (ValueError, KeyError, TypeError) as exc:
                raise MultifiError(f"{manifest}: malformed manifest ({type(exc).__name__}: {exc})") from None

    def methods(self) -> list[str]:
        """Every method with labels: QM9's own, then the manifest's (files that exist)."""
        return [QM9_FIDELITY] + [m for m, f in self.files.items() if (self.folder / f).is_file()]

    def has(self, method: str) -> bool:
        return method in self.methods()

    def check(self, method: str, where: str) -> None:
        if not self.has(method):
            raise unknown_name("method", method, self.methods(), f"{where} (labels in {self.folder})")

    def source(self, method: str, indices: str) -> dict:
        """A `data.sources` entry (template: {shared} is the shared-data folder) for `method` on `indices`."""
        labels = None if method == QM9_FIDELITY else "{shared}/" + f"{QM9MF}/{self.files[method]}"
        return {"qm9": {"labels": labels, "fidelity": method, "indices": indices}}

    def labelled(self, method: str) -> np.ndarray:
        """Sorted QM9 indices labelled at `method`."""
        return self._table(method)[0]

    def energies(self, method: str, indices: np.ndarray) -> np.ndarray:
        """[n] eV at `method` for QM9 `indices` (NaN where unlabelled)."""
        idx, energy = self._table(method)
        indices = np.asarray(indices, dtype=np.int64)
        pos = np.clip(np.searchsorted(idx, indices), 0, max(len(idx) - 1, 0))
        found = (idx[pos] == indices) if len(idx) else np.zeros(len(indices), bool)
        return np.where(found, energy[pos] if len(idx) else np.nan, np.nan)

    def _table(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        self.check(method, "labels")
        if method == QM9_FIDELITY:
            geo = load_qm9_geometries()
            return geo.index, geo.energy
        return _read_table(str(self.folder / self.files[method]), method)


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
