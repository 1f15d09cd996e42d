"""Energy errors on structures with elements the top fidelity's training labels lack: old vs joint references.

    python scripts/references_experiment.py solids --n 11 23 46       # PBE + r2SCAN without O and P
    python scripts/references_experiment.py qm9 --lacking F N         # GFN2-xTB + B3LYP without F (or N)

Each case trains one model with `multifi train` (command printed and stored), then evaluates its test
structures at the top fidelity twice: with the references the training fitted (joint fit, data/stats.py)
and with those the previous code fitted (per-fidelity least squares, zero for elements without labels;
`fit_baseline` of src/multifi/models/head.py at commit BEFORE, loaded with bench/legacy.py). Elements
without top-fidelity labels never occur in a top-fidelity training sample, so their references do not
enter the training loss: the network weights are the same for both, only the references differ.
Test structures are grouped: with an element lacking top-fidelity labels ("uncovered"); else with a
composition outside the span of the top fidelity's training compositions ("not spanned"); else "spanned".
Writes <out>/<case>.json and prints a table; run directories go to <out>/work/ (git-ignored under results/).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BEFORE = "c565fb9"  # last commit with per-fidelity references that are zero for elements without labels
B3LYP = "B3LYP/6-31G(2df,p)"

SOLIDS_MODEL = {  # experiments/solids_small.yaml base + its joint_readout variant (the paper's M3GNet set-up)
    "model": {
        "backbone": "m3gnet",
        "features": 32,
        "interactions": 3,
        "cutoff": 5.0,
        "threebody_cutoff": 4.0,
        "n_rbf": 9,
        "max_n": 3,
        "max_l": 3,
        "fidelity_embedding": {"dim": 4, "inject": "readout"},
        "energy_scale": "shared",
    },
    "loss": {"energy": 10.0, "forces": 1.0, "stress": 0.01, "kind": "huber", "huber_delta": 0.1},
    "train": {
        "batch_size": 16,
        "lr": 0.003,
        "warmup_steps": 50,
        "schedule": "cosine",
        "ema_decay": 0.99,
        "epochs": 100000,
        "max_steps": 1000,
        "val_every_n_steps": 100,
        "early_stopping_patience": None,
        "threads": 1,
        "progress": False,
    },
}
QM9_MODEL = {  # the bundled demo's joint PaiNN (src/multifi/demo_data/joint.yaml), fewer epochs
    "model": {
        "backbone": "painn",
        "features": 64,
        "interactions": 3,
        "cutoff": 5.0,
        "fidelity_embedding": {"dim": 16, "inject": "both"},
    },
    "train": {"epochs": 12, "batch_size": 32, "lr": 1.0e-3, "warmup_steps": 50, "threads": 1, "progress": False},
}


def solids_case(n: int, out: Path) -> tuple[Path, str, list[int]]:
    """PBE on the 497 training structures of results/solids, r2SCAN on the first n of its seed-0 order
    that contain neither O nor P; validation and test: results/solids' 20 and 50 r2SCAN structures."""
    split = json.loads((ROOT / "results/solids/splits/learning_curve.json").read_text())
    work = out / "work" / f"solids_n{n}"
    work.mkdir(parents=True, exist_ok=True)
    records = {}
    with gzip.open(SHARED / "solids/R2SCAN.jsonl.gz", "rt") as f:
        for line in f:
            records[f"matpes:{json.loads(line)['matpes_id']}"] = line
    no_op = [k for k in split["high_train_order"]["s0"] if not {"O", "P"} & set(json.loads(records[k])["elements"])]
    keep = no_op[:n] + split["val"] + split["test"]
    with gzip.open(work / "R2SCAN_subset.jsonl.gz", "wt") as f:
        f.writelines(records[k] for k in keep)
    for name in ("train", "val", "test"):
        keys = split["low_pool"] if name == "train" else split[name]
        (work / f"{name}.txt").write_text("\n".join(keys) + "\n")
    cfg = {
        "data": {
            "sources": [
                {"path": _rel(SHARED / "solids/PBE.jsonl.gz", work), "stress_order": "vasp"},
                {"path": "R2SCAN_subset.jsonl.gz", "stress_order": "vasp"},
            ],
            "split": {"files": {s: f"{s}.txt" for s in ("train", "val", "test")}},
        },
        **SOLIDS_MODEL,
        "output_dir": "run",
    }
    return _write_config(work, cfg), "R2SCAN", [8, 15]


