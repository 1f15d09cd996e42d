"""From finished runs to summary.json, details.json, PNG figures and a README with tables.

summary.json has this schema (the numbers the README tables come from):
  {"transfer": {n: {method: {"joint_mae_meV", "separate_mae_meV"}}},
   "learning_curve": {variant: {n: {"mae_meV_mean", "mae_meV_std", "seeds"}}},
   "data_efficiency": {"n500", "n1000", "best_variant", "extrapolated"},
   "ten_methods": {method: {"joint_mae_meV", "separate_mae_meV"}}, "ten_methods_ratio_mean": r}
A learning curve with other `metrics` has "<metric key>_mean"/"_std" per metric instead of "mae_meV_…"
(keys: spec.METRICS, e.g. "mae_meV_per_atom", "forces_mae_meV_per_A"); data_efficiency is for the first
metric, and "data_efficiency_by_metric" holds every metric's when there are several.
Means are over seeds; std is the sample standard deviation (null for one seed). details.json holds
everything else (per-seed values, kcal/mol, extrapolation notes, block coverage, embeddings).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from multifi.data.dataset import atomic_write
from multifi.errors import MultifiError, unknown_name
from multifi.units import MEV_PER_KCAL_MOL
from multifi_experiments import plots
from multifi_experiments.context import Context, result_path, run_state
from multifi_experiments.efficiency import bounded, efficiency_factor, non_monotone
from multifi_experiments.kinds import KINDS
from multifi_experiments.readme import render
from multifi_experiments.spec import METRICS


def write_report(ctx: Context, parts: dict) -> dict:
    """Aggregate the finished runs of every part; write summary.json, details.json, figures, README.md."""
    results, stale, missing, capped = load_results(ctx, parts)
    details: dict = {"capped_runs": capped} if capped else {}
    if "transfer" in parts:
        details["transfer"] = transfer_details(ctx, _main(parts["transfer"].plans), results)
        details["transfer_steps"] = _control_details(parts["transfer"].plans, results, by_n=True)
    if "learning_curve" in parts:
        details["learning_curve"] = learning_curve_details(ctx, parts["learning_curve"], results)
        if ctx.spec.learning_curve.reference_curves is not None:
            add_reference_curves(ctx, details["learning_curve"], parts["learning_curve"].splits)
        details["data_efficiency"] = efficiency_details(ctx, details["learning_curve"])
        more = [efficiency_details(ctx, details["learning_curve"], e) for e in ctx.spec.learning_curve.efficiency_more]
        if more:
            details["data_efficiency_more"] = more
    if "ten_methods" in parts:
        details["ten_methods"] = ten_methods_details(parts["ten_methods"], results)
        details["ten_methods_steps"] = _control_details(parts["ten_methods"].plans, results)
        if ctx.spec.embedding_map is not None:
            details["embedding_map"] = embedding_details(ctx, _main(parts["ten_methods"].plans), results)
    summary = make_summary(details)
    out = ctx.paths.output
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    atomic_write(out / "details.json", lambda f: f.write(json.dumps(details, indent=1, default=float).encode()))
    figures = make_figures(ctx, details)
    runs = {
        "total": sum(len(p.plans) for p in parts.values()),
        "done": len(results),
        "stale": stale,
        "missing": missing,
        "capped": {i: results[i]["cap"] for i in capped},
        "train_hours": sum(r.get("train_seconds", 0) for r in results.values()) / 3600,
        "cpu_hours": sum(r.get("cpu_seconds", 0) for r in results.values()) / 3600,
        "commands": sorted({r.get("command", "") for r in results.values()} - {""}),
    }
    atomic_write(out / "README.md", lambda f: f.write(render(ctx, parts, details, figures, runs).encode()))
    return summary


def load_results(ctx: Context, parts) -> tuple[dict, list, list, list]:
    """Results of the current plans: {run id: result}; ids with a result of another plan; ids without; ids
    whose result stopped at a lower step cap than the plan's (in `results`: not converged, to be continued)."""
    results, stale, missing, capped = {}, [], [], []
    for part in parts.values():
        for plan in part.plans:
            path = result_path(ctx, plan.id)
            if not path.exists():
                missing.append(plan.id)
                continue
            r = json.loads(path.read_text())
            state = run_state(ctx, plan, r)
            if state == "other":
                stale.append(plan.id)
                continue
            results[plan.id] = r
            if state == "extend":
                capped.append(plan.id)
    return results, stale, missing, capped


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    v = np.asarray(values, dtype=float)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else None,
        "seeds": len(v),
        "values": [float(x) for x in v],
    }


