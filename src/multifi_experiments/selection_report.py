"""Report of a selection spec: test errors per round and arm, LLPR calibration, data-efficiency factors, plot.

Rebuilt from the round records (rounds/<arm>/s<seed>/r<r>.json) alone: summary.json, details.json,
selection.png and README.md (generated: do not edit).

summary.json: per metric of the spec's `metrics` (METRICS in spec.py), "test_<result key>" {arm: {n: mean
over seeds}} (energy: "test_mae_meV"; energy per atom: "test_mae_meV_per_atom"; forces:
"test_forces_mae_meV_per_A"); "data_efficiency" {arm: {n: factor}} of the first metric, and with several
metrics "data_efficiency_by_metric" {metric: {arm: {n: factor}}}. details.json: "curves", "efficiency" of
the first metric; with other metrics than energy alone also "metrics", "units", "curves_by_metric",
"efficiency_by_metric"; "test_not_spanned" {arm: {n: test structures outside the span of the acquired
compositions, worst seed}} when the records count them.
"""

from __future__ import annotations

import json

from multifi.data.dataset import atomic_write
from multifi_experiments.context import Context, machine
from multifi_experiments.efficiency import bounded, efficiency_factor
from multifi_experiments.report import stats
from multifi_experiments.spec import METRICS


def load_records(ctx: Context) -> dict[str, dict[int, list[dict]]]:
    """arm → n → round records of every seed found (in seed order)."""
    out: dict = {}
    sp = ctx.spec.selection
    for arm in sp.arms:
        for path in sorted((ctx.paths.output / "rounds" / arm).glob("s*/r*.json")):
            rec = json.loads(path.read_text())
            if rec.get("n") in sp.rounds:
                out.setdefault(arm, {}).setdefault(int(rec["n"]), []).append(rec)
    return out


def _curves(records: dict, high: str, key: str) -> dict:
    """arm → n → stats over seeds of the test error `key` at `high` (a result's test entry)."""
    return {
        arm: {
            str(n): stats([r["test"][high][key] for r in recs if r.get("test", {}).get(high, {}).get(key) is not None])
            for n, recs in sorted(by_n.items())
        }
        for arm, by_n in records.items()
    }


def selection_details(ctx: Context, records: dict, pool: int) -> dict:
    sp = ctx.spec.selection
    by_metric = {m: _curves(records, sp.high, METRICS[m][0]) for m in sp.metrics}
    calibration = {}
    for arm, by_n in records.items():
        calibration[arm] = {
            str(n): {
                k: stats([r["llpr"][k] for r in recs if r.get("llpr")])
                for k in ("spearman", "miscalibration_area", "mean_sigma_meV")
            }
            for n, recs in sorted(by_n.items())
        }
    details = {
        "high": sp.high,
        "low": sp.low,
        "rounds": sp.rounds,
        "pool": pool,
        "test": sp.test,
        "val": sp.val,
        "arms": {
            a: {
                "model": v.model,
                "kind": sp.models[v.model].kind,
                "inject": sp.models[v.model].mode,
                "strategy": v.strategy,
                "label": v.label or a,
            }
            for a, v in sp.arms.items()
        },
        "curves": by_metric[sp.metrics[0]],
        "llpr": calibration,
    }
    if sp.efficiency is not None:
        details["efficiency"] = efficiency_details(sp, by_metric[sp.metrics[0]])
    spans = {
        arm: {str(n): max(r["test_not_spanned"] for r in recs) for n, recs in sorted(by_n.items())}
        for arm, by_n in records.items()
        if all("test_not_spanned" in r for recs in by_n.values() for r in recs)
    }
    if spans:  # records written before the count was kept have none
        details["test_not_spanned"] = spans
    if sp.metrics != ["energy"]:
        details["metrics"] = list(sp.metrics)
        details["units"] = {m: list(METRICS[m][1:]) for m in sp.metrics}
        details["curves_by_metric"] = by_metric
        if sp.efficiency is not None:
            details["efficiency_by_metric"] = {m: efficiency_details(sp, c) for m, c in by_metric.items()}
    return details


