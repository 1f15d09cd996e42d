"""Report of a few-shot spec: the new method's test MAE per n and variant, and every old method's test MAE
change against the base model (forgetting); rebuilt from the run results (runs/few_shot/…) alone.

summary.json:
  new, old (methods of the base model), ns, runs {planned, finished}, cpu_hours (finished runs, summed)
  base_test_mae_meV        {old method: test MAE of the base model}
  new_test_mae_meV         {variant: {n: mean over seeds}}        (variants: the modes, scratch, retrain)
  old_change_meV           {variant: {n: {old method: mean change of its test MAE against the base model}}}
  old_change_max_abs_meV   {variant: {n: largest |change| over old methods and seeds}}
  old_fidelities_unchanged {mode: {n: every seed's extension left every old weight bit-for-bit (bool)}}
details.json: the same with mean, std, seeds and values per cell, block coverage and run ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from multifi.data.dataset import atomic_write
from multifi_experiments.context import Context, machine, result_path
from multifi_experiments.plan import RunPlan
from multifi_experiments.report import stats

BASELINE_LABELS = {"scratch": "{new} alone, from scratch", "retrain": "joint, retrained from scratch with the n labels"}


def load_results(ctx: Context, plans: list[RunPlan]) -> dict[str, dict]:
    """Results of the finished runs made by these plans (same signature), by run id."""
    out = {}
    for plan in plans:
        path = result_path(ctx, plan.id)
        if path.exists():
            r = json.loads(path.read_text())
            if r.get("signature") == plan.signature():
                out[plan.id] = r
    return out


def _old_changes(r: dict, base: dict | None, old: list[str]) -> dict[str, float]:
    """Change of each old method's test MAE (meV) against the base model: an extension's own before/after,
    else this run's test MAE minus the base run's."""
    if "forgetting" in r:
        return {m: r["forgetting"][m]["change"]["energy_mae_meV"] for m in old if m in r["forgetting"]}
    if base is None:
        return {}
    return {
        m: r["test"][m]["mae_meV"] - base["test"][m]["mae_meV"]
        for m in old
        if m in r.get("test", {}) and m in base["test"]
    }


def few_shot_details(ctx: Context, plans: list[RunPlan], old: list[str], coverage: dict) -> dict:
    """old: the base model's methods; coverage: per block, molecules labelled and used (fewshot.FewShotSplits)."""
    fs = ctx.spec.few_shot
    results = load_results(ctx, plans)
    base_id = next(p.id for p in plans if p.meta.get("variant") == "base")
    base = results.get(base_id)
    variants = [*fs.modes, *fs.baselines]
    runs: dict = {v: {} for v in variants}
    for plan in plans:
        if plan.id in results and plan.meta.get("variant") in runs:
            runs[plan.meta["variant"]].setdefault(plan.meta["n"], []).append(results[plan.id])
    new_mae, change, unchanged, ids, unseen = {}, {}, {}, {}, {}
    for v in variants:
        new_mae[v], change[v], ids[v] = {}, {}, {}
        for n in fs.ns:
            rs = runs[v].get(n, [])
            ids[v][str(n)] = [r["id"] for r in rs]
            new_mae[v][str(n)] = stats([r["test"][fs.new]["mae_meV"] for r in rs if fs.new in r.get("test", {})])
            left_out = [r["test"][fs.new].get("unseen", 0) for r in rs if fs.new in r.get("test", {})]
            if any(left_out):
                unseen.setdefault(v, {})[str(n)] = left_out
            per_run = [_old_changes(r, base, old) for r in rs]
            change[v][str(n)] = {m: stats([c[m] for c in per_run if m in c]) for m in old}
            if v in fs.modes and rs:
                unchanged.setdefault(v, {})[str(n)] = [bool(r.get("old_fidelities_unchanged")) for r in rs]
    labels = {v: fs.modes[v].label or v for v in fs.modes}
    labels.update({v: BASELINE_LABELS[v].format(new=fs.new) for v in fs.baselines})
    return {
        "new": fs.new,
        "old": old,
        "ns": fs.ns,
        "test": fs.test,
        "val": fs.val,
        "inject": fs.inject,
        "variants": {
            v: {
                "label": labels[v],
                **(
                    {"kind": "extend", "train": fs.modes[v].train, "replay": fs.modes[v].replay}
                    if v in fs.modes
                    else {"kind": v}
                ),
            }
            for v in variants
        },
        "base": None if base is None else {"id": base_id, "test": base["test"], "cpu_seconds": base.get("cpu_seconds")},
        "new_test_mae_meV": new_mae,
        "new_test_unseen": unseen,
        "old_change_meV": change,
        "old_fidelities_unchanged": unchanged,
        "coverage": coverage,
        "runs": ids,
        "runs_planned": len(plans),
        "runs_finished": len(results),
        "cpu_seconds": {v: sum(r.get("cpu_seconds") or 0 for rs in runs[v].values() for r in rs) for v in variants}
        | {"base": (base or {}).get("cpu_seconds") or 0},
        "wall_seconds": sum(r.get("train_seconds") or 0 for r in results.values()),
        "commands": sorted({r.get("command", "") for r in results.values()} - {""}),
    }


