"""Single-fidelity accuracy of multifi's M3GNet next to matgl's (cross-check).

    python bench/matgl_accuracy.py [--epochs 40] [--seeds 0 1] [--write-results]

Both models train on the same PBE solids (../shared/data/solids/PBE.jsonl.gz, MatPES schema) with the
same split by structure (seeded: 10 % test, 10 % validation, the rest training), the same hyperparameters
and the same per-element reference energies, and are tested on the same held-out structures: energy
MAE (meV/atom), force MAE (meV/Å, per component), stress MAE (GPa, per component).

- multifi (this interpreter): `multifi.train.run.train` with backbone m3gnet, inject single.
- matgl (its own venv, bench/.venv-peers-matgl; created if missing with `python -m venv` and
  `pip install -c constraints.txt torch==2.13.0 matgl`): this script again with `--side matgl`, HOME
  pointed at a scratch folder (importing matgl writes ~/.cache/matgl). matgl's training path as in
  shared/PEERS.md: Atoms2Graph(5 Å) → MGLDataset → MGLDataLoader(collate_fn=collate_fn_pes) →
  PotentialLightningModule(M3GNet(is_intensive=False)) → Lightning fit.

Matched settings: 64 features (node, edge, hidden units), 3 blocks, cutoff 5 Å, three-body cutoff 4 Å,
max_n = max_l = 3 (multifi: 9 two-body radial functions, the width of matgl's default two-body basis);
batch 32; Adam(W) without weight decay, lr 1e-3 with cosine decay to 1 % over the run (matgl: per
epoch, multifi: per step), no warm-up, gradient clipping at 10, no EMA; Huber loss (δ = 0.1) on
per-atom energy (weight 10), forces (1) and stress (0.01, GPa, ASE sign = matgl's "compressive
negative"); the same per-element reference energies (least squares on the training compositions)
and the same output scale (standard deviation of the per-atom residual) on both sides; validation
every epoch, the checkpoint with the lowest validation loss is tested. 1 torch thread each.
Remaining differences are architectural (see src/multifi/models/m3gnet.py): multifi's smooth Bessel
two-body basis, three-body radial basis scaled to the three-body cutoff, and a smaller readout MLP
(267 k vs 288 k parameters, bench/m3gnet_params.py).

--write-results replaces the section "## M3GNet accuracy vs matgl" of bench/RESULTS.md (or appends
it) and leaves every other section alone; numbers also go to bench/results/matgl_accuracy.json.
--from-json FILE [--also FILE …] rewrites that section from saved numbers without training (--also:
further runs, e.g. longer training, as extra tables); --json FILE saves a run's numbers elsewhere.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOLIDS = ROOT.parent / "shared" / "data" / "solids" / "PBE.jsonl.gz"
MATGL_VENV = HERE / ".venv-peers-matgl"
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_JSON = HERE / "results" / "matgl_accuracy.json"
SECTION = "## M3GNet accuracy vs matgl"
SPLIT_SEED = 2025
SETTINGS = {
    "features": 64,
    "interactions": 3,
    "cutoff": 5.0,
    "threebody_cutoff": 4.0,
    "max_n": 3,
    "max_l": 3,
    "batch_size": 32,
    "lr": 1e-3,
    "min_lr_ratio": 0.01,
    "grad_clip": 10.0,
    "huber_delta": 0.1,
    "w_energy": 10.0,
    "w_forces": 1.0,
    "w_stress": 0.01,
}


# ---------------------------------------------------------------------------------------------- data
def read_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def structure(rec: dict):
    """(symbols, positions Å, cell Å) of a MatPES record."""
    st = rec["structure"]
    symbols = [s["species"][0]["element"] for s in st["sites"]]
    return symbols, [s["xyz"] for s in st["sites"]], st["lattice"]["matrix"]


def stress_gpa(voigt_kbar) -> list[list[float]]:
    """The shared solids' stress (xx yy zz xy yz zx, VASP's order as their README says; kBar, VASP sign) → 3×3 GPa
    with ASE's sign (−0.1 ×)."""
    xx, yy, zz, xy, yz, zx = (-0.1 * v for v in voigt_kbar)
    return [[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]]


