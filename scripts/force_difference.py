"""How much the r2SCAN and PBE labels of the shared solids differ on a split's test structures.

    python scripts/force_difference.py results/solids/splits/learning_curve.json

Prints the number of test structures labelled at both, the mean |F_r2SCAN − F_PBE| (meV/Å, per component)
and the mean |F_r2SCAN| for scale.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "solids"


def main(split_file: str) -> None:
    test = [k.split(":", 1)[1] for k in json.loads(Path(split_file).read_text())["test"]]
    records = {}
    for name in ("PBE", "R2SCAN"):
        with gzip.open(SHARED / f"{name}.jsonl.gz", "rt") as f:
            records[name] = {r["matpes_id"]: r for r in map(json.loads, f)}
    both = [i for i in test if i in records["PBE"] and i in records["R2SCAN"]]
    high = np.concatenate([np.asarray(records["R2SCAN"][i]["forces"]) for i in both])
    low = np.concatenate([np.asarray(records["PBE"][i]["forces"]) for i in both])
    print(
        f"{len(both)} test structures at both; mean |F_r2SCAN - F_PBE| = {1000 * np.abs(high - low).mean():.1f} "
        f"meV/Å; mean |F_r2SCAN| = {1000 * np.abs(high).mean():.1f} meV/Å (per component)"
    )


if __name__ == "__main__":
    main(sys.argv[1])
