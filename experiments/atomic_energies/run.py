"""An element without labels at the top fidelity: least-squares reference energies (F's B3LYP reference estimated
from the other fidelity) against atomic energies (`data.atomic_energies`: free-atom energies at both fidelities).

QM9. Top fidelity B3LYP/6-31G(2df,p) (QM9's own level) on N_TOP molecules without fluorine; low fidelity HF/3-21G
on every molecule of its block and pool (../shared/data/qm9mf; fluorinated ones included). Test at B3LYP: TEST_F
fluorinated and TEST_PLAIN F-free molecules in no training set; validation: VAL F-free molecules (the run has no
B3LYP label with F, so nothing fluorinated can validate at B3LYP). PaiNN 64×3, embedding at input and readout, the
same steps, seeds and split for both variants. Free-atom energies: B3LYP/6-31G(2df,p) from QM9's atomref table
(U0 of the atoms, Hartree), HF/3-21G from atoms_HF_3-21G.yaml (free_atoms.py, PySCF as the labels).

    .venv/bin/python experiments/atomic_energies/run.py [--steps 6000] [--seeds 0 1] [--out results/atomic_energies]

Resumable: a finished run (model.pt) is skipped, an unfinished one resumes from its last checkpoint; the report
(results/atomic_energies/README.md, summary.json) is rewritten from every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / ".." / "shared" / "data" / "qm9mf"
OUT = ROOT / "results" / "atomic_energies"
TOP, LOW = "B3LYP/6-31G(2df,p)", "HF/3-21G"
HARTREE_EV = 27.211386245988
#: QM9's atomref (figshare 1057643): U0 of the free atoms at B3LYP/6-31G(2df,p), Hartree
QM9_ATOMREF = {"H": -0.500273, "C": -37.846772, "N": -54.583861, "O": -75.064579, "F": -99.718730}
N_TOP, VAL, TEST_F, TEST_PLAIN = 1000, 500, 400, 1000
VARIANTS = ("least_squares", "atomic")


def choose(seed: int = 2026) -> dict:
    """QM9 indices of each role (fixed for every run)."""
    from multifi.data.readers.qm9 import load_qm9_geometries, read_label_table

    g = load_qm9_geometries()
    index, offsets = np.asarray(g.index), np.asarray(g.offsets)
    has_f = np.add.reduceat((np.asarray(g.numbers) == 9).astype(np.int64), offsets[:-1]) > 0
    low = np.concatenate([read_label_table(p).index for p in low_tables()])
    free = ~np.isin(index, low)  # molecules without a low-fidelity label
    rng = np.random.default_rng(seed)
    plain = rng.permutation(index[free & ~has_f])
    fluorinated = rng.permutation(index[free & has_f])
    roles = {
        "top_train": plain[:N_TOP],
        "val": plain[N_TOP : N_TOP + VAL],
        "test_plain": plain[N_TOP + VAL : N_TOP + VAL + TEST_PLAIN],
        "test_f": fluorinated[:TEST_F],
        "low": np.unique(low),
    }
    return {k: np.sort(v).astype(int).tolist() for k, v in roles.items()}


def low_tables() -> list[Path]:
    return [SHARED / "HF_3-21G.csv.gz", SHARED / "pool" / "HF_3-21G.csv.gz"]


def atomic_energies() -> dict:
    low = yaml.safe_load((Path(__file__).with_name("atoms_HF_3-21G.yaml")).read_text())
    return {TOP: {k: v * HARTREE_EV for k, v in QM9_ATOMREF.items()}, LOW: {k: float(v) for k, v in low.items()}}


def write_inputs(work: Path, roles: dict) -> None:
    """Index files, split files and the test molecules (extxyz with their B3LYP energies) in `work`."""
    if (work / "test_plain.extxyz").exists():
        return
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from multifi.data.readers.qm9 import load_qm9_geometries

    work.mkdir(parents=True, exist_ok=True)
    (work / "top.txt").write_text("\n".join(map(str, roles["top_train"] + roles["val"])) + "\n")
    (work / "train.txt").write_text("\n".join(map(str, roles["top_train"] + roles["low"])) + "\n")
    (work / "val.txt").write_text("\n".join(map(str, roles["val"])) + "\n")
    g = load_qm9_geometries()
    row = {int(i): r for r, i in enumerate(np.asarray(g.index))}
    for name in ("test_f", "test_plain"):
        frames = []
        for i in roles[name]:
            r = row[i]
            a = Atoms(
                numbers=g.numbers[g.offsets[r] : g.offsets[r + 1]],
                positions=g.positions[g.offsets[r] : g.offsets[r + 1]],
            )
            a.calc = SinglePointCalculator(a, energy=float(g.energy[r]))
            a.info["key"] = f"qm9:{i}"
            frames.append(a)
        ase.io.write(work / f"{name}.extxyz", frames, format="extxyz")


def config(work: Path, variant: str, seed: int, steps: int) -> Path:
    data = {
        "sources": [{"qm9": {"labels": str(p)}} for p in low_tables()] + [{"qm9": {"indices": str(work / "top.txt")}}],
        "split": {"files": {"train": str(work / "train.txt"), "val": str(work / "val.txt")}},
    }
    if variant == "atomic":
        data["atomic_energies"] = atomic_energies()
    raw = {
        "data": data,
        "model": {"backbone": "painn", "features": 64, "interactions": 3, "cutoff": 5.0},
        "train": {
            "max_steps": steps,
            "batch_size": 32,
            "lr": 1e-3,
            "warmup_steps": 200,
            "schedule": "cosine",
            "seed": seed,
            "threads": 1,
            "progress": False,
            "fidelity_sampling": {TOP: 0.5, LOW: 0.5},
            "monitor": TOP,
            "checkpoint_every_n_steps": 500,
        },
        "output_dir": str(work / "runs" / f"{variant}_s{seed}"),
    }
    path = work / "configs" / f"{variant}_s{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train(cfg: Path, run: Path) -> None:
    if (run / "model.pt").exists():
        return
    resume = ["--resume"] if (run / "checkpoints").exists() and any((run / "checkpoints").glob("*.ckpt")) else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "multifi.cli.main", "train", str(cfg), *resume], check=True, env=env)


def test_errors(run: Path, work: Path) -> dict:
    """B3LYP energy MAE (meV) of the run's model on each test set, and per F atom on the fluorinated one."""
    import ase.io

    from multifi.models.registry import load_potential
    from multifi.predict import predict_atoms

    pot = load_potential(run / "model.pt")
    out = {}
    for name in ("test_f", "test_plain"):
        frames = ase.io.read(work / f"{name}.extxyz", ":")
        predicted = np.asarray(predict_atoms(pot, frames, TOP, forces=False)[0])
        error = predicted - np.array([a.get_potential_energy() for a in frames])
        out[f"{name}_mae_meV"] = float(1000 * np.abs(error).mean())
        out[f"{name}_mean_error_meV"] = float(1000 * error.mean())
        if name == "test_f":
            n_f = np.array([(a.numbers == 9).sum() for a in frames])
            out["test_f_mae_meV_per_F"] = float(1000 * np.abs(error / n_f).mean())
    return out