def make_split(records: list[dict]) -> dict:
    """Seeded split by structure (matpes_id), plus reference energies and scale fitted on the training set."""
    import numpy as np
    from ase.data import atomic_numbers

    ids = [r["matpes_id"] for r in records]
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(ids))
    n_test = n_val = int(round(0.1 * len(ids)))
    split = {
        "test": sorted(ids[i] for i in perm[:n_test]),
        "val": sorted(ids[i] for i in perm[n_test : n_test + n_val]),
        "train": sorted(ids[i] for i in perm[n_test + n_val :]),
    }
    elements = sorted({s for r in records for s in structure(r)[0]}, key=lambda s: atomic_numbers[s])
    train = [r for r in records if r["matpes_id"] in set(split["train"])]
    X = np.array([[structure(r)[0].count(e) for e in elements] for r in train], dtype=float)
    y = np.array([r["energy"] for r in train])
    ref, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = (y - X @ ref) / X.sum(1)
    split.update(elements=elements, element_refs=ref.tolist(), scale=float(resid.std()))
    return split


# ---------------------------------------------------------------------------------------------- multifi side
def multifi_side(split: dict, epochs: int, seed: int, scratch: Path, threads: int) -> dict:
    import torch

    from multifi.config import validate_config
    from multifi.models.registry import load_potential
    from multifi.train import run as train_run

    torch.set_num_threads(threads)
    files = {}
    for name in ("train", "val", "test"):
        files[name] = str(scratch / f"{name}.keys")
        Path(files[name]).write_text("".join(f"matpes:{i}\n" for i in split[name]))
    s = SETTINGS
    run_dir = scratch / f"multifi_s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = validate_config(
        {
            "data": {
                "sources": [{"path": str(SOLIDS), "stress_order": "vasp"}],
                "split": {"files": files},
                "cache": False,
            },
            "model": {
                "backbone": "m3gnet",
                "features": s["features"],
                "interactions": s["interactions"],
                "cutoff": s["cutoff"],
                "threebody_cutoff": s["threebody_cutoff"],
                "max_n": s["max_n"],
                "max_l": s["max_l"],
                "n_rbf": s["max_n"] * s["max_l"],
                "fidelity_embedding": {"inject": "single", "dim": 4},
            },
            "loss": {
                "energy": s["w_energy"],
                "forces": s["w_forces"],
                "stress": s["w_stress"],
                "kind": "huber",
                "huber_delta": s["huber_delta"],
            },
            "train": {
                "epochs": epochs,
                "batch_size": s["batch_size"],
                "lr": s["lr"],
                "warmup_steps": 0,
                "schedule": "cosine",
                "min_lr_ratio": s["min_lr_ratio"],
                "grad_clip": s["grad_clip"],
                "ema_decay": 0.0,
                "early_stopping_patience": None,
                "seed": seed,
                "threads": threads,
                "progress": False,
                "accelerator": "cpu",
            },
            "output_dir": str(run_dir),
        },
        where="bench multifi side",
    )
    t0, c0 = time.time(), time.process_time()
    train_run.train(cfg)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    from ase.data import atomic_numbers

    # the reference energies multifi fits itself (pooled least squares on the training compositions, kept
    # in the saved model's head) are the ones handed to matgl: check they agree
    pot = load_potential(run_dir / "model.pt")
    ours = [float(pot.head.ref[atomic_numbers[e], 0]) for e in split["elements"]]
    ref_gap = max(abs(a - b) for a, b in zip(ours, split["element_refs"]))
    (m,) = json.loads((run_dir / "metrics.json").read_text())["fidelities"].values()
    params = sum(p.numel() for p in pot.parameters())
    import csv

    with open(run_dir / "metrics.csv") as f:
        history = [round(float(r["val_loss"]), 5) for r in csv.DictReader(f) if r.get("val_loss")]
    return {
        "energy_mae_meV_per_atom": m["energy_mae_meV_per_atom"],
        "forces_mae_meV_per_A": m["forces_mae_meV_per_A"],
        "stress_mae_GPa": m["stress_mae_GPa"],
        "n_test": m["n"],
        "wall_s": round(seconds, 1),
        "cpu_s": round(cpu, 1),
        "params": params,
        "scale": float(pot.head.scale[0]),
        "max_ref_difference_eV": ref_gap,
        "best_val_loss": min(history),
        "val_loss_per_epoch": history,
    }