def qm9_case(lacking: str, out: Path, seed: int = 0) -> tuple[Path, str, list[int]]:
    """GFN2-xTB on 3,000 random QM9 molecules; B3LYP on 300 of them without `lacking`; validation 200
    random molecules, test 400 random + 200 with `lacking` (B3LYP labels only, in no training set)."""
    from ase.data import atomic_numbers

    from multifi.data.readers.qm9 import load_qm9_geometries

    z = atomic_numbers[lacking]
    geo = load_qm9_geometries()
    has = np.zeros(len(geo), bool)
    has[np.repeat(np.arange(len(geo)), np.diff(geo.offsets))[geo.numbers == z]] = True
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(geo))
    low, rest = order[:3000], order[3000:]
    top_train = [i for i in low if not has[i]][:300]
    val, test = rest[:200], rest[200:600]
    test = np.concatenate([test, [i for i in rest[600:] if has[i]][:200]])
    work = out / "work" / f"qm9_no{lacking}"
    work.mkdir(parents=True, exist_ok=True)
    idx = lambda rows: "\n".join(str(int(geo.index[r])) for r in rows) + "\n"  # noqa: E731
    (work / "gfn2.txt").write_text(idx(low))
    (work / "b3lyp.txt").write_text(idx(np.concatenate([top_train, val, test])))
    for name, rows in (("train", low), ("val", val), ("test", test)):
        (work / f"{name}.txt").write_text("\n".join(f"qm9:{int(geo.index[r])}" for r in rows) + "\n")
    cfg = {
        "data": {
            "sources": [
                {
                    "qm9": {
                        "labels": _rel(SHARED / "qm9mf/GFN2-xTB.csv.gz", work),
                        "fidelity": "GFN2-xTB",
                        "indices": "gfn2.txt",
                    }
                },
                {"qm9": {"fidelity": B3LYP, "indices": "b3lyp.txt"}},
            ],
            "split": {"files": {s: f"{s}.txt" for s in ("train", "val", "test")}},
        },
        **QM9_MODEL,
        "output_dir": "run",
    }
    return _write_config(work, cfg), B3LYP, [z]


def _rel(path: Path, start: Path) -> str:
    """`path` relative to `start` (configs resolve relative paths against their folder)."""
    import os

    return os.path.relpath(path, start.resolve())