def reference_estimates(roles: dict) -> dict:
    """F's B3LYP reference (eV per atom) as the runs' training labels estimate it, against the least-squares fit of
    B3LYP labels that do hold F: fluorinated QM9 molecules in no test, validation or low-fidelity set, with the
    training molecules. Two estimates from the shift model (data.stats): of total references (multifi's default)
    and of binding energies (reference minus atomic energy, then plus F's B3LYP atomic energy)."""
    from ase.data import atomic_numbers

    from multifi.data.dataset import FidelityDataset
    from multifi.data.readers.qm9 import load_qm9_geometries, read_label_table
    from multifi.data.split import labelled_pairs
    from multifi.data.stats import N_ELEMENTS, fit_references, shared_estimates_with_error

    g = load_qm9_geometries()
    index, offsets, numbers = np.asarray(g.index), np.asarray(g.offsets), np.asarray(g.numbers)
    row = {int(i): r for r, i in enumerate(index)}
    has_f = np.add.reduceat((numbers == 9).astype(np.int64), offsets[:-1]) > 0
    held = set(roles["test_f"]) | set(roles["test_plain"]) | set(roles["val"]) | set(roles["low"])
    other_f = [int(i) for i in index[has_f] if int(i) not in held]

    def record(i, labels):
        r = row[i]
        return {"numbers": numbers[offsets[r] : offsets[r + 1]], "positions": g.positions[offsets[r] : offsets[r + 1]],
                "labels": labels, "key": f"qm9:{i}"}  # fmt: skip

    low = {}
    for path in low_tables():
        t = read_label_table(path)
        low.update(zip(t.index.tolist(), t.energy.tolist()))
    top = lambda i: {TOP: {"energy": float(g.energy[row[i]])}}  # noqa: E731
    ds = FidelityDataset.from_records([record(i, {LOW: {"energy": e}}) for i, e in low.items()]
                                      + [record(i, top(i)) for i in roles["top_train"]])  # fmt: skip
    refs = fit_references(ds, labelled_pairs(ds, np.arange(len(ds))))
    truth_ds = FidelityDataset.from_records([record(i, top(i)) for i in roles["top_train"] + other_f])
    truth = fit_references(truth_ds, labelled_pairs(truth_ds, np.arange(len(truth_ds)))).ref[9, 0]
    atomic = np.full((N_ELEMENTS, len(ds.fidelities)), np.nan)
    for name, table in atomic_energies().items():
        for symbol, e in table.items():
            atomic[atomic_numbers[symbol], ds.fidelities.index(name)] = e
    k = ds.fidelities.index(TOP)
    binding = np.where(refs.fitted, refs.ref - np.nan_to_num(atomic), 0.0)
    prior, loo = shared_estimates_with_error(binding, refs.fitted)
    return {
        "fluorinated_molecules_fitted": len(other_f),
        "F_B3LYP_reference_fitted_eV": float(truth),
        "total_estimate_error_eV": float(refs.ref[9, k] - truth),
        "total_estimate_loo_eV": float(refs.spread[k]),
        "binding_estimate_error_eV": float(prior[9, k] + atomic[9, k] - truth),
        "binding_estimate_loo_eV": float(loo[k]),
    }