# ---------------------------------------------------------------------------------------------- matgl side
def matgl_side(split: dict, epochs: int, seed: int, scratch: Path, threads: int, options: dict | None = None) -> dict:
    import logging
    import warnings
    from functools import partial

    import lightning.pytorch as pl
    import numpy as np
    import torch
    from ase import Atoms
    from matgl.ext.ase import Atoms2Graph
    from matgl.graph.data import MGLDataLoader, MGLDataset, collate_fn_pes
    from matgl.models import M3GNet
    from matgl.utils.training import PotentialLightningModule
    from torch.utils.data import Subset

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    pl.seed_everything(seed, verbose=False)
    s = SETTINGS
    records = read_records(SOLIDS)
    frames, labels = [], {"energies": [], "forces": [], "stresses": []}
    for r in records:
        symbols, positions, cell = structure(r)
        frames.append(Atoms(symbols=symbols, positions=positions, cell=cell, pbc=True))
        labels["energies"].append(r["energy"])
        labels["forces"].append(np.asarray(r["forces"], dtype=float))
        labels["stresses"].append(np.asarray(stress_gpa(r["stress"]), dtype=float))
    elements = tuple(split["elements"])
    root = scratch / f"mgl_s{seed}"
    data = MGLDataset(
        structures=frames,
        converter=Atoms2Graph(elements, cutoff=s["cutoff"]),
        labels=labels,
        root=str(root),
        save_cache=False,
        clear_processed=False,
    )
    where = {r["matpes_id"]: i for i, r in enumerate(records)}
    subsets = {k: Subset(data, [where[i] for i in split[k]]) for k in ("train", "val", "test")}
    collate = partial(collate_fn_pes, include_line_graph=False, include_stress=True)
    train_loader, val_loader, test_loader = MGLDataLoader(
        train_data=subsets["train"],
        val_data=subsets["val"],
        test_data=subsets["test"],
        collate_fn=collate,
        batch_size=s["batch_size"],
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    net = M3GNet(
        element_types=elements,
        is_intensive=False,
        dim_node_embedding=s["features"],
        dim_edge_embedding=s["features"],
        units=s["features"],
        nblocks=s["interactions"],
        cutoff=s["cutoff"],
        threebody_cutoff=s["threebody_cutoff"],
        max_n=s["max_n"],
        max_l=s["max_l"],
        **(options or {}),
    )
    lit = PotentialLightningModule(
        model=net,
        element_refs=np.asarray(split["element_refs"]),
        data_std=split["scale"],
        data_mean=0.0,
        energy_weight=s["w_energy"],
        force_weight=s["w_forces"],
        stress_weight=s["w_stress"],
        loss="huber_loss",
        loss_params={"delta": s["huber_delta"]},
        lr=s["lr"],
        decay_steps=epochs,
        decay_alpha=s["min_lr_ratio"],
    )

    class KeepBest(pl.Callback):  # the weights of the epoch with the lowest validation loss
        best, state = float("inf"), None
        history: list = []

        def on_validation_epoch_end(self, trainer, module):
            loss = float(trainer.callback_metrics["val_Total_Loss"])
            self.history.append(round(loss, 5))
            if loss < self.best:
                self.best = loss
                self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    keep = KeepBest()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[keep],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        inference_mode=False,
        gradient_clip_val=s["grad_clip"],
        precision=32,
        default_root_dir=str(scratch),
    )
    t0, c0 = time.time(), time.process_time()
    trainer.fit(lit, train_dataloaders=train_loader, val_dataloaders=val_loader)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    lit.load_state_dict(keep.state)
    pot = lit.model.eval()
    e_err, f_err, s_err, n = [], [], [], 0
    for g, lat, state, e, f, st in test_loader:
        pe, pf, ps, _ = pot(g=g, lat=lat, state_attr=state)
        atoms = torch.bincount(g.batch).double()
        e_err.append(((pe.detach().double() - e.double()).abs() / atoms).numpy())
        f_err.append((pf.detach() - f).abs().reshape(-1).numpy())
        s_err.append((ps.detach() - st).abs().reshape(-1).numpy())
        n += len(e)
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return {
        "energy_mae_meV_per_atom": 1000 * float(np.concatenate(e_err).mean()),
        "forces_mae_meV_per_A": 1000 * float(np.concatenate(f_err).mean()),
        "stress_mae_GPa": float(np.concatenate(s_err).mean()),
        "n_test": n,
        "wall_s": round(seconds, 1),
        "cpu_s": round(cpu, 1),
        "params": sum(p.numel() for p in net.parameters()),
        "best_val_loss": keep.best,
        "val_loss_per_epoch": keep.history,
        "options": options or {},
    }