def _mae(result: dict, method: str, field: str = "mae_meV", split: str = "test") -> float | None:
    """An error of a result. Where some structures had an element whose reference at `method` was estimated
    (a joint model predicts them, a model of `method` alone leaves them out), the error without them, so that
    every variant is compared on the same structures (the error with them stays in the run's JSON)."""
    m = result.get(split, {}).get(method)
    if m is not None and "fitted_only" in m:
        m = m["fitted_only"]
    return None if m is None else m.get(field)


def _collect(plans, results, key, method_of, field: str = "mae_meV", split: str = "test") -> dict:
    """{key(plan): [`split` error `field` of method_of(plan) over seeds]} for finished plans."""
    out: dict = {}
    for plan in plans:
        r = results.get(plan.id)
        for method in method_of(plan):
            value = None if r is None else _mae(r, method, field, split)
            if value is not None:
                out.setdefault(key(plan, method), []).append(value)
    return out


# ---------------------------------------------------------------------------------------------- parts
def transfer_details(ctx, plans, results) -> dict:
    t = ctx.spec.transfer
    values = _collect(plans, results, lambda p, m: (p.meta["n"], m, p.meta["role"]), lambda p: p.meta["methods"])
    table = {}
    for n in t.ns:
        table[str(n)] = {}
        for m in t.methods:
            row = {role: stats(values.get((n, m, role), [])) for role in ("joint", "separate")}
            row["ratio"] = _ratio(row["joint"], row["separate"])
            row["kcal_mol"] = {role: _kcal(row[role]) for role in ("joint", "separate")}
            table[str(n)][m] = row
    return {"methods": t.methods, "inject": t.inject, "test": t.test, "table": table}


def learning_curve_details(ctx, part, results) -> dict:
    """Curves of every variant for each metric (`curve`: the first metric's), with the sizes as planned."""
    lc = ctx.spec.learning_curve
    info = part.info
    ns = info.get("ns", lc.ns)
    n_of = {x: info["sizes"][str(x)] for x in lc.sizes} if "sizes" in info else {n: n for n in ns}
    plans = [p for p in part.plans if p.meta.get("role") != "pretrain"]
    plans, differ = _same_structures(plans, results, lc.high, lc.efficiency.reference)
    by_run = lambda p, _: (p.meta["variant"], p.meta["n"])  # noqa: E731
    values = {m: _collect(plans, results, by_run, lambda p: [lc.high], METRICS[m][0]) for m in lc.metrics}
    val_values = {m: _collect(plans, results, by_run, lambda p: [lc.high], METRICS[m][0], "val") for m in lc.metrics}
    variants = {}
    for name, v in lc.variants.items():
        v_ns = [n_of[x] for x in v.ns] if v.ns else ns
        curves, val_curves = {}, {}
        for m in lc.metrics:
            curves[m] = _curve(values[m], name, v_ns)
            val_curves[m] = _curve(val_values[m], name, v_ns)
        variants[name] = {
            "kind": v.kind,
            "inject": v.mode,
            "label": v.label or "",
            "needs_at_prediction": lc.low if v.needs_low_at_prediction else None,
            "curve": curves[lc.metrics[0]],
            "curves": curves,
            "val_curves": val_curves,
        }
    out = {
        "high": lc.high,
        "low": lc.low,
        "n_low": info.get("n_low", lc.n_low),
        "ns": ns,
        "test": lc.test,
        "val": lc.val,
        "variants": variants,
        "metrics": list(lc.metrics),
        "units": {m: list(METRICS[m][1:]) for m in lc.metrics},
        "noun": info.get("noun", "molecules"),
        "test_digest": test_digest(part.splits["test"]),  # which test set these curves were measured on
    }
    if lc.fractions is not None:
        out["fractions"] = {str(n_of[f]): f for f in lc.fractions}
        out["high_pool"] = info.get("high_pool")
    if "span" in info:
        out["composition_span"] = info["span"]
    if differ:  # results from before keys.FITTED_ONLY: errors over other structures than the reference's
        out["test_count_mismatch"] = differ
    evaluated = sorted({c for p in plans if p.id in results and (c := _mae(results[p.id], lc.high, "n")) is not None})
    if evaluated:  # test structures an error was computed on (fewer than planned: unseen elements or references)
        out["test_evaluated"] = evaluated
    if lc.difference:
        out["difference"] = difference_details(plans, results)
    return out


