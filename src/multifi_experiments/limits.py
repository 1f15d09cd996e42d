"""What limits the data-efficiency factor: measurements on the finished multi-fidelity runs of a learning curve.

For every finished run whose model knows both fidelities (joint, pre-train → joint, fine-tuned models keep
only the top one and are skipped), on the part's test molecules:

- the top-fidelity MAE (the curve's number) and the low-fidelity MAE the same model reaches;
- the MAE of the predicted difference E_high − E_low against the labels' difference, and the spread (std) of
  that label difference: if the joint model's top-fidelity error is close to its difference error, what is
  left to learn from the n top-fidelity labels is the difference, and the low fidelity helps as much as the
  difference is smaller (easier) than the top-fidelity energy itself;
- the fidelity vectors: their norms, the cosine between the top and the low fidelity, and how far each
  moved from its initialisation (reconstructed from the run's seed: the vectors are drawn when the model
  is built, right after seeding, see `initial_table`).

    multifi experiment limits SPEC.yaml     # writes <output>/limits.json and <output>/LIMITS.md

Only runs finished under the spec's current plan are measured (their result's signature is the plan's:
the same test molecules and configuration). Results are cached per run (<output>/limits/<run id>.json,
keyed by the signature of the run that made the result and the model file's content hash); a finished run
whose model is gone (work folders are not results: a fresh clone) keeps its cached row if that run made it.
QM9 learning curves only (the shared label tables), not specs with a `data` section.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from multifi.errors import MultifiError
from multifi.files import atomic_write
from multifi_experiments.context import Context
from multifi_experiments.runner import is_done, read_result

log = logging.getLogger("multifi.experiments")
VERSION = 3  # of the measured quantities: cached rows of another version are measured again
MIN_BOTH = 3  # test molecules labelled at both fidelities needed to measure a run (a spread, a correlation)


def run_limits(ctx: Context, parts: dict) -> dict:
    """Measure every finished two-fidelity learning-curve run; write limits.json and LIMITS.md."""
    if "learning_curve" not in parts:
        raise MultifiError(f"{ctx.paths.spec}: no learning_curve part to analyse")
    if ctx.spec.data is not None:
        raise MultifiError(
            f"{ctx.paths.spec}: limits measures QM9 learning curves only, not a spec with a 'data' section"
        )
    lc = ctx.spec.learning_curve
    rows = []
    for plan in parts["learning_curve"].plans:
        model = ctx.paths.work / plan.id / "run" / "model.pt"
        if plan.meta.get("role") == "pretrain" or not is_done(ctx, plan):
            continue  # a model of another plan (the spec changed since) is not measured on this plan's test set
        row = _cached(ctx, plan, model, lc.high, lc.low) if model.is_file() else _kept(ctx, plan)
        if row is not None:
            rows.append({"run": plan.id, "variant": plan.meta["variant"], "n": plan.meta["n"], **row})
    out = {"high": lc.high, "low": lc.low, "runs": rows}
    atomic_write(ctx.paths.output / "limits.json", lambda f: f.write(json.dumps(out, indent=1).encode()))
    atomic_write(ctx.paths.output / "LIMITS.md", lambda f: f.write(render(ctx, out).encode()))
    return out


def _cached(ctx: Context, plan, model: Path, high: str, low: str) -> dict | None:
    key = _made_by(ctx, plan) + ":" + hashlib.sha256(model.read_bytes()).hexdigest()[:16]  # run, model file
    path = ctx.paths.output / "limits" / f"{plan.id}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("version") == VERSION:
            return cached["row"]
    row = measure(ctx, plan, model, high, low)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps({"key": key, "version": VERSION, "row": row}, indent=1).encode()))
    return row


def _kept(ctx: Context, plan) -> dict | None:
    """The cached row of a finished run whose work folder (model.pt) is gone, e.g. in a fresh clone: made from
    the model of the run behind the result (same signature) by this version of the measurements, else None."""
    path = ctx.paths.output / "limits" / f"{plan.id}.json"
    if not path.is_file():
        return None
    cached = json.loads(path.read_text())
    made_by = str(cached.get("key", "")).split(":")[0]
    return cached["row"] if made_by == _made_by(ctx, plan) and cached.get("version") == VERSION else None


def _made_by(ctx: Context, plan) -> str:
    """The signature of the run that made the plan's finished result (the plan's own, or the same plan under
    an earlier step cap when the run stopped early before the current one)."""
    return read_result(ctx, plan.id)["signature"]


def measure(ctx: Context, plan, model: Path, high: str, low: str) -> dict | None:
    """Errors at both fidelities and of their difference on the test molecules, and the fidelity vectors."""
    from multifi.models.registry import load_potential

    potential = load_potential(model)
    names = list(potential.fidelities.names)
    if high not in names or low not in names:
        return None
    idx = np.asarray(plan.files["test.keys"], dtype=np.int64)
    pred = {f: predict_energies(potential, idx, f) for f in (high, low)}
    label = {f: ctx.catalog.energies(f, idx) for f in (high, low)}
    at_high = ~np.isnan(label[high])
    known = at_high & ~np.isnan(label[low])  # split_methods may draw test molecules the low fidelity lacks
    if known.sum() < MIN_BOTH:  # a spread or a correlation of fewer molecules is undefined (NaN)
        log.warning(
            "%s: %d test molecules labelled at both %s and %s (fewer than %d); not measured",
            plan.id,
            int(known.sum()),
            high,
            low,
            MIN_BOTH,
        )
        return None
    err = {f: 1000 * (pred[f] - label[f])[known] for f in (high, low)}  # meV
    d_label = 1000 * (label[high] - label[low])[known]
    d_err = err[high] - err[low]
    row = {
        "test_molecules": int(at_high.sum()),
        "both_labelled": int(known.sum()),  # the molecules of every quantity below but the curve's MAE
        "high_mae_meV": float(1000 * np.abs(pred[high] - label[high])[at_high].mean()),  # the curve's number
        "high_mae_both_meV": float(np.abs(err[high]).mean()),
        "low_mae_meV": float(np.abs(err[low]).mean()),
        "difference_mae_meV": float(np.abs(d_err).mean()),
        # the difference's spread once a per-element reference is removed (what a model must learn of it)
        "label_difference_std_meV": float(_residual_std(ctx, idx[known], d_label)),
        # the same for the top fidelity's own energies: what a single-fidelity model must learn
        "label_high_std_meV": float(_residual_std(ctx, idx[known], 1000 * label[high][known])),
        "error_correlation": float(np.corrcoef(err[high], err[low])[0, 1]),
    }
    row.update(embedding_movement(potential, model, high, low))
    return row


def predict_energies(potential, idx: np.ndarray, fidelity: str) -> np.ndarray:
    """[n] eV: the potential's energies of the QM9 molecules `idx` (sorted) at `fidelity`."""
    from multifi.data.fidelity import FidelityTable
    from multifi.data.readers.qm9 import QM9_FIDELITY, read_qm9
    from multifi.train.evaluate import evaluate_pairs

    ds = read_qm9(labels=None, fidelity=QM9_FIDELITY, indices=idx)
    order = np.array([int(k.split(":")[1]) for k in ds.keys])
    if not np.array_equal(order, np.sort(idx)):
        raise MultifiError(f"test molecules: {len(idx)} asked, {len(order)} read from QM9")
    table = FidelityTable(list(dict.fromkeys([QM9_FIDELITY, fidelity])))
    ds = ds.with_fidelities(table)  # the same geometries, predicted at `fidelity` (its label column may be empty)
    pairs = np.stack([np.arange(len(ds)), np.full(len(ds), table.index(fidelity))], axis=1)
    _, energy = evaluate_pairs(potential, ds, None, pairs, batch_size=128, return_predictions=True)
    return energy.astype(np.float64)


