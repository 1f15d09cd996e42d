"""What the acquisition strategies of a QM9 selection result picked: size and make-up of the picked molecules
against the pool and the test set (means over every round after round 0 and every seed).

    python scripts/selection_picks.py [results/qm9_selection]

Prints a Markdown table: molecules picked, mean atoms, mean hydrogens, mean heavy atoms and the share with
fewer than 9 heavy atoms, per arm, with the pool and the test molecules as references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from multifi.data.readers.qm9 import load_qm9_geometries


def make_up(ids: np.ndarray, position: dict, atoms: np.ndarray, hydrogens: np.ndarray) -> list[str]:
    rows = np.array([position[int(i)] for i in ids], np.int64)
    heavy = atoms[rows] - hydrogens[rows]
    return [
        str(len(rows)),
        f"{atoms[rows].mean():.2f}",
        f"{hydrogens[rows].mean():.2f}",
        f"{heavy.mean():.2f}",
        f"{(heavy < 9).mean():.3f}",
    ]


def main(folder: Path) -> None:
    geo = load_qm9_geometries()
    atoms = np.diff(geo.offsets)
    is_h = (geo.numbers == 1).astype(np.int64)
    hydrogens = np.add.reduceat(is_h, geo.offsets[:-1])
    position = {int(k): i for i, k in enumerate(geo.index)}
    splits = json.loads((folder / "splits" / "selection.json").read_text())
    print("| molecules | n | atoms | H | heavy atoms | share < 9 heavy |")
    print("|---|---|---|---|---|---|")
    for name in ("pool", "test"):
        print(f"| {name} | " + " | ".join(make_up(np.asarray(splits[name]), position, atoms, hydrogens)) + " |")
    for arm in sorted(p.name for p in (folder / "rounds").iterdir()):
        picked = [
            i
            for record in sorted((folder / "rounds" / arm).glob("s*/r*.json"))
            for i in json.loads(record.read_text())["picked_next"]
        ]
        if picked:
            row = make_up(np.asarray(picked), position, atoms, hydrogens)
            print(f"| picked by {arm} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/qm9_selection"))