def _max_abs(cells: dict) -> float | None:
    values = [abs(x) for s in cells.values() if s for x in s["values"]]
    return max(values) if values else None


def summarize(d: dict) -> dict:
    mean = lambda s: None if s is None else s["mean"]  # noqa: E731
    return {
        "new": d["new"],
        "old": d["old"],
        "ns": d["ns"],
        "runs": {"planned": d["runs_planned"], "finished": d["runs_finished"]},
        "cpu_hours": round(sum(d["cpu_seconds"].values()) / 3600, 3),
        "base_test_mae_meV": None if d["base"] is None else {m: d["base"]["test"][m]["mae_meV"] for m in d["old"]},
        "new_test_mae_meV": {v: {n: mean(s) for n, s in c.items()} for v, c in d["new_test_mae_meV"].items()},
        "old_change_meV": {
            v: {n: {m: mean(s) for m, s in cells.items()} for n, cells in c.items() if any(cells.values())}
            for v, c in d["old_change_meV"].items()
        },
        "old_change_max_abs_meV": {
            v: {n: _max_abs(cells) for n, cells in c.items() if any(cells.values())}
            for v, c in d["old_change_meV"].items()
        },
        "old_fidelities_unchanged": {
            v: {n: all(b) for n, b in c.items()} for v, c in d["old_fidelities_unchanged"].items()
        },
    }


def write_few_shot_report(ctx: Context, plans: list[RunPlan], old: list[str], coverage: dict) -> dict:
    d = few_shot_details(ctx, plans, list(old), coverage)
    summary = summarize(d)
    out = ctx.paths.output
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    atomic_write(out / "details.json", lambda f: f.write(json.dumps(d, indent=1, default=float).encode()))
    figure = (
        plot(out / "few_shot.png", d, ctx.spec.name)
        if any(any(c.values()) for c in d["new_test_mae_meV"].values())
        else None
    )
    atomic_write(out / "README.md", lambda f: f.write(render(ctx, d, summary, figure is not None).encode()))
    return summary


# ---------------------------------------------------------------------------------------------- figure
def plot(path: Path, d: dict, title: str) -> Path:
    """Left: the new method's test MAE vs n (log-log); right: mean change of the old methods' test MAE vs n
    (symmetric log scale, linear within ±1 meV)."""
    from multifi_experiments.plots import MARKERS, _plt, _save

    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.8, 4.6))
    for k, (v, info) in enumerate(d["variants"].items()):
        style = {"marker": MARKERS[k % len(MARKERS)], "color": f"C{k % 10}", "capsize": 3, "label": info["label"]}
        style["linestyle"] = "--" if info["kind"] != "extend" else "-"
        cells = {int(n): s for n, s in d["new_test_mae_meV"][v].items() if s}
        if cells:
            ns = sorted(cells)
            left.errorbar(ns, [cells[n]["mean"] for n in ns], yerr=[cells[n]["std"] or 0 for n in ns], **style)
        per_n = {}
        for n, by_m in d["old_change_meV"][v].items():
            values = [s["mean"] for s in by_m.values() if s]
            if values:
                per_n[int(n)] = float(np.mean(values))
        if per_n:
            ns = sorted(per_n)
            right.plot(ns, [per_n[n] for n in ns], **{k: x for k, x in style.items() if k != "capsize"})
    left.set(xscale="log", yscale="log", xlabel=f"{d['new']} training labels n", ylabel=f"{d['new']} test MAE (meV)")
    right.set(
        xscale="log",
        xlabel=f"{d['new']} training labels n",
        ylabel="old methods: mean change of test MAE (meV, symlog)",
    )
    right.set_yscale("symlog", linthresh=1.0)  # 0 (an unchanged old method) and large forgetting on one axis
    right.axhline(0.0, color="grey", linewidth=0.8)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- README