def run_matgl(
    python: Path, split_file: Path, epochs: int, seed: int, scratch: Path, threads: int, options: dict | None = None
) -> dict:
    home = scratch / "home"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(python),
        __file__,
        "--side",
        "matgl",
        "--split",
        str(split_file),
        "--epochs",
        str(epochs),
        "--seeds",
        str(seed),
        "--scratch",
        str(scratch),
        "--threads",
        str(threads),
        "--matgl-options",
        json.dumps(options or {}),
    ]
    env = {**os.environ, "HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"matgl side failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def ensure_matgl_venv() -> Path:
    python = MATGL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MATGL_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "torch==2.13.0", "matgl"],
            check=True,
        )
    return python


# ---------------------------------------------------------------------------------------------- report
def versions(python: Path) -> dict:
    code = (
        "import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
        "('matgl', 'torch', 'torch_geometric', 'lightning')}))"
    )
    res = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env={**os.environ, "HOME": tempfile.gettempdir()}
    )
    return json.loads(res.stdout) if res.returncode == 0 else {}


def sides_of(result: dict) -> list[str]:
    return [k for k in result["runs"][0] if k != "seed"]


def label_of(side: str) -> str:
    if side == "multifi":
        return "multifi M3GNet"
    if side == "matgl":
        return "matgl M3GNet"
    return f"matgl M3GNet, {', '.join(f'{k}={v}' for k, v in json.loads(side[len('matgl ') :]).items())}"


def table(result: dict) -> list[str]:
    import numpy as np

    sides = sides_of(result)
    rows = []
    keys = [
        ("energy_mae_meV_per_atom", "energy MAE (meV/atom)", 1),
        ("forces_mae_meV_per_A", "force MAE (meV/Å)", 0),
        ("stress_mae_GPa", "stress MAE (GPa)", 1),
        ("best_val_loss", "best validation loss", 4),
        ("cpu_s", "training CPU time (s)", 0),
        ("params", "parameters", 0),
    ]
    for key, label, digits in keys:
        cells = []
        for side in sides:
            vals = np.array([r[side].get(key, np.nan) for r in result["runs"]], dtype=float)
            text = f"{vals.mean():,.{digits}f}"
            if len(vals) > 1 and key not in ("params",):
                text += f" ± {vals.std(ddof=1):,.{digits}f}"
            cells.append(text)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return ["| test set | " + " | ".join(label_of(x) for x in sides) + " |", "|---|" + "---|" * len(sides), *rows]