def _residual_std(ctx: Context, idx: np.ndarray, values: np.ndarray) -> float:
    """Std of `values` after a least-squares per-element constant (element counts of the molecules `idx`)."""
    counts = ctx.catalog.composition(idx).astype(np.float64)
    counts = counts[:, counts.any(0)]
    coef, *_ = np.linalg.lstsq(counts, values, rcond=None)
    return float((values - counts @ coef).std())


def embedding_movement(potential, model: Path, high: str, low: str) -> dict:
    """Norms and cosine of the top and low fidelity vectors, and their distance from their initial values."""
    table = getattr(potential.conditioning, "table", None)
    if table is None:
        return {}
    names = list(potential.fidelities.names)
    vec = table.weight.detach().double().numpy()
    h, lo = vec[names.index(high)], vec[names.index(low)]
    out = {
        "vector_norm": {high: float(np.linalg.norm(h)), low: float(np.linalg.norm(lo))},
        "vector_cosine": float(h @ lo / max(np.linalg.norm(h) * np.linalg.norm(lo), 1e-12)),
    }
    init = initial_table(model)
    if init is not None:
        out["moved_from_init"] = {
            f: float(np.linalg.norm(vec[names.index(f)] - init[names.index(f)])) for f in (high, low)
        }
        out["init_cosine"] = float(
            init[names.index(high)]
            @ init[names.index(low)]
            / max(np.linalg.norm(init[names.index(high)]) * np.linalg.norm(init[names.index(low)]), 1e-12)
        )
    return out


