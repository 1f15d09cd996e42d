"""Few-shot extension on the shared solids: a PBE-only M3GNet extended to r2SCAN with 23 labels.

    python experiments/extend_solids.py [--steps 1500] [--extend-steps 500]

Splits: results/solids/splits/learning_curve.json (the PBE + r2SCAN learning curve): the PBE model
trains on the 497 PBE training structures (its validation and test sets are the 20 + 50 held-out
structures at PBE); the r2SCAN extension trains on the first 23 structures of seed 0's order (the
learning curve's n = 23, seed 0), picks its checkpoint on the 20 validation structures and is tested on
the 50 test structures at r2SCAN. Model and loss as in experiments/solids_small.yaml (M3GNet, 32
features, 3 blocks, Huber loss). Writes results/extend_solids/{results.json,README.md}; run directories
go to results/extend_solids/work/ (git-ignored). Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "solids"
OUT = ROOT / "results" / "extend_solids"
SPLITS = ROOT / "results" / "solids" / "splits" / "learning_curve.json"
N = 23
MODEL = {
    "backbone": "m3gnet",
    "features": 32,
    "interactions": 3,
    "cutoff": 5.0,
    "threebody_cutoff": 4.0,
    "n_rbf": 9,
    "max_n": 3,
    "max_l": 3,
    "fidelity_embedding": {"dim": 4, "inject": "both"},
    "energy_scale": "shared",
}
LOSS = {"energy": 10.0, "forces": 1.0, "stress": 0.01, "kind": "huber", "huber_delta": 0.1}
TRAIN = {
    "batch_size": 16,
    "lr": 0.003,
    "warmup_steps": 50,
    "schedule": "cosine",
    "ema_decay": 0.99,
    "epochs": 100000,
    "val_every_n_steps": 100,
    "early_stopping_patience": None,
    "progress": False,
    "threads": 1,
}
#: what each extension trains (replay: fraction of the 497 PBE training structures mixed in)
MODES = {"embedding": {"train": "embedding"}, "head": {"train": "head"}, "all_replay": {"train": "all", "replay": 0.1}}


def split_files(work: Path) -> dict[str, dict[str, str]]:
    s = json.loads(SPLITS.read_text())
    files = {}
    for name, keys in (
        ("pbe_train", s["low_pool"]),
        ("val", s["val"]),
        ("test", s["test"]),
        ("r2scan_train", s["high_train_order"]["s0"][:N]),
    ):
        path = work / f"{name}.txt"
        path.write_text("\n".join(keys) + "\n")
        files[name] = str(path)
    return {
        "pbe": {"train": files["pbe_train"], "val": files["val"], "test": files["test"]},
        "r2scan": {"train": files["r2scan_train"], "val": files["val"], "test": files["test"]},
    }


def run_once(run_dir: Path, go) -> dict:
    """Run `go()` unless run_dir already holds metrics.json; returns the metrics and the CPU seconds."""
    if not (run_dir / "metrics.json").exists():
        t = time.process_time()
        go()
        (run_dir / "cpu_seconds.txt").write_text(f"{time.process_time() - t:.1f}\n")
    return {
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "cpu_seconds": float((run_dir / "cpu_seconds.txt").read_text()),
    }


def main() -> None:
    from multifi.config import validate_config
    from multifi.train.extend import extend
    from multifi.train.run import train

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps of the PBE and r2SCAN-only models")
    p.add_argument("--extend-steps", type=int, default=500, help="optimiser steps of each extension")
    args = p.parse_args()
    work = OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    files = split_files(work)
    torch.set_num_threads(1)
    results = {}

    pbe_dir = work / "pbe"
    pbe = {
        "data": {"sources": [{"path": str(DATA / "PBE.jsonl.gz")}], "split": {"files": files["pbe"]}},
        "model": MODEL,
        "loss": LOSS,
        "train": {**TRAIN, "max_steps": args.steps},
        "output_dir": str(pbe_dir),
    }
    results["pbe_model"] = run_once(pbe_dir, lambda: train(validate_config(pbe)))

    single_dir = work / "r2scan_only"
    single = {
        "data": {"sources": [{"path": str(DATA / "R2SCAN.jsonl.gz")}], "split": {"files": files["r2scan"]}},
        "model": {**MODEL, "fidelity_embedding": {"dim": 4, "inject": "single"}},
        "loss": LOSS,
        "train": {**TRAIN, "max_steps": args.steps},
        "output_dir": str(single_dir),
    }
    results["r2scan_only"] = run_once(single_dir, lambda: train(validate_config(single)))

    for name, keys in MODES.items():
        run_dir = work / f"extend_{name}"
        cfg = {
            "data": {
                "sources": [{"path": str(DATA / "R2SCAN.jsonl.gz"), "fidelity": "R2SCAN"}],
                "split": {"files": files["r2scan"]},
            },
            "loss": LOSS,
            "train": {**TRAIN, "max_steps": args.extend_steps},
            "output_dir": str(run_dir),
            "extend": {"model": str(pbe_dir / "model.pt"), "fidelity": "R2SCAN", "init_like": "PBE", **keys},
        }
        results[f"extend_{name}"] = run_once(run_dir, lambda cfg=cfg: extend(validate_config(cfg)))

    results["settings"] = {
        "model": MODEL,
        "loss": LOSS,
        "train": TRAIN,
        "steps": args.steps,
        "extend_steps": args.extend_steps,
        "modes": MODES,
        "n_r2scan": N,
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    OUT.mkdir(exist_ok=True)
    text = json.dumps(results, indent=2).replace(str(ROOT) + "/", "")  # paths relative to the repository
    (OUT / "results.json").write_text(text + "\n")
    print(table(results))


def table(results: dict) -> str:
    """Markdown table: r2SCAN test errors and the PBE test errors before/after."""
    pbe = results["pbe_model"]["metrics"]["fidelities"]["PBE"]
    rows = [
        "| model | r2SCAN E MAE meV/atom | r2SCAN F MAE meV/Å | PBE E MAE meV/atom (before → after) "
        "| PBE F MAE meV/Å (before → after) | CPU s |",
        "|---|---|---|---|---|---|",
    ]
    single = results["r2scan_only"]["metrics"]["fidelities"]["R2SCAN"]
    rows.append(
        f"| r2SCAN only (23 labels, {results['settings']['steps']} steps) | "
        f"{single['energy_mae_meV_per_atom']:.1f} | {single['forces_mae_meV_per_A']:.0f} | — | — | "
        f"{results['r2scan_only']['cpu_seconds']:.0f} |"
    )
    for name in MODES:
        r = results[f"extend_{name}"]
        m = r["metrics"]
        new, old = m["fidelities"]["R2SCAN"], m["forgetting"]["PBE"]
        steps = results["settings"]["extend_steps"]
        rows.append(
            f"| PBE model + r2SCAN, extend {name.replace('_', ' + ')} ({steps} "
            f"steps) | {new['energy_mae_meV_per_atom']:.1f} | {new['forces_mae_meV_per_A']:.0f} | "
            f"{old['before']['energy_mae_meV_per_atom']:.2f} → {old['after']['energy_mae_meV_per_atom']:.2f} | "
            f"{old['before']['forces_mae_meV_per_A']:.1f} → {old['after']['forces_mae_meV_per_A']:.1f} | "
            f"{r['cpu_seconds']:.0f} |"
        )
    rows.append(
        f"\nPBE model alone ({results['settings']['steps']} steps, "
        f"{results['pbe_model']['cpu_seconds']:.0f} CPU s): PBE test "
        f"{pbe['energy_mae_meV_per_atom']:.2f} meV/atom, {pbe['forces_mae_meV_per_A']:.1f} meV/Å"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