def markdown(result: dict, also: list[dict] = ()) -> str:
    seeds = ", ".join(str(r["seed"]) for r in result["runs"])
    sp = result["split"]
    v = result.get("versions", {})
    lines = [
        SECTION,
        "",
        f"Single-fidelity M3GNet on the PBE solids (`../shared/data/solids/PBE.jsonl.gz`, {sp['n_structures']} "
        f"structures of 1-4 atoms): the same split by structure ({sp['train']} train / {sp['val']} validation / "
        f"{sp['test']} test, seed {SPLIT_SEED}), the same hyperparameters and reference energies, tested on the "
        f"same {sp['test']} held-out structures; {result['epochs']} epochs, seeds {seeds} "
        "(mean ± sample std over seeds).",
        "",
        "```",
        result["command"],
        "```",
        "",
        *table(result),
        "",
        f"Settings: {SETTINGS['features']} features, {SETTINGS['interactions']} blocks, cutoffs "
        f"{SETTINGS['cutoff']} / {SETTINGS['threebody_cutoff']} Å, max_n = max_l = 3; batch {SETTINGS['batch_size']}; "
        f"Adam lr {SETTINGS['lr']:g} with cosine decay to 1 %, no warm-up, gradient clip {SETTINGS['grad_clip']:g}, "
        f"no EMA; Huber loss (δ = {SETTINGS['huber_delta']}) with weights energy {SETTINGS['w_energy']:g} "
        f"(eV/atom), forces {SETTINGS['w_forces']:g} (eV/Å), stress {SETTINGS['w_stress']:g} (GPa); the same "
        "per-element reference energies (least squares on the training compositions) and output scale; the "
        "epoch with the lowest validation loss is tested. Force and stress MAE per component. 1 torch thread "
        "each, on the shared 2-core machine while other jobs ran (CPU times are indicative only). With this "
        "loss the stress term is almost inert (Huber's linear branch at GPa-sized errors times weight 0.01): "
        "a model predicting zero stress has a test stress MAE of about 15 GPa, so neither side fits stress.",
        f"Versions: matgl {v.get('matgl', '?')}, torch-geometric {v.get('torch_geometric', '?')}, torch "
        f"{v.get('torch', '?')}; multifi at `{result['multifi_commit']}`. Numbers (with the validation loss of "
        "every epoch): `bench/results/matgl_accuracy.json`.",
        "",
    ]
    lines += [result["verdict"], "", plateau(result), ""]
    for extra in also:
        lines += [
            f"Longer training: {extra['epochs']} epochs, seed(s) "
            f"{', '.join(str(r['seed']) for r in extra['runs'])}, otherwise the same (`{extra['command']}`):",
            "",
            *table(extra),
            "",
            extra.get("verdict") or verdict(extra),
            "",
            plateau(extra),
            "",
        ]
    return "\n".join(lines)


def plateau(result: dict) -> str:
    """How long each side's validation loss stayed near its first value (per-epoch history, first seed)."""
    parts = []
    for side in sides_of(result):
        h = result["runs"][0][side].get("val_loss_per_epoch")
        if h:
            k = next((i for i, v in enumerate(h) if v < 0.9 * h[0]), None)
            parts.append(f"{label_of(side)} {'never' if k is None else k + 1}")
    return (
        (
            "Epochs until the validation loss first fell 10 % below its first-epoch value (seed "
            f"{result['runs'][0]['seed']}): " + ", ".join(parts) + "."
        )
        if parts
        else ""
    )


def verdict(result: dict) -> str:
    import numpy as np

    def mean(side, key):
        return float(np.mean([r[side][key] for r in result["runs"]]))

    out = []
    for side in sides_of(result)[1:]:
        parts = [
            f"{label} {mean('multifi', key) / mean(side, key):.2f}"
            for key, label in (
                ("energy_mae_meV_per_atom", "energy"),
                ("forces_mae_meV_per_A", "forces"),
                ("stress_mae_GPa", "stress"),
            )
        ]
        out.append(f"test MAE ratio multifi / {label_of(side)}: " + ", ".join(parts))
    return "**Result:** " + "; ".join(out) + "."