def efficiency_details(sp, curves: dict) -> dict:
    """Per candidate arm and round size n: n_reference(MAE of the arm at n) / n on the reference arm's curve."""
    e = sp.efficiency
    ref = curves.get(e.reference, {})
    ref_ns = [int(n) for n, s in ref.items() if s]
    ref_maes = [ref[str(n)]["mean"] for n in ref_ns]
    out = {"reference": e.reference, "reference_ns": ref_ns, "arms": {}}
    for arm in e.candidates or [a for a in sp.arms if a != e.reference]:
        out["arms"][arm] = {}
        for n, s in curves.get(arm, {}).items():
            if s:
                out["arms"][arm][n] = efficiency_factor(ref_ns, ref_maes, int(n), s["mean"]).as_dict()
    return out


def write_selection_report(ctx: Context, splits: dict) -> dict:
    from multifi_experiments import plots

    sp = ctx.spec.selection
    records = load_records(ctx)
    details = selection_details(ctx, records, len(splits["pool"]))
    by_metric = details.get("curves_by_metric", {sp.metrics[0]: details["curves"]})
    out = ctx.paths.output
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {
        f"test_{METRICS[m][0]}": {a: {n: (s or {}).get("mean") for n, s in c.items()} for a, c in by_metric[m].items()}
        for m in sp.metrics
    }
    summary["data_efficiency"] = _factors(details.get("efficiency", {}))
    summary["data_efficiency_bounds"] = _bounds(details.get("efficiency", {}))
    if len(sp.metrics) > 1:
        summary["data_efficiency_by_metric"] = {
            m: _factors(e) for m, e in details.get("efficiency_by_metric", {}).items()
        }
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    atomic_write(out / "details.json", lambda f: f.write(json.dumps(details, indent=1, default=float).encode()))
    panels = []
    for m in sp.metrics:
        curves = {details["arms"][a]["label"]: {n: s for n, s in c.items() if s} for a, c in by_metric[m].items()}
        _, label, unit = METRICS[m]
        panels.append((curves, f"{sp.high} test {'MAE' if m == 'energy' else label} ({unit})"))
    figure = None
    if any(any(c.values()) for c, _ in panels):
        figure = plots.learning_curves(
            out / "selection.png",
            panels,
            f"{ctx.spec.name}: acquisition by strategy",
            xlabel=f"acquired top-fidelity {ctx.catalog.noun} n",
        )
    every = [r for by_n in records.values() for recs in by_n.values() for r in recs]
    seconds = {
        "wall": sum(r.get("train_seconds") or 0 for r in {r["run"]: r for r in every}.values()),
        "cpu": sum(r.get("cpu_seconds") or 0 for r in {r["run"]: r for r in every}.values()),
        "selection_cpu": sum(r.get("selection_cpu_seconds") or 0 for r in every),
    }
    commands = sorted(
        {r.get("command", "") for by_n in records.values() for recs in by_n.values() for r in recs} - {""}
    )
    text = render(ctx, details, figure is not None, seconds, commands, splits)
    atomic_write(out / "README.md", lambda f: f.write(text.encode()))
    return summary


def _factors(efficiency: dict) -> dict:
    """{arm: {n: factor}} of an efficiency_details entry; outside the reference curve the bound
    (efficiency.bounded: n_max/n is a lower bound, n_min/n an upper one; which, in _bounds)."""
    ref_ns = efficiency.get("reference_ns", [])
    return {a: {n: bounded(e, ref_ns)[0] for n, e in v.items()} for a, v in efficiency.get("arms", {}).items()}


def _bounds(efficiency: dict) -> dict:
    """{arm: {n: "lower" | "upper"}} for the factors of _factors that are bounds."""
    ref_ns = efficiency.get("reference_ns", [])
    out = {a: {n: bounded(e, ref_ns)[1] for n, e in v.items()} for a, v in efficiency.get("arms", {}).items()}
    return {a: {n: b for n, b in v.items() if b} for a, v in out.items() if any(v.values())}


