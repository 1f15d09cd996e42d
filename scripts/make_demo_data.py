"""Build the bundled demo subset of QM9 (run once; its output is committed in src/multifi/demo_data).

4,000 random QM9 molecules with GFN2-xTB energies (shared qm9mf table) and, for 1,300 of them, the
B3LYP/6-31G(2df,p) energies from qm9pack. Splits by molecule: test 800 and val 200 molecules
(all with both labels), train 3,000 molecules of which 300 carry B3LYP.

    python scripts/make_demo_data.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

from multifi.data.readers.qm9 import QM9_FIDELITY, read_qm9

OUT = Path(__file__).resolve().parents[1] / "src" / "multifi" / "demo_data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = ap.parse_args()
    gfn2 = read_qm9(labels=Path(args.shared) / "qm9mf" / "GFN2-xTB.csv.gz", fidelity="GFN2-xTB")
    idx = np.array([int(k.split(":")[1]) for k in gfn2.keys])
    rng = np.random.default_rng(2026)
    chosen = np.sort(rng.choice(idx, 4000, replace=False))
    order = rng.permutation(chosen)
    test, val, train_b3, train_rest = order[:800], order[800:1000], order[1000:1300], order[1300:]
    with_b3 = np.sort(np.concatenate([test, val, train_b3]))
    gfn = read_qm9(labels=Path(args.shared) / "qm9mf" / "GFN2-xTB.csv.gz", fidelity="GFN2-xTB", indices=chosen)
    b3 = read_qm9(fidelity=QM9_FIDELITY, indices=with_b3)
    frames = _frames(gfn, "GFN2-xTB") + _frames(b3, QM9_FIDELITY)
    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    OUT.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT / "qm9_demo.extxyz.gz", "wt", compresslevel=9) as f:
        f.write(buf.getvalue())
    for name, ids in {"test": test, "val": val, "train": np.concatenate([train_b3, train_rest])}.items():
        (OUT / f"split_{name}.txt").write_text("\n".join(f"qm9:{i}" for i in np.sort(ids)) + "\n")
    print(f"wrote {len(frames)} frames ({len(chosen)} molecules) to {OUT}")


def _frames(ds, fidelity: str) -> list[Atoms]:
    out = []
    for s in range(len(ds)):
        a = ds.to_atoms(s)
        a.info = {"key": str(ds.keys[s]), "fidelity": fidelity, "energy": float(ds.energy[s, 0])}
        out.append(a)
    return out


if __name__ == "__main__":
    main()