def _result_text(results: dict, seeds: list[int]) -> str:
    runs = {v: [results[f"{v}_s{s}"] for s in seeds if f"{v}_s{s}" in results] for v in VARIANTS}
    if not all(runs.values()):
        return ""
    mean = lambda v, key: float(np.mean([r[key] for r in runs[v]]))  # noqa: E731
    per_seed = ", ".join(f"{r['test_f_mae_meV']:.0f}" for r in runs["atomic"])
    return f"""
**Result:** atomic references give {mean("least_squares", "test_f_mae_meV") / mean("atomic", "test_f_mae_meV"):.1f}×
lower errors on the fluorinated molecules ({mean("atomic", "test_f_mae_meV"):.0f} against
{mean("least_squares", "test_f_mae_meV"):.0f} meV; per seed {per_seed}: the network's F environments at B3LYP are
learnt at HF/3-21G only) and {mean("atomic", "test_plain_mae_meV") / mean("least_squares", "test_plain_mae_meV"):.2f}×
the error on the F-free ones ({mean("atomic", "test_plain_mae_meV"):.0f} against
{mean("least_squares", "test_plain_mae_meV"):.0f} meV): the network carries each element's whole binding energy
there (see the other lengths' reports for how the ratio moves with training length).
"""


def _estimates_text(r: dict | None) -> str:
    if not r:
        return ""
    return f"""
**F's B3LYP reference as estimated** (no run label holds F at B3LYP): against the least-squares reference of the
B3LYP labels of {r["fluorinated_molecules_fitted"]} fluorinated QM9 molecules in no test, validation or HF/3-21G set
({r["F_B3LYP_reference_fitted_eV"]:.2f} eV), multifi's estimate from the total references is off by
{r["total_estimate_error_eV"]:+.2f} eV (its leave-one-out error {r["total_estimate_loo_eV"]:.2f} eV); the same shift
model on binding energies (reference minus atomic energy) is off by {r["binding_estimate_error_eV"]:+.2f} eV while its
leave-one-out error claims {r["binding_estimate_loo_eV"]:.2f} eV: binding energies of HF/3-21G and B3LYP differ by
element in no smooth way (HF lacks correlation), so estimating references from them is no better here, and
overconfident.
"""