def _cell(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "–"
    if s.get("std") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def render(ctx: Context, d: dict, figure: bool, seconds: dict, commands: list[str], splits: dict) -> str:
    sp, noun = ctx.spec.selection, ctx.catalog.noun
    ns = [str(n) for n in sp.rounds]
    extra = (
        f"; joint models also train on {sp.low} for {len(splits['low_extra'])} {noun} outside test, validation and pool"
        if "low_extra" in splits
        else ""
    )
    start = "round 0 random, composition-spanning first" if sp.cover_compositions else "round 0 random"
    lines = [
        f"# {ctx.spec.name}",
        "",
        ctx.spec.description,
        "",
        "Generated by `multifi experiment run` from the round records in `rounds/`; do not edit.",
        "",
        f"Made with: {', '.join(f'`{c}`' for c in commands) or '(no finished round yet)'}",
        "",
        (
            f"Test: {sp.test} {noun}, validation: {sp.val}, pool: {len(splits['pool'])} {noun} with {sp.low} labels"
            f"{extra}; {sp.high} acquired in rounds {sp.rounds} ({start}, shared by the arms of a model); "
            f"{'warm start from the previous round' if sp.warm_start else 'retrained from scratch every round'}. "
            f"Training summed over runs: {seconds['wall'] / 3600:.2f} h wall, {seconds['cpu'] / 3600:.2f} h CPU; "
            f"LLPR fits and selection: {seconds['selection_cpu'] / 3600:.2f} h CPU. Machine: {machine()}."
        ),
        "",
    ]
    if ctx.spec.notes:
        lines += [ctx.spec.notes, ""]
    curves = d.get("curves_by_metric", {sp.metrics[0]: d["curves"]})
    efficiency = d.get("efficiency_by_metric", {sp.metrics[0]: d["efficiency"]} if "efficiency" in d else {})
    for m in sp.metrics:
        _, label, unit = METRICS[m]
        what = "MAE" if m == "energy" else label
        lines += [
            f"## {sp.high} test {what} ({unit}) per round, mean ± std over seeds",
            "",
            "| arm | model | strategy | " + " | ".join(f"n = {n}" for n in ns) + " |",
            "|---" * (3 + len(ns)) + "|",
        ]
        for arm, a in d["arms"].items():
            c = curves[m].get(arm, {})
            lines.append(
                f"| {a['label']} | {a['kind']} ({a['inject']}) | {a['strategy']} | "
                + " | ".join(_cell(c.get(n)) for n in ns)
                + " |"
            )
        lines.append("")
    spans = {arm: by_n for arm, by_n in d.get("test_not_spanned", {}).items() if any(by_n.values())}
    if spans:
        lines += [
            f"Test {noun} whose composition the acquired ones do not span (their per-element reference energies "
            "are not determined by the labels, which dominates energy errors; worst seed): "
            + "; ".join(
                f"{d['arms'][arm]['label']}: " + ", ".join(f"n = {n}: {k}" for n, k in by_n.items() if k)
                for arm, by_n in spans.items()
            )
            + ".",
            "",
        ]
    if figure:
        lines += ["![test MAE per round](selection.png)", ""]
    for m, e in efficiency.items():
        what = "" if len(sp.metrics) == 1 else f" ({METRICS[m][1]})"
        lines += [
            f"## Data-efficiency factor against `{e['reference']}`{what}",
            "",
            (
                f"n_reference(MAE of the arm at n) / n on the `{e['reference']}` curve (log-log interpolation; "
                "'> x': the arm's error lies below the reference's at every measured n, so the reference needs "
                "more than x = its largest n / n; '< x': above the reference's at its smallest n, so less than "
                "x = its smallest n / n; * = extrapolated; – = none)."
            ),
            "",
            "| arm | " + " | ".join(f"n = {n}" for n in ns) + " |",
            "|---" * (1 + len(ns)) + "|",
        ]
        for arm, by_n in e["arms"].items():
            cells = []
            for n in ns:
                x = by_n.get(n)
                factor, bound = bounded(x, e.get("reference_ns", [])) if x else (None, None)
                cells.append(
                    "–"
                    if factor is None
                    else f"{'>' if bound == 'lower' else '<'} {factor:.1f}"
                    if bound
                    else f"{factor:.2f}{'*' if x['extrapolated'] else ''}"
                )
            lines.append(f"| {d['arms'][arm]['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"## LLPR calibration on the test {noun} (σ of the energy; Spearman |error| vs σ; miscalibration area)",
        "",
        "| arm | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---" * (1 + len(ns)) + "|",
    ]
    for arm, by_n in d["llpr"].items():
        cells = [
            f"{_cell(by_n.get(n, {}).get('spearman'), 2)}; {_cell(by_n.get(n, {}).get('miscalibration_area'), 3)}"
            if by_n.get(n)
            else "–"
            for n in ns
        ]
        lines.append(f"| {d['arms'][arm]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