def _same_structures(plans, results, high: str, reference: str) -> tuple[list, dict]:
    """The plans whose test errors cover the structures of the reference run of the same n and seed, and the
    others by "variant n=…" (results from before keys.FITTED_ONLY: a joint model's errors over structures with
    estimated references that the reference model could not predict). Those are left out of curves and factors."""
    key = lambda p: (p.meta["variant"], p.meta["n"], p.meta["seed"])  # noqa: E731
    count = {key(p): _mae(results[p.id], high, "n") for p in plans if p.id in results}
    keep, differ = [], {}
    for p in plans:
        c, ref = count.get(key(p)), count.get((reference, p.meta["n"], p.meta["seed"]))
        if p.meta["variant"] != reference and None not in (c, ref) and c != ref:
            differ.setdefault(f"{p.meta['variant']} n={p.meta['n']}", []).append(f"seed {p.meta['seed']}: {c} vs {ref}")
        else:
            keep.append(p)
    return keep, differ


def test_digest(test: list) -> str:
    """SHA-1 of a test set (QM9 indices or structure keys, in any order)."""
    return hashlib.sha1(json.dumps(sorted(test)).encode()).hexdigest()


def add_reference_curves(ctx, lcd: dict, splits: dict) -> None:
    """Copy the learning-curve variants named in `reference_curves` from another results folder into `lcd`,
    after checking that its test molecules are this spec's (and its target fidelity and metrics the same)."""
    rc = ctx.spec.learning_curve.reference_curves
    folder = ctx.paths.root / rc.results
    where = f"learning_curve.reference_curves: {folder}"
    try:
        other = json.loads((folder / "details.json").read_text())["learning_curve"]
        # the test set its curves were measured on; older reports: its splits file (rewritten by any planning)
        other_digest = other.get("test_digest") or test_digest(
            json.loads((folder / "splits" / "learning_curve.json").read_text())["test"]
        )
    except (OSError, ValueError, KeyError) as exc:
        raise MultifiError(f"{where}: no learning-curve results there ({type(exc).__name__}: {exc})") from None
    if other_digest != test_digest(splits["test"]):
        raise MultifiError(f"{where}: its test set is not this spec's (set learning_curve.split_methods to match)")
    if other["high"] != lcd["high"] or other["metrics"] != lcd["metrics"]:
        raise MultifiError(f"{where}: target {other['high']} / metrics {other['metrics']} differ from this spec's")
    for name in rc.variants:
        if name not in other["variants"]:
            raise unknown_name("variant", name, list(other["variants"]), where)
        if name in lcd["variants"]:
            raise MultifiError(f"{where}: variant {name!r} is also a variant of this spec")
        v = other["variants"][name]
        lcd["variants"][name] = {**v, "label": f"{v.get('label') or name} ({rc.results})", "from": rc.results}
        lcd["ns"] = sorted({*lcd["ns"], *(int(n) for c in v["curves"].values() for n in c)})


