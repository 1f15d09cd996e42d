"""Export the solids learning-curve splits as extxyz files every peer reads (runs in the project's .venv).

    python bench/peers_mf/export.py [--out bench/.scratch/peers_mf/data]

Same structures and labels as results/solids: results/solids/splits/learning_curve.json names the 50 test,
20 validation and 497 PBE training structures (keys "matpes:<matpes_id>") and, per seed, the r2SCAN
training order; the r2SCAN training set of (n, seed) is the first n of high_train_order["s<seed>"].
Labels come from ../shared/data/solids/{PBE,R2SCAN}.jsonl.gz through multifi's read_matpes.

Files (ASE extxyz, MACE's key names, also read by SevenNet):
  pbe_train.xyz            497 structures, PBE: REF_energy (eV, total), REF_forces (eV/Å), REF_stress (eV/Å³, ASE sign)
  pbe_val.xyz              the 20 validation structures at PBE (validation only: a MACE head needs a validation set)
  r2scan_val.xyz           the 20 validation structures at r2SCAN (no stress labels at r2SCAN here)
  r2scan_test.xyz          the 50 test structures at r2SCAN
  r2scan_train_n<n>_s<seed>.xyz   the r2SCAN training subset of (n, seed)
  manifest.json            keys per file, sizes, source checksums
Each frame carries info["key"] and info["fidelity"] ("PBE" or "R2SCAN").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ROOT / "results" / "solids" / "splits" / "learning_curve.json"
SHARED = ROOT.parent / "shared" / "data" / "solids"
GPA_PER_EV_A3 = 160.21766208  # 1 eV/Å³ = 160.2 GPa


def frames(ds, fidelity: str, keys: list[str], stress: bool):
    """ASE Atoms (REF_* labels at `fidelity`) for `keys`, in that order; error if a label is missing."""
    import ase
    import numpy as np

    index = {str(k): i for i, k in enumerate(ds.keys)}
    col = list(ds.fidelities.names).index(fidelity)
    out = []
    for k in keys:
        s = index[k]
        sl = ds.atoms_slice(s)
        e = float(ds.energy[s, col])
        f = np.asarray(ds.forces[sl, col], float)
        if not np.isfinite(e) or not np.isfinite(f).all():
            raise SystemExit(f"export: {k} has no {fidelity} energy/forces")
        a = ase.Atoms(ds.numbers[sl], ds.positions[sl], cell=ds.cells[s], pbc=ds.pbc[s])
        a.info.update(REF_energy=e, key=k, fidelity=fidelity)
        a.arrays["REF_forces"] = f
        if stress:
            sig = np.asarray(ds.stress[s, col], float).reshape(3, 3)
            if np.isfinite(sig).all():
                a.info["REF_stress"] = (sig / GPA_PER_EV_A3).reshape(9)
        out.append(a)
    return out


def write(path: Path, atoms: list) -> None:
    import ase.io

    tmp = path.with_suffix(".tmp")
    ase.io.write(tmp, atoms, format="extxyz")
    os.replace(tmp, path)


def export(out: Path) -> dict:
    """Write every file (skipped when manifest.json exists and names the same split file)."""
    manifest = out / "manifest.json"
    split_sha = hashlib.sha256(SPLITS.read_bytes()).hexdigest()[:16]
    if manifest.exists() and json.loads(manifest.read_text()).get("splits_sha256_16") == split_sha:
        return json.loads(manifest.read_text())
    from multifi.data.dataset import FidelityDataset
    from multifi.data.readers.matpes import read_matpes

    out.mkdir(parents=True, exist_ok=True)
    sp = json.loads(SPLITS.read_text())
    ds = FidelityDataset.merge(
        [
            read_matpes(SHARED / "PBE.jsonl.gz", stress_order="vasp"),
            read_matpes(SHARED / "R2SCAN.jsonl.gz", stress_order="vasp"),
        ]
    )
    files = {
        "pbe_train.xyz": ("PBE", sp["low_pool"], True),
        "pbe_val.xyz": ("PBE", sp["val"], True),
        "r2scan_val.xyz": ("R2SCAN", sp["val"], False),
        "r2scan_test.xyz": ("R2SCAN", sp["test"], False),
    }
    for seed_key, order in sp["high_train_order"].items():
        for n in sorted(set(sp["sizes"].values())):
            files[f"r2scan_train_n{n}_{seed_key}.xyz"] = ("R2SCAN", order[:n], False)
    assert not set(sp["test"]) & set(sp["low_pool"]) and not set(sp["val"]) & set(sp["low_pool"])
    for name, (fid, keys, stress) in files.items():
        write(out / name, frames(ds, fid, keys, stress))
    info = {
        "splits": "results/solids/splits/learning_curve.json",
        "splits_sha256_16": split_sha,
        "sources": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in (SHARED / "PBE.jsonl.gz", SHARED / "R2SCAN.jsonl.gz")
        },
        "sizes": sp["sizes"],
        "seeds": sorted(sp["high_train_order"]),
        "files": {k: {"fidelity": v[0], "n": len(v[1])} for k, v in files.items()},
        "stress_unit": "eV/A^3 (ASE sign)",
        "energy_unit": "eV (total)",
        "forces_unit": "eV/A",
    }
    manifest.write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / ".scratch" / "peers_mf" / "data"))
    info = export(Path(ap.parse_args().out))
    print(json.dumps(info["files"], indent=1))


if __name__ == "__main__":
    main()
