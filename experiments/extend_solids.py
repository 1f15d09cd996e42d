"""Few-shot extension on the shared solids: a PBE-only M3GNet extended to r2SCAN with n labels.

    python experiments/extend_solids.py [--ns 11 23 46 91 182] [--seeds 0 1] [--steps 1500] [--extend-steps 500]

Splits: results/solids/splits/learning_curve.json (the PBE + r2SCAN learning curve): the PBE model
trains on the 497 PBE training structures (its validation and test sets are the 20 + 50 held-out
structures at PBE); the r2SCAN extension trains on the first n structures of seed s's order (the
learning curve's n, seed s), picks its checkpoint on the 20 validation structures and is tested on the
50 test structures at r2SCAN, against an r2SCAN-only model on the same n structures and the learning
curve's joint model trained from scratch on PBE + the same n (results/solids, `joint_both`, the same
recipe and 1 500 steps). Model and loss as in experiments/solids_small.yaml (M3GNet, 32 features,
3 blocks, Huber loss). Writes results/extend_solids/results.json and prints the tables; run directories go to
results/extend_solids/work/ (git-ignored). Finished runs are reused (made with other settings: an error).
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
VASP_ORDER = {"stress_order": "vasp"}  # these files store stress in VASP's order (their README)
OUT = ROOT / "results" / "extend_solids"
SPLITS = ROOT / "results" / "solids" / "splits" / "learning_curve.json"
JOINT = ROOT / "results" / "solids" / "runs" / "learning_curve" / "joint_both"
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


def split_files(work: Path, n: int, seed: int) -> dict[str, dict[str, str]]:
    s = json.loads(SPLITS.read_text())
    order = s["high_train_order"][f"s{seed}"]
    if n > len(order):
        raise SystemExit(f"{SPLITS}: seed {seed} orders {len(order)} r2SCAN structures, n = {n} asked")
    files = {}
    for name, keys in (
        ("pbe_train", s["low_pool"]),
        ("val", s["val"]),
        ("test", s["test"]),
        (f"r2scan_train_n{n}_s{seed}", order[:n]),
    ):
        path = work / f"{name}.txt"
        path.write_text("\n".join(keys) + "\n")
        files[name] = str(path)
    return {
        "pbe": {"train": files["pbe_train"], "val": files["val"], "test": files["test"]},
        "r2scan": {"train": files[f"r2scan_train_n{n}_s{seed}"], "val": files["val"], "test": files["test"]},
    }


def first_difference(ours: dict, made: dict, where: str = "") -> str | None:
    """The first key of the config `ours` whose value differs in `made` (a run's config.yaml, read), else None."""
    for key, value in ours.items():
        other = made.get(key) if isinstance(made, dict) else None
        if isinstance(value, list) and isinstance(other, list) and len(value) == len(other):
            value, other = dict(enumerate(value)), dict(enumerate(other))  # e.g. data.sources, entry by entry
        if isinstance(value, dict) and isinstance(other, dict):
            found = first_difference(value, other, f"{where}{key}.")
            if found:
                return found
        elif value != other and not (isinstance(value, dict) and not value and other is None):
            return f"{where}{key} = {other!r} there, {value!r} now"
    return None


def run_once(run_dir: Path, go, cfg: dict) -> dict:
    """Run `go()` unless run_dir already holds metrics.json, made with the same settings `cfg` (compared with
    its config.yaml: a run of other options, e.g. --steps, is an error, not reused); returns the metrics and
    the CPU seconds."""
    import yaml

    if (run_dir / "metrics.json").exists():
        made = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
        differs = first_difference(cfg, made)
        if differs:
            raise SystemExit(
                f"{run_dir}: finished with other settings ({differs}); remove it or rerun with its options"
            )
    else:
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
    p.add_argument("--ns", type=int, nargs="+", default=[11, 23, 46, 91, 182], help="r2SCAN labels")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the learning curve's orders")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps of the PBE and r2SCAN-only models")
    p.add_argument("--extend-steps", type=int, default=500, help="optimiser steps of each extension")
    args = p.parse_args()
    work = OUT / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results: dict = {"runs": {}}

    pbe_dir = work / "pbe"
    files = split_files(work, args.ns[0], args.seeds[0])
    pbe = {
        "data": {"sources": [{"path": str(DATA / "PBE.jsonl.gz"), **VASP_ORDER}], "split": {"files": files["pbe"]}},
        "model": MODEL,
        "loss": LOSS,
        "train": {**TRAIN, "max_steps": args.steps},
        "output_dir": str(pbe_dir),
    }
    results["pbe_model"] = run_once(pbe_dir, lambda: train(validate_config(pbe)), pbe)

    for n in args.ns:
        for seed in args.seeds:
            files = split_files(work, n, seed)
            runs = results["runs"][f"n{n}_s{seed}"] = {"n": n, "seed": seed}
            single_dir = work / f"n{n}_s{seed}" / "r2scan_only"
            single = {
                "data": {
                    "sources": [{"path": str(DATA / "R2SCAN.jsonl.gz"), **VASP_ORDER}],
                    "split": {"files": files["r2scan"]},
                },
                "model": {**MODEL, "fidelity_embedding": {"dim": 4, "inject": "single"}},
                "loss": LOSS,
                "train": {**TRAIN, "max_steps": args.steps, "seed": seed},
                "output_dir": str(single_dir),
            }
            runs["r2scan_only"] = run_once(single_dir, lambda single=single: train(validate_config(single)), single)
            for name, keys in MODES.items():
                run_dir = work / f"n{n}_s{seed}" / f"extend_{name}"
                cfg = {
                    "data": {
                        "sources": [{"path": str(DATA / "R2SCAN.jsonl.gz"), "fidelity": "R2SCAN", **VASP_ORDER}],
                        "split": {"files": files["r2scan"]},
                    },
                    "loss": LOSS,
                    "train": {**TRAIN, "max_steps": args.extend_steps, "seed": seed},
                    "output_dir": str(run_dir),
                    "extend": {"model": str(pbe_dir / "model.pt"), "fidelity": "R2SCAN", "init_like": "PBE", **keys},
                }
                runs[f"extend_{name}"] = run_once(run_dir, lambda cfg=cfg: extend(validate_config(cfg)), cfg)
            joint = JOINT / f"n{n}_s{seed}.json"
            scratch = json.loads(joint.read_text()) if joint.is_file() else {}
            if scratch.get("steps") == args.steps:  # the same number of optimiser steps as the r2SCAN-only model
                test = scratch["test"]["R2SCAN"]  # the runner's names → metrics.json's, as the other rows
                runs["joint_from_scratch"] = {
                    "energy_mae_meV_per_atom": test["mae_meV_per_atom"],
                    "forces_mae_meV_per_A": test["forces_mae_meV_per_A"],
                }
            print(f"n = {n}, seed {seed}: done", flush=True)

    results["settings"] = {
        "model": MODEL,
        "loss": LOSS,
        "train": TRAIN,
        "steps": args.steps,
        "extend_steps": args.extend_steps,
        "modes": MODES,
        "ns": args.ns,
        "seeds": args.seeds,
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    OUT.mkdir(exist_ok=True)
    text = json.dumps(results, indent=2).replace(str(ROOT) + "/", "")  # paths relative to the repository
    (OUT / "results.json").write_text(text + "\n")
    print(table(results))


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.1f}" if values else "—"


def _cell(values: list[float], seeds: int) -> str:
    """The mean, saying over how many seeds when some are missing (e.g. the joint curve ran fewer)."""
    return _mean(values) + (f" ({len(values)} of {seeds} seeds)" if 0 < len(values) < seeds else "")


def table(results: dict) -> str:
    """Markdown tables per metric: r2SCAN test errors per n (mean over seeds), the PBE test errors after each
    extension (before: the PBE model's), and the CPU seconds."""
    pbe = results["pbe_model"]["metrics"]["fidelities"]["PBE"]
    ns = results["settings"]["ns"]
    by_n = {n: [r for r in results["runs"].values() if r["n"] == n] for n in ns}
    rows_of = {
        "r2SCAN only": lambda r: r["r2scan_only"]["metrics"]["fidelities"]["R2SCAN"],
        "joint from scratch (results/solids)": lambda r: r.get("joint_from_scratch"),
        **{
            f"extend {m.replace('_', ' + ')}": (lambda r, m=m: r[f"extend_{m}"]["metrics"]["fidelities"]["R2SCAN"])
            for m in MODES
        },
    }
    out = []
    for key, title in (
        ("energy_mae_meV_per_atom", "r2SCAN energy MAE, meV/atom"),
        ("forces_mae_meV_per_A", "r2SCAN force MAE, meV/Å"),
    ):
        out += [
            f"**{title}** (test, mean over seeds {results['settings']['seeds']})",
            "",
            "| model | " + " | ".join(f"n = {n}" for n in ns) + " |",
            "|---|" + "---|" * len(ns),
        ]
        for label, get in rows_of.items():
            cells = [_cell([get(r)[key] for r in by_n[n] if get(r) is not None], len(by_n[n])) for n in ns]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "**Forgetting**: PBE test errors after the extension (mean over seeds; before: "
        f"{pbe['energy_mae_meV_per_atom']:.2f} meV/atom, {pbe['forces_mae_meV_per_A']:.1f} meV/Å)",
        "",
        "| mode | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for m in MODES:
        cells = []
        for n in ns:
            after = [r[f"extend_{m}"]["metrics"]["forgetting"]["PBE"]["after"] for r in by_n[n]]
            e = _mean([a["energy_mae_meV_per_atom"] for a in after])
            f = _mean([a["forces_mae_meV_per_A"] for a in after])
            cells.append(f"{e} / {f}")
        out.append(f"| {m.replace('_', ' + ')} | " + " | ".join(cells) + " |")
    cpu = sum(
        x["cpu_seconds"]
        for r in results["runs"].values()
        for k, x in r.items()
        if isinstance(x, dict) and "cpu_seconds" in x
    )
    out.append(
        f"\nPBE model ({results['settings']['steps']} steps, {results['pbe_model']['cpu_seconds']:.0f} CPU s); "
        f"extensions and r2SCAN-only models: {cpu:.0f} CPU s in total."
    )
    return "\n".join(out)


if __name__ == "__main__":
    main()