DIFFERENCE_KEYS = ("energy_difference_mae_meV_per_atom", "forces_difference_mae_meV_per_A")


def difference_details(plans, results) -> dict:
    """{variant: {n: {key: stats over seeds}}} of the predicted high − low difference errors, and the label
    difference sizes (`labels`) on the test structures."""
    out: dict = {"variants": {}, "labels": {}}
    for plan in plans:
        d = results.get(plan.id, {}).get("difference")
        if not d:
            continue
        out["labels"] = {k: v for k, v in d.items() if k.startswith("label_") or k == "n"}
        row = out["variants"].setdefault(plan.meta["variant"], {}).setdefault(str(plan.meta["n"]), {})
        for key in DIFFERENCE_KEYS:
            if d.get(key) is not None:
                row.setdefault(key, []).append(d[key])
    for rows in out["variants"].values():
        for n, row in rows.items():
            rows[n] = {k: stats(v) for k, v in row.items()}
    return out


def _curve(values: dict, name: str, ns: list[int]) -> dict:
    """{str(n): stats over seeds} of one variant, for the sizes that have results."""
    curve = {str(n): stats(values.get((name, n), [])) for n in ns}
    return {n: s for n, s in curve.items() if s is not None}


def efficiency_details(ctx, lcd: dict, e=None) -> dict:
    """Data-efficiency factors for the first metric (top level) and every metric (`by_metric`), of the
    spec's main efficiency block or of `e` (one of efficiency_more)."""
    e = e or ctx.spec.learning_curve.efficiency
    n_of = {float(f): int(n) for n, f in lcd.get("fractions", {}).items()}
    at = [n_of[float(x)] for x in e.at] if n_of else list(e.at)
    by_metric = {m: _efficiency_for(e, lcd, m, at) for m in lcd["metrics"]}
    primary = by_metric[lcd["metrics"][0]]
    return {
        **primary,
        "metric": lcd["metrics"][0],
        "by_metric": by_metric if len(by_metric) > 1 else {},
        "claim": ctx.spec.learning_curve.claim,
        "label": e.label,
    }


def _efficiency_for(e, lcd: dict, metric: str, at: list[int]) -> dict:
    """Factors of every candidate at each n in `at`; the best candidate is chosen on validation errors
    (lowest geometric-mean validation MAE over `at`; test errors only for results without validation
    errors, and then said so). Per-seed factors give the spread; a factor whose error lies below the
    reference's at its largest n is stored as the lower bound n_max / n (flag `bound`: "lower"), one above the
    reference's at its smallest n as the upper bound n_min / n ("upper")."""
    variants = lcd["variants"]
    candidates = e.candidates or [n for n, v in variants.items() if KINDS[v["kind"]].joint]
    ref = variants[e.reference]["curves"][metric]
    ref_ns = [float(n) for n in ref]
    ref_maes = [s["mean"] for s in ref.values()]
    by_variant, seeds, val_score, test_score = {}, {}, {}, {}
    for name in candidates:
        curve = variants[name]["curves"][metric]
        val = variants[name].get("val_curves", {}).get(metric, {})
        by_variant[name] = {
            f"n{n}": efficiency_factor(ref_ns, ref_maes, n, curve[str(n)]["mean"]).as_dict()
            for n in at
            if str(n) in curve
        }
        seeds[name] = {
            f"n{n}": _factor_spread(ref_ns, ref_maes, n, curve[str(n)]["values"]) for n in at if str(n) in curve
        }
        if len(by_variant[name]) == len(at):  # best = lowest geometric-mean error over the `at` sizes
            test_score[name] = float(np.mean([np.log(curve[str(n)]["mean"]) for n in at]))
            if all(str(n) in val for n in at):
                val_score[name] = float(np.mean([np.log(val[str(n)]["mean"]) for n in at]))
    chosen_on = "validation" if val_score and len(val_score) == len(test_score) else "test"
    score = val_score if chosen_on == "validation" else test_score
    best = min(score, key=score.get) if score else None
    factors, bounds, flags = {}, {}, {}
    for n in at:
        k = f"n{n}"
        eff = by_variant[best][k] if best else None
        factors[k], bounds[k] = (None, None) if eff is None else bounded(eff, ref_ns)
        flags[k] = None if eff is None else bool(eff["extrapolated"])
    extrapolated = any(flags.values()) if best else None
    return {
        "reference": e.reference,
        "at": at,
        "candidates": candidates,
        "by_variant": by_variant,
        "seeds": seeds,
        "best_variant": best,
        "chosen_on": chosen_on,
        "reference_ns": ref_ns,
        "reference_maes": ref_maes,
        "reference_not_decreasing_at": non_monotone(ref_ns, ref_maes),
        "summary": {
            **factors,
            "best_variant": best,
            "extrapolated": extrapolated,
            "chosen_on": chosen_on,
            "extrapolated_at": flags,
            "bound": bounds,
            "seeds": {k: seeds[best].get(k) for k in factors} if best else {},
        },
    }


