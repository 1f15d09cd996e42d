"""Time and peak memory to load all of QM9 with three fidelities into one FidelityDataset.

    python bench/load_qm9.py [--shared ../shared/data] [--cold]

Fidelities: B3LYP/6-31G(2df,p) (qm9pack), GFN2-xTB and GFN1-xTB (shared label tables). --cold
parses the qm9pack CSVs again (fresh cache directory) instead of using the geometry cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--cold", action="store_true")
    args = ap.parse_args()
    if args.cold:
        os.environ["MULTIFI_CACHE"] = tempfile.mkdtemp()
    from multifi.config import Qm9Source, SourceConfig
    from multifi.data.sources import read_sources

    qm9mf = Path(args.shared) / "qm9mf"
    sources = [
        SourceConfig(qm9=Qm9Source()),
        SourceConfig(qm9=Qm9Source(labels=str(qm9mf / "GFN2-xTB.csv.gz"))),
        SourceConfig(qm9=Qm9Source(labels=str(qm9mf / "GFN1-xTB.csv.gz"))),
    ]
    start = time.perf_counter()
    ds = read_sources(sources)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "structures": len(ds),
                "atoms": int(ds.n_atoms.sum()),
                "fidelities": list(ds.fidelities.names),
                "labels": {k: v["energy"] for k, v in ds.label_counts().items()},
                "seconds": round(seconds, 2),
                "peak_rss_MB": round(peak_mb),
                "cold": args.cold,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