def _cell(s: dict | None, digits: int = 1, sign: bool = False) -> str:
    if not s:
        return "–"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(s["mean"])
    return f"{text} (1 seed)" if s.get("std") is None else f"{text} ± {s['std']:.{digits}f}"


def render(ctx: Context, d: dict, summary: dict, figure: bool) -> str:
    fs = ctx.spec.few_shot
    ns = [str(n) for n in d["ns"]]
    old = d["old"]
    cov = d["coverage"]
    blocks = ", ".join(f"{m} {cov[m]['train']}/{cov[m]['val']}/{cov[m]['test']}" for m in old)
    lines = [
        f"# {ctx.spec.name}",
        "",
        ctx.spec.description,
        "",
        "Generated by `multifi experiment run` from the run results in `runs/few_shot/`; do not edit.",
        "",
        f"Made with: {', '.join(f'`{c}`' for c in d['commands']) or '(no finished run yet)'}",
        "",
        (
            f"Base model: one joint model ({d['inject']}) on the blocks of `{fs.blocks}` except {d['new']}'s "
            f"(train/val/test molecules: {blocks}). {d['new']}: {d['test']} test and {d['val']} validation "
            f"molecules of its block (validation picks checkpoints only), training sets of n = {', '.join(ns)} "
            f"from the rest of the block (per seed, nested). Every model is tested on the same molecules. "
            f"Runs finished: {d['runs_finished']} of {d['runs_planned']}; summed {summary['cpu_hours']:.2f} CPU-hours, "
            f"{d['wall_seconds'] / 3600:.2f} h wall. Machine: {machine()}."
        ),
        "",
    ]
    if ctx.spec.notes:
        lines += [ctx.spec.notes, ""]
    lines += [
        f"## {d['new']} test MAE (meV), mean ± std over seeds",
        "",
        "| variant | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---" * (1 + len(ns)) + "|",
    ]
    for v, info in d["variants"].items():
        lines.append(f"| {info['label']} | " + " | ".join(_cell(d["new_test_mae_meV"][v].get(n)) for n in ns) + " |")
    for v, per_n in d.get("new_test_unseen", {}).items():
        counts = "; ".join(f"n = {n}: {', '.join(str(c) for c in cs)}" for n, cs in per_n.items())
        lines += [
            "",
            f"{d['variants'][v]['label']}: test molecules left out of its MAE because they contain an element "
            f"none of its training labels contained (no reference energy; per seed): {counts} of {d['test']}.",
        ]
    if figure:
        lines += ["", "![few-shot](few_shot.png)"]
    base = d["base"]
    lines += [
        "",
        "## Forgetting: change of every old method's test MAE against the base model (meV)",
        "",
        "Extensions: the extension's own before/after on the base model's test molecules; the retrained joint "
        "model: its test MAE minus the base model's (another training run: run-to-run noise is included). "
        "`bit-for-bit`: every weight an old method's prediction depends on is unchanged (all seeds).",
        "",
        "| variant | n | " + " | ".join(old) + " | bit-for-bit |",
        "|---|---" + "|---" * len(old) + "|---|",
    ]
    if base is not None:
        lines.append(
            "| base model (test MAE) | – | " + " | ".join(f"{base['test'][m]['mae_meV']:.1f}" for m in old) + " | |"
        )
    for v, info in d["variants"].items():
        if info["kind"] == "scratch":
            continue
        for n in ns:
            cells = d["old_change_meV"][v].get(n, {})
            if not any(cells.values()):
                continue
            flags = d["old_fidelities_unchanged"].get(v, {}).get(n)
            same = "–" if flags is None else ("yes" if all(flags) else "no")
            lines.append(
                f"| {info['label']} | {n} | "
                + " | ".join(_cell(cells.get(m), 2, sign=True) for m in old)
                + f" | {same} |"
            )
    cpu = d["cpu_seconds"]
    lines += [
        "",
        "## Cost (CPU-hours, finished runs)",
        "",
        "| " + " | ".join(cpu) + " |",
        "|---" * len(cpu) + "|",
        "| " + " | ".join(f"{s / 3600:.3f}" for s in cpu.values()) + " |",
    ]
    return "\n".join(lines) + "\n"