def _factor_spread(ref_ns, ref_maes, n: int, values: list[float]) -> dict:
    """Factors of each seed's error against the same reference curve: `values` with their `bounds` (None,
    "lower", "upper"; efficiency.bounded) and mean, sample std, min, max when every seed's factor is a measured
    value (a mean of bounds, or one leaving out seeds without a factor, would read as a measurement)."""
    pairs = [bounded(efficiency_factor(ref_ns, ref_maes, n, v).as_dict(), ref_ns) for v in values]
    out = {"values": [None if f is None else float(f) for f, _ in pairs], "bounds": [b for _, b in pairs]}
    if len(pairs) == 0 or any(f is None or b is not None for f, b in pairs):
        return out
    a = np.asarray([f for f, _ in pairs], float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else None,
        "min": float(a.min()),
        "max": float(a.max()),
        **out,
    }


def _main(plans) -> list:
    """The plans of the comparison itself (without step-matched controls)."""
    return [p for p in plans if not p.meta.get("control")]


def _control_details(plans, results, by_n: bool = False) -> dict:
    """Joint vs separate test MAE of the step-matched control runs: {control: {[n:] {method: row}}}."""
    out: dict = {}
    controls = [p for p in plans if p.meta.get("control")]
    for label in dict.fromkeys(p.meta["control"] for p in controls):
        chosen = [p for p in controls if p.meta["control"] == label]
        key = (lambda p, m: (p.meta["n"], m, p.meta["role"])) if by_n else (lambda p, m: (m, p.meta["role"]))
        values = _collect(chosen, results, key, lambda p: p.meta["methods"])
        table: dict = {}
        for k in dict.fromkeys(k[:-1] for k in values):  # in the order of the plans (a set: another order per run)
            row = {role: stats(values.get((*k, role), [])) for role in ("joint", "separate")}
            row["ratio"] = _ratio(row["joint"], row["separate"])
            node = table.setdefault(str(k[0]), {}) if by_n else table
            node[k[-1]] = row
        out[label] = table
    return out


def ten_methods_details(part, results) -> dict:
    plans = _main(part.plans)
    values = _collect(plans, results, lambda p, m: (m, p.meta["role"]), lambda p: p.meta["methods"])
    methods = {}
    trained = [m for p in plans if p.meta.get("role") == "joint" for m in p.meta["methods"]]
    for m in dict.fromkeys(trained):
        row = {role: stats(values.get((m, role), [])) for role in ("joint", "separate")}
        row["ratio"] = _ratio(row["joint"], row["separate"])
        methods[m] = row
    ratios = [r["ratio"] for r in methods.values() if r["ratio"] is not None]
    coverage = part.info["coverage"]
    return {
        "methods": methods,
        "ratio_mean": float(np.mean(ratios)) if ratios else None,
        "coverage": coverage,
        "blocks": part.info["blocks_name"],
        "left_out": [m for m, c in coverage.items() if c["used"] == 0],
    }