def _write_config(work: Path, cfg: dict) -> Path:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(config: Path) -> str:
    """`multifi train CONFIG` (or --resume of an interrupted run); returns the command as documented."""
    import os

    run = config.parent / "run"
    if not (run / "model.pt").exists():
        args = ["--resume", str(run)] if (run / "checkpoints" / "last.ckpt").exists() else [str(config)]
        subprocess.run(
            [sys.executable, "-m", "multifi.cli.main", "train", *args],
            check=True,
            cwd=config.parent,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    return f"multifi train {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}"


def evaluate(config: Path, top: str) -> dict:
    """Per-group energy MAE (meV/atom) of the run's test structures at `top`, joint vs previous references."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from legacy import module_at

    from multifi.config import load_config
    from multifi.data.stats import composition_matrix, fit_references
    from multifi.models.registry import load_potential
    from multifi.train.evaluate import evaluate_pairs
    from multifi.train.prepare import prepare_data

    cfg = load_config(config, [f"output_dir={config.parent / 'run'}"])
    prep = prepare_data(cfg)
    ds, k = prep.dataset, prep.dataset.fidelities.index(top)
    train = prep.pairs["train"]
    test = prep.pairs["test"][prep.pairs["test"][:, 1] == k]
    potential = load_potential(config.parent / "run" / "model.pt")
    kwargs = {"pooled": potential.head.shared_baseline, "shared_scale": cfg.model.energy_scale == "shared"}
    old_ref, _ = module_at(BEFORE, "head").fit_baseline(ds, train, **kwargs)
    refs = fit_references(ds, train, **kwargs)  # as `multifi train` fits them now
    everything = fit_references(ds, np.concatenate([prep.pairs[s] for s in ("train", "val", "test")]), **kwargs)
    elements, counts = composition_matrix(ds)
    top_train = train[(train[:, 1] == k) & ~np.isnan(ds.energy[train[:, 0], k]), 0]
    covered = counts[top_train].sum(0) > 0  # [n_el]
    group = _groups(counts, top_train, test[:, 0], covered)
    out = {
        "top": top,
        "n_top_train": int(len(top_train)),
        "n_test": int(len(test)),
        "uncovered_elements": [int(z) for z in elements[~covered]],
        "estimated_references_eV": {int(z): float(refs.ref[z, k]) for z in elements[~covered]},
        "previous_references_eV": {int(z): float(old_ref[z, k]) for z in elements[~covered]},
        "all_labels_references_eV": {int(z): float(everything.ref[z, k]) for z in elements[~covered]},
        "leave_one_out_rms_eV_per_atom": float(refs.spread[k]),
    }
    truth = ds.energy[test[:, 0], k] / ds.n_atoms[test[:, 0]]
    for label, ref in (("joint", refs.ref), ("previous", old_ref)):
        with torch.no_grad():
            potential.head.ref.copy_(torch.as_tensor(ref))
        _, pred = evaluate_pairs(potential, ds, None, test, return_predictions=True)
        err = np.abs(pred / ds.n_atoms[test[:, 0]] - truth) * 1000
        out[label] = {
            g: {"n": int((group == g).sum()), "energy_mae_meV_per_atom": float(err[group == g].mean())}
            for g in ("uncovered", "not spanned", "spanned")
            if (group == g).any()
        }
        out[label]["all"] = {"n": int(len(err)), "energy_mae_meV_per_atom": float(err.mean())}
    return out


def _groups(counts: np.ndarray, train_rows: np.ndarray, test_rows: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """'uncovered' | 'not spanned' | 'spanned' per test structure (span of the training compositions)."""
    X = counts[train_rows].astype(float)
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    basis = vt[s > 1e-9 * s.max()]  # [r, n_el] row space
    T = counts[test_rows].astype(float)
    off_span = np.linalg.norm(T - (T @ basis.T) @ basis, axis=1) > 1e-6 * np.linalg.norm(T, axis=1)
    uncovered = (counts[test_rows][:, ~covered] > 0).any(1)
    return np.where(uncovered, "uncovered", np.where(off_span, "not spanned", "spanned"))


def table(out: Path) -> str:
    """Markdown table of every <out>/*.json: energy MAE (meV/atom) per group, previous → joint references."""
    from ase.data import chemical_symbols

    rows = [
        "| case | top-fidelity training labels | elements without them | group | n | previous refs | joint refs |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        missing = ", ".join(chemical_symbols[z] for z in r["uncovered_elements"])
        for g in r["joint"]:
            rows.append(
                f"| {path.stem} | {r['n_top_train']} {r['top']} | {missing} | {g} | {r['joint'][g]['n']} | "
                f"{r['previous'][g]['energy_mae_meV_per_atom']:.1f} | {r['joint'][g]['energy_mae_meV_per_atom']:.1f} |"
            )
    return "\n".join(rows)


def shifts() -> str:
    """R2SCAN − PBE reference shift per element, fitted on every label of the shared solids."""
    from ase.data import chemical_symbols

    from multifi.config import SourceConfig
    from multifi.data.sources import read_sources
    from multifi.data.split import labelled_pairs
    from multifi.data.stats import fit_references

    ds = read_sources(
        [SourceConfig(path=str(SHARED / f"solids/{n}.jsonl.gz"), stress_order="vasp") for n in ("PBE", "R2SCAN")]
    )
    refs = fit_references(ds, labelled_pairs(ds, np.arange(len(ds))))
    pbe, r2 = ds.fidelities.index("PBE"), ds.fidelities.index("R2SCAN")
    return ", ".join(f"{chemical_symbols[z]} {refs.ref[z, r2] - refs.ref[z, pbe]:.2f}" for z in refs.elements)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=["solids", "qm9", "table", "shifts"])
    ap.add_argument("--n", type=int, nargs="+", default=[11, 23, 46], help="solids: r2SCAN training structures")
    ap.add_argument("--lacking", nargs="+", default=["F"], help="qm9: element(s) absent from B3LYP training labels")
    ap.add_argument("--out", default=str(ROOT / "results/references"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.case in ("table", "shifts"):
        print(table(out) if args.case == "table" else shifts())
        return 0
    cases = (
        [(f"solids_n{n}", *solids_case(n, out)) for n in args.n]
        if args.case == "solids"
        else [(f"qm9_no{x}", *qm9_case(x, out)) for x in args.lacking]
    )
    for name, config, top, _ in cases:
        command = train(config)
        result = {"command": command, **evaluate(config, top)}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        for label in ("previous", "joint"):
            print(
                name, label, {g: round(v["energy_mae_meV_per_atom"], 1) for g, v in result[label].items()}, flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
