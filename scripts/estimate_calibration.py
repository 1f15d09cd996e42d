"""Are the errors reported for estimated reference energies honest? Each element is hidden at one fidelity (its
labels there dropped), its reference there estimated from the other fidelities (data/stats.py, fit_references),
and the estimate compared with the fit on every label; z = (estimate − fit) / the leave-one-out error the fit
reports (References.spread, what training, predict and `select` state).

    python scripts/estimate_calibration.py qm9      # the qm9mf fidelities + QM9's B3LYP; N, O, F hidden
    python scripts/estimate_calibration.py solids   # PBE + r2SCAN solids; every element hidden at either
    python scripts/estimate_calibration.py table    # the summary of both JSON files

Cases with every fidelity of the data, and with each pair of fidelities alone (the usual two-level data set).
Writes results/estimate_calibration/<data>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "results" / "estimate_calibration"
QM9_LIMIT = 20000  # molecules of the all-molecule tables (GFN2-xTB, GFN1-xTB, QM9's B3LYP)
QM9_HIDDEN = ("N", "O", "F")  # H and C are in (nearly) every molecule: hiding them leaves no labels


def qm9_dataset():
    from multifi.config import Qm9Source, SourceConfig
    from multifi.data.sources import read_sources

    manifest = json.loads((SHARED / "qm9mf" / "manifest.json").read_text())
    sources = [
        SourceConfig(qm9=Qm9Source(labels=str(SHARED / "qm9mf" / f["file"]), fidelity=f["fidelity"], limit=QM9_LIMIT))
        for f in manifest["files"]
    ]
    sources.append(SourceConfig(qm9=Qm9Source(limit=QM9_LIMIT)))
    return read_sources(sources)


def solids_dataset():
    from multifi.config import SourceConfig
    from multifi.data.sources import read_sources

    return read_sources(
        [SourceConfig(path=str(SHARED / f"solids/{n}.jsonl.gz"), stress_order="vasp") for n in ("PBE", "R2SCAN")]
    )


def cases(ds, hidden: list[int]):
    """(fidelities used, fidelity hidden at, element) for every fidelity set: all, and each pair."""
    K = len(ds.fidelities)
    sets = [tuple(range(K))] + ([tuple(p) for p in itertools.combinations(range(K), 2)] if K > 2 else [])
    for used in sets:
        for f in used:
            for z in hidden:
                yield used, f, z


def run(ds, hidden: list[int]) -> list[dict]:
    from ase.data import chemical_symbols

    from multifi.data.split import labelled_pairs
    from multifi.data.stats import fit_references

    pairs = labelled_pairs(ds, np.arange(len(ds)))
    contains = {
        z: np.array([(ds.numbers[a:b] == z).any() for a, b in zip(ds.offsets[:-1], ds.offsets[1:])]) for z in hidden
    }
    full = {}
    rows = []
    for used, f, z in cases(ds, hidden):
        keep = np.isin(pairs[:, 1], used)
        if used not in full:
            full[used] = fit_references(ds, pairs[keep])
        truth = full[used]
        if not truth.fitted[z, f]:
            continue  # the element has no labels at f to begin with
        trial = pairs[keep & ~((pairs[:, 1] == f) & contains[z][pairs[:, 0]])]
        if not np.isin(trial[:, 1], [f]).any():
            continue
        refs = fit_references(ds, trial)
        if refs.fitted[z, f] or not np.isfinite(refs.spread[f]):
            continue
        error = float(refs.ref[z, f] - truth.ref[z, f])
        rows.append(
            {
                "fidelities": [ds.fidelities.names[k] for k in used],
                "hidden_at": ds.fidelities.names[f],
                "element": chemical_symbols[z],
                "estimate_eV": float(refs.ref[z, f]),
                "fit_eV": float(truth.ref[z, f]),
                "error_eV": error,
                "reported_eV": float(refs.spread[f]),
                "z": error / float(refs.spread[f]),
                "labelled_elements_left": int(refs.fitted[:, f].sum()),
            }
        )
        print(
            rows[-1]["hidden_at"],
            rows[-1]["element"],
            len(used),
            f"{error:+.3f} eV",
            f"σ {refs.spread[f]:.3f}",
            f"z {rows[-1]['z']:+.2f}",
            flush=True,
        )
    return rows


def summary(rows: list[dict]) -> dict:
    z = np.abs([r["z"] for r in rows])
    return {
        "cases": len(rows),
        "within_1": float((z <= 1).mean()),
        "within_2": float((z <= 2).mean()),
        "median_abs_z": float(np.median(z)),
        "rms_z": float(np.sqrt(np.mean(z**2))),
    }


def table() -> str:
    lines = ["| data | fidelities | cases | |z| ≤ 1 | |z| ≤ 2 | median |z| | RMS z |", "|---|---|---|---|---|---|---|"]
    for name in ("qm9", "solids"):
        path = OUT / f"{name}.json"
        if not path.exists():
            continue
        rows = json.loads(path.read_text())["cases"]
        for label, pick in (
            ("all", lambda r, n: len(r["fidelities"]) == n),
            ("pairs", lambda r, n: len(r["fidelities"]) == 2),
        ):
            n_all = max(len(r["fidelities"]) for r in rows)
            sel = [r for r in rows if pick(r, n_all)]
            if label == "pairs" and n_all == 2 or not sel:
                continue
            s = summary(sel)
            lines.append(
                f"| {name} | {label} | {s['cases']} | {s['within_1']:.0%} | {s['within_2']:.0%} | "
                f"{s['median_abs_z']:.2f} | {s['rms_z']:.2f} |"
            )
    lines += ["", "| data | element | cases | |z| ≤ 1 | |z| ≤ 2 | largest |z| |", "|---|---|---|---|---|---|"]
    for name in ("qm9", "solids"):
        path = OUT / f"{name}.json"
        if not path.exists():
            continue
        rows = json.loads(path.read_text())["cases"]
        for element in sorted({r["element"] for r in rows}):
            z = np.abs([r["z"] for r in rows if r["element"] == element])
            lines.append(
                f"| {name} | {element} | {len(z)} | {(z <= 1).mean():.0%} | {(z <= 2).mean():.0%} | {z.max():.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    from ase.data import atomic_numbers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", choices=["qm9", "solids", "table"])
    args = ap.parse_args(argv)
    if args.data == "table":
        print(table())
        return 0
    ds = qm9_dataset() if args.data == "qm9" else solids_dataset()
    hidden = [atomic_numbers[s] for s in QM9_HIDDEN] if args.data == "qm9" else ds.elements
    rows = run(ds, hidden)
    OUT.mkdir(parents=True, exist_ok=True)
    command = f"python scripts/estimate_calibration.py {args.data}"
    (OUT / f"{args.data}.json").write_text(
        json.dumps({"command": command, "summary": summary(rows), "cases": rows}, indent=1)
    )
    print(json.dumps(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