def embedding_details(ctx, plans, results) -> dict | None:
    joint = [p for p in plans if p.meta.get("role") == "joint"]
    seed = ctx.spec.embedding_map.seed
    chosen = [p for p in joint if seed is None or p.meta["seed"] == seed][:1]
    if not chosen or chosen[0].id not in results or not results[chosen[0].id].get("embedding"):
        return None
    emb = results[chosen[0].id]["embedding"]
    names, vec = emb["fidelities"], np.asarray(emb["vectors"], dtype=float)
    unit = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    centred = vec - vec.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if len(vt) >= 2 else np.column_stack([centred @ vt[:1].T, np.zeros(len(vec))])
    var = sv**2 / max(float((sv**2).sum()), 1e-12)
    return {
        "run": chosen[0].id,
        "fidelities": names,
        "dim": int(vec.shape[1]),
        "cosine": cos.tolist(),
        "pca_xy": xy.tolist(),
        "pca_explained": var[:2].tolist(),
        "groups": similarity_groups(names, cos),
    }


def similarity_groups(names: list[str], cos: np.ndarray) -> dict:
    """Mean cosine similarity of method pairs that share a functional, a basis, both xTB, or nothing."""

    def parts(name):
        if "/" in name:
            f, b = name.split("/", 1)
            return f, b
        return ("xTB" if "xTB" in name else name), None

    groups: dict[str, list[float]] = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            (fi, bi), (fj, bj) = parts(names[i]), parts(names[j])
            if bi is None and bj is None and fi == fj == "xTB":
                key = "both xTB"
            elif bi is None or bj is None:
                key = "xTB vs DFT/HF"
            elif fi == fj:
                key = "same functional, other basis"
            elif bi == bj:
                key = "same basis, other functional"
            else:
                key = "different functional and basis"
            groups.setdefault(key, []).append(float(cos[i, j]))
    return {k: {"mean": float(np.mean(v)), "pairs": len(v)} for k, v in groups.items()}


def _ratio(joint, separate) -> float | None:
    if not joint or not separate or not separate["mean"]:
        return None
    return joint["mean"] / separate["mean"]


def _kcal(s):
    if s is None:
        return None
    return {"mean": s["mean"] / MEV_PER_KCAL_MOL, "std": None if s["std"] is None else s["std"] / MEV_PER_KCAL_MOL}


# ---------------------------------------------------------------------------------------------- summary
def make_summary(details: dict) -> dict:
    """summary.json (the schema in this module's docstring), from the details."""
    summary: dict = {
        "transfer": {},
        "learning_curve": {},
        "data_efficiency": {},
        "ten_methods": {},
        "ten_methods_ratio_mean": None,
    }
    for n, by_method in details.get("transfer", {}).get("table", {}).items():
        summary["transfer"][n] = {
            m: {"joint_mae_meV": _mean(r["joint"]), "separate_mae_meV": _mean(r["separate"])}
            for m, r in by_method.items()
        }
    lcd = details.get("learning_curve", {})
    for name, v in lcd.get("variants", {}).items():
        summary["learning_curve"][name] = {}
        for n, first in v["curve"].items():
            row: dict = {}
            for m in lcd["metrics"]:
                s = v["curves"][m].get(n)
                key = METRICS[m][0]
                row.update({f"{key}_mean": s and s["mean"], f"{key}_std": s and s["std"]})
            summary["learning_curve"][name][n] = {**row, "seeds": first["seeds"]}
    if "data_efficiency" in details:
        summary["data_efficiency"] = details["data_efficiency"]["summary"]
        if details["data_efficiency"].get("by_metric"):
            summary["data_efficiency_by_metric"] = {
                m: e["summary"] for m, e in details["data_efficiency"]["by_metric"].items()
            }
    if details.get("data_efficiency_more"):
        summary["data_efficiency_more"] = [
            {**e["summary"], "label": e["label"], "reference": e["reference"]} for e in details["data_efficiency_more"]
        ]
    tm = details.get("ten_methods")
    if tm:
        summary["ten_methods"] = {
            m: {"joint_mae_meV": _mean(r["joint"]), "separate_mae_meV": _mean(r["separate"])}
            for m, r in tm["methods"].items()
        }
        summary["ten_methods_ratio_mean"] = tm["ratio_mean"]
    return summary