def write_section(text: str, path: Path = RESULTS_MD) -> None:
    """Replace our section of RESULTS.md (from its heading to the next '## ' heading), or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["both", "multifi", "matgl"], default="both")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch", type=Path, default=HERE / ".scratch" / "matgl_accuracy")
    ap.add_argument("--split", type=Path, help="(internal) split file written by the driver")
    ap.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md and the JSON")
    ap.add_argument("--from-json", type=Path, help="only rewrite the RESULTS.md section from these saved numbers")
    ap.add_argument("--also", type=Path, nargs="*", default=[], help="with --from-json: more saved runs (extra tables)")
    ap.add_argument("--json", type=Path, help="save this run's numbers here (without touching RESULTS.md)")
    ap.add_argument(
        "--matgl-options",
        type=json.loads,
        default={},
        help="extra M3GNet constructor arguments for matgl, JSON (e.g. '{\"use_smooth\": true}')",
    )
    ap.add_argument(
        "--extra-matgl",
        type=json.loads,
        action="append",
        default=[],
        help="also train matgl with these constructor arguments (JSON; repeatable), as extra columns",
    )
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if args.from_json.resolve() != RESULTS_JSON.resolve():
            RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
            RESULTS_JSON.write_text(json.dumps(result, indent=1))
        write_section(markdown(result, [json.loads(p.read_text()) for p in args.also]))
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.side == "matgl":
        split = json.loads(args.split.read_text())
        for seed in args.seeds:
            print(
                "RESULT "
                + json.dumps(matgl_side(split, args.epochs, seed, args.scratch, args.threads, args.matgl_options)),
                flush=True,
            )
        return

    records = read_records(SOLIDS)
    split = make_split(records)
    split_file = args.scratch / "split.json"
    split_file.write_text(json.dumps(split))
    python = ensure_matgl_venv() if args.side == "both" else None
    runs = []
    for seed in args.seeds:
        run = {"seed": seed}
        seed_dir = args.scratch / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        if args.side in ("both", "multifi"):
            run["multifi"] = multifi_side(split, args.epochs, seed, seed_dir, args.threads)
            print(f"seed {seed} multifi: {json.dumps(run['multifi'])}", flush=True)
        if python is not None:
            run["matgl"] = run_matgl(python, split_file, args.epochs, seed, seed_dir, args.threads)
            print(f"seed {seed} matgl: {json.dumps(run['matgl'])}", flush=True)
            for options in args.extra_matgl:
                key = "matgl " + json.dumps(options, sort_keys=True)
                run[key] = run_matgl(python, split_file, args.epochs, seed, seed_dir, args.threads, options)
                print(f"seed {seed} {key}: {json.dumps(run[key])}", flush=True)
        runs.append(run)
    command = (
        "python bench/matgl_accuracy.py"
        + (f" --epochs {args.epochs}" if args.epochs != 40 else "")
        + (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds != [0] else "")
        + "".join(f" --extra-matgl '{json.dumps(o)}'" for o in args.extra_matgl)
        + (f" --json {args.json}" if args.json else "")
        + (" --write-results" if args.write_results else "")
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "epochs": args.epochs,
        "runs": runs,
        "settings": SETTINGS,
        "command": command,
        "split": {
            "n_structures": len(records),
            **{k: len(split[k]) for k in ("train", "val", "test")},
            "seed": SPLIT_SEED,
        },
        "versions": versions(python) if python else {},
        "multifi_commit": commit,
    }
    if args.side == "both":
        result["verdict"] = verdict(result)
        text = markdown(result)
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
        if args.write_results:
            RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
            RESULTS_JSON.write_text(json.dumps(result, indent=1))
            write_section(text)


if __name__ == "__main__":
    main()