def initial_table(model: Path) -> np.ndarray | None:
    """[K, d] the fidelity table as it was drawn at the start of the run that wrote `model` (run/model.pt):
    seeded with the run's seed, the module built as `multifi.train.run.train` builds it (None when the run
    was initialised from another model, whose vectors are not drawn)."""
    import lightning as L
    import yaml

    from multifi.config import RunConfig
    from multifi.models.registry import load_potential
    from multifi.train.module import PotentialModule

    cfg_path = model.parent / "config.yaml"
    cfg = RunConfig.model_validate(yaml.safe_load(cfg_path.read_text()))
    if cfg.train.init_from:
        return None
    names = list(load_potential(model).fidelities.names)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = PotentialModule({"model": cfg.model, "fidelities": names}, cfg.loss, cfg.train)
    table = getattr(module.potential.conditioning, "table", None)
    return None if table is None else table.weight.detach().double().numpy()


def render(ctx: Context, out: dict) -> str:
    high, low = out["high"], out["low"]
    lines = [
        f"# What limits the data-efficiency factor ({ctx.spec.name})",
        "",
        f"Generated by `multifi experiment limits {ctx.paths.spec.relative_to(ctx.paths.root)}` from the finished "
        "runs; regenerate, do not edit. Test molecules of the learning curve; MAE in meV per molecule.",
        "",
        f"- **test (both)**: test molecules labelled at {high} (those labelled at {low} too): every quantity but "
        "the first MAE is measured on the latter;",
        f"- **{high} MAE**: the curve's number (every test molecule); **(both)**: on those labelled at both; "
        f"**{low} MAE**: the same model at the low fidelity;",
        f"- **Δ MAE**: error of the predicted {high} − {low} against the labels' difference; **Δ std**: spread of "
        f"the labels' difference after a per-element constant (what a model must learn of it); **{high} std**: the "
        "same for the top fidelity's own energies (what a single-fidelity model must learn);",
        "- **err. corr.**: correlation of the model's errors at the two fidelities (near 1: the errors are shared, "
        "the difference is learned better than either energy);",
        "- vectors: norms of the two fidelity vectors, their cosine (at initialisation → after training), and how "
        "far each moved from its initial value (dimension d: a random vector has norm ≈ √d).",
        "",
        f"| run | test (both) | {high} MAE | (both) | {low} MAE | Δ MAE | Δ std | {high} std | err. corr. | ‖v‖ high / low "
        "| cosine init → end | moved high / low |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(out["runs"], key=lambda r: (r["variant"], r["n"], r["run"])):
        norms = r.get("vector_norm")
        moved = r.get("moved_from_init")
        cos = f"{r['init_cosine']:+.2f} → {r['vector_cosine']:+.2f}" if "init_cosine" in r else "—"
        if "init_cosine" not in r and "vector_cosine" in r:
            cos = f"{r['vector_cosine']:+.2f}"
        lines.append(
            f"| {r['run']} | {r['test_molecules']} ({r['both_labelled']}) | {r['high_mae_meV']:.1f} | "
            f"{r['high_mae_both_meV']:.1f} | {r['low_mae_meV']:.1f} | {r['difference_mae_meV']:.1f} | "
            f"{r['label_difference_std_meV']:.1f} | {r['label_high_std_meV']:.1f} | {r['error_correlation']:.2f} | "
            + (f"{norms[high]:.2f} / {norms[low]:.2f}" if norms else "—")
            + f" | {cos} | "
            + (f"{moved[high]:.2f} / {moved[low]:.2f}" if moved else "—")
            + " |"
        )
    if not out["runs"]:
        lines.append("| (no finished two-fidelity run yet) | | | | | | | | | | | |")
    return "\n".join(lines) + "\n"