def _mean(s):
    return None if s is None else s["mean"]


# ---------------------------------------------------------------------------------------------- figures
def make_figures(ctx, details: dict) -> dict[str, str]:
    """Draw every figure the details allow; returns {name: file name relative to the output folder}."""
    out, figs = ctx.paths.output, {}
    lcd = details.get("learning_curve")
    if lcd and any(v["curve"] for v in lcd["variants"].values()):
        dashed = {n for n, v in lcd["variants"].items() if v["needs_at_prediction"]}
        title = f"{lcd['high']} test MAE ({lcd['low']} on {lcd['n_low']} {lcd['noun']}"
        title += f"; dashed: needs {lcd['low']} at prediction)" if dashed else ")"
        if lcd["metrics"] == ["energy"]:
            plots.learning_curve(out / "learning_curve.png", _curves(lcd, "energy"), title, dashed)
        else:
            panels = [(_curves(lcd, m), f"test {label} ({unit})") for m, (label, unit) in lcd["units"].items()]
            plots.learning_curves(
                out / "learning_curve.png", panels, title, dashed, xlabel=f"{lcd['high']} training {lcd['noun']} n"
            )
        figs["learning_curve"] = "learning_curve.png"
    td = details.get("transfer")
    if td and any(r["joint"] or r["separate"] for rows in td["table"].values() for r in rows.values()):
        rows = [(f"{m}\nn={n}", r) for n, by_m in td["table"].items() for m, r in by_m.items()]
        figs["transfer"] = _points(out / "transfer.png", rows, "Transfer: joint vs separate models (test MAE)").name
    tm = details.get("ten_methods")
    if tm and tm["methods"] and any(r["joint"] or r["separate"] for r in tm["methods"].values()):
        rows = list(tm["methods"].items())
        figs["ten_methods"] = _points(
            out / "ten_methods.png", rows, "One model on all blocks vs one model per block (test MAE)"
        ).name
    em = details.get("embedding_map")
    if em:
        cos = np.asarray(em["cosine"])
        plots.similarity_map(
            out / "embedding_similarity.png", em["fidelities"], cos, "Cosine similarity of learned fidelity embeddings"
        )
        plots.pca_map(
            out / "embedding_pca.png",
            em["fidelities"],
            np.asarray(em["pca_xy"]),
            em["pca_explained"],
            "Fidelity embeddings, first two principal components",
        )
        figs.update(embedding_similarity="embedding_similarity.png", embedding_pca="embedding_pca.png")
    return figs


def _curves(lcd: dict, metric: str) -> dict:
    return {
        name: {n: {"mean": s["mean"], "std": s["std"]} for n, s in v["curves"][metric].items()}
        for name, v in lcd["variants"].items()
    }


def _points(path: Path, rows, title: str) -> Path:
    get = lambda r, role, k: None if r[role] is None else r[role][k]  # noqa: E731
    return plots.paired_points(
        path,
        [g for g, _ in rows],
        [get(r, "joint", "mean") for _, r in rows],
        [get(r, "separate", "mean") for _, r in rows],
        [get(r, "joint", "std") for _, r in rows],
        [get(r, "separate", "std") for _, r in rows],
        title,
    )