def _tried_text(results: dict) -> str:
    runs = [results[k] for k in sorted(results) if k.startswith("atomic_estimates_s")]
    if not runs:
        return ""
    mean = lambda key: np.mean([r[key] for r in runs])  # noqa: E731
    return f"""
**Tried, not kept** (`data.atomic_energies_use: estimates` at commit 037ef74: least-squares references kept, F's
B3LYP reference its atomic energy plus a binding energy estimated by the shift model; the same command, {len(runs)}
seeds, kept in `summary.json` as `atomic_estimates_s*`): fluorinated MAE {mean("test_f_mae_meV"):.0f} meV
({mean("test_f_mae_meV_per_F"):.0f} per F atom), F-free {mean("test_plain_mae_meV"):.0f} meV (the least-squares
model's, bit for bit: the same references wherever labels hold them): worse than least squares on the fluorinated
molecules, as the reference estimate above says; the setting was removed.
"""


def report(out: Path, results: dict, steps: int, seeds: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    where = "" if out.resolve() == OUT.resolve() else f" --out {os.path.relpath(out, ROOT)}"
    rows = []
    for variant in VARIANTS:
        runs = [results[f"{variant}_s{s}"] for s in seeds if f"{variant}_s{s}" in results]
        if not runs:
            continue
        mean = lambda key, runs=runs: np.mean([r[key] for r in runs])  # noqa: E731
        rows.append(
            f"| {variant.replace('_', ' ')} | {len(runs)} | {mean('test_f_mae_meV'):.0f} | "
            f"{mean('test_f_mean_error_meV'):+.0f} | {mean('test_f_mae_meV_per_F'):.0f} | {mean('test_plain_mae_meV'):.0f} |"
        )
    text = f"""# Atomic energies as references for an element without top-fidelity labels

Generated by `experiments/atomic_energies/run.py --steps {steps} --seeds {" ".join(map(str, seeds))}{where}`; numbers in
`summary.json` (per run). Free-atom energies: `experiments/atomic_energies/free_atoms.py` (HF/3-21G, PySCF) and
QM9's atomref table (B3LYP/6-31G(2df,p)).

B3LYP/6-31G(2df,p) on {N_TOP} QM9 molecules **without fluorine**, HF/3-21G on every molecule of its block and pool
(fluorinated ones included); one PaiNN 64×3 (embedding at input and readout) per variant and seed, {steps} steps,
checkpoint chosen on {VAL} F-free B3LYP validation molecules. Test: B3LYP energies of {TEST_F} fluorinated and
{TEST_PLAIN} F-free molecules that no training set holds.

- **least squares**: default references (per-element least-squares fits; F's B3LYP reference estimated from the
  HF/3-21G one by the shared shift model);
- **atomic**: `data.atomic_energies` with the free-atom energies of H, C, N, O, F at both levels, as references
  (each fidelity's references: its atomic energies plus its mean binding energy per atom);

| references | seeds | fluorinated MAE meV | mean error meV | MAE per F atom meV | F-free MAE meV |
|---|---|---|---|---|---|
{chr(10).join(rows)}
{_result_text(results, seeds)}{_estimates_text(results.get("reference_estimates"))}{_tried_text(results)}"""
    (out / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=OUT, help="report folder; runs and inputs in its work/ (not committed)")
    opts = ap.parse_args()
    opts.out = opts.out.resolve()  # the configs name files by absolute path (a config's own are relative to it)
    opts.work = opts.out / "work"
    roles = choose()
    write_inputs(opts.work, roles)
    summary = opts.out / "summary.json"
    results = json.loads(summary.read_text()) if summary.exists() else {}
    if "reference_estimates" not in results:
        results["reference_estimates"] = reference_estimates(roles)
    for seed in opts.seeds:
        for variant in VARIANTS:
            name = f"{variant}_s{seed}"
            run = opts.work / "runs" / name
            train(config(opts.work, variant, seed, opts.steps), run)
            results[name] = {"steps": opts.steps, **test_errors(run, opts.work)}
            report(opts.out, results, opts.steps, opts.seeds)
            print(name, results[name], flush=True)


if __name__ == "__main__":
    main()
