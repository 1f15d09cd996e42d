"""Plain-text tables for the terminal."""

from __future__ import annotations

from multifi.keys import (
    COUNT,
    ENERGY_MAE,
    ENERGY_MAE_PER_ATOM,
    ENERGY_RMSE,
    ENERGY_RMSE_PER_ATOM,
    ESTIMATED,
    FITTED_ONLY,
    FORCES_COUNT,
    FORCES_MAE,
    FORCES_RMSE,
    STRESS_MAE,
)


def metrics_table(fidelities: dict[str, dict], title: str = "") -> str:
    cols = [
        (COUNT, "n energies", "{:d}"),
        (ENERGY_MAE, "E MAE meV", "{:.2f}"),
        (ENERGY_RMSE, "E RMSE meV", "{:.2f}"),
        (ENERGY_MAE_PER_ATOM, "E MAE meV/atom", "{:.3f}"),
        (ENERGY_RMSE_PER_ATOM, "E RMSE meV/atom", "{:.3f}"),
        (FORCES_MAE, "F MAE meV/Å", "{:.1f}"),
        (FORCES_RMSE, "F RMSE meV/Å", "{:.1f}"),
        (STRESS_MAE, "S MAE GPa", "{:.3f}"),
    ]
    if any(m.get(FORCES_COUNT, m.get(COUNT)) != m.get(COUNT) for m in fidelities.values()):
        cols.insert(5, (FORCES_COUNT, "n forces", "{:d}"))  # forces on other structures than the energies
    rows = []
    for name, m in fidelities.items():
        rows.append((name, m))
        if m.get(ESTIMATED):  # the same fidelity without the structures whose references were estimated
            rows.append((f"  without {m[ESTIMATED]} estimated", m[FITTED_ONLY]))
    width = max([len("fidelity")] + [len(n) for n, _ in rows]) + 2
    lines = [title] if title else []
    lines.append("fidelity".ljust(width) + "".join(h.rjust(16) for _, h, _ in cols))
    for name, m in rows:
        subset = name.startswith("  without ")  # the estimate moves energies only: forces and stress as above
        cells = [
            (
                ""
                if subset and k in (FORCES_COUNT, FORCES_MAE, FORCES_RMSE, STRESS_MAE)
                else "-"
                if m.get(k) is None
                else fmt.format(m[k])
            ).rjust(16)
            for k, _, fmt in cols
        ]
        lines.append(name.ljust(width) + "".join(cells).rstrip())
    return "\n".join(lines)


def forgetting_table(forgetting: dict[str, dict], unchanged: bool) -> str:
    """Old fidelities' errors before and after an extension (multifi extend)."""
    head = "old fidelities: weights bit-for-bit unchanged" if unchanged else "old fidelities (forgetting)"
    if not forgetting:
        return f"{head}; errors not measured (no run directory with the model's data)"
    cols = [(ENERGY_MAE, "E MAE meV", "{:.2f}"), (FORCES_MAE, "F MAE meV/Å", "{:.1f}")]
    if any(f[w].get(STRESS_MAE) is not None for f in forgetting.values() for w in ("before", "after")):
        cols.append((STRESS_MAE, "S MAE GPa", "{:.3f}"))
    sub = {n: _without_estimated(f) for n, f in forgetting.items()}
    width = max([len("fidelity")] + [len(n) for n in forgetting] + [len(r[0]) for r in sub.values() if r]) + 2
    first = next(iter(forgetting.values()))
    on = f"{first['split']} split, the same structures before and after (n per fidelity)"
    left = first.get("left_out", 0)
    on += f"; {left} with elements new to the model left out" if left else ""
    lines = [
        f"{head}, {on}",
        "fidelity".ljust(width)
        + "n".rjust(8)
        + "".join(f"{h} {w}".rjust(20) for _, h, _ in cols for w in ("before", "after")),
    ]
    for name, f in forgetting.items():
        rows = [(name, f["before"], f["after"])] + ([sub[name]] if sub[name] else [])
        for label, before, after in rows:
            cells = [
                ("-" if m.get(k) is None else fmt.format(m[k])).rjust(20) for k, _, fmt in cols for m in (before, after)
            ]
            lines.append(label.ljust(width) + str(before.get(COUNT, "-")).rjust(8) + "".join(cells))
    return "\n".join(lines)


def _without_estimated(f: dict) -> tuple[str, dict, dict] | None:
    """The forgetting row of a fidelity's structures without estimated references (label, before, after), when
    some had them: a change there is the model's, not the estimates'."""
    before, after = f["before"].get(FITTED_ONLY), f["after"].get(FITTED_ONLY)
    if not isinstance(before, dict) or not isinstance(after, dict):
        return None
    return f"  without {f['before'].get(ESTIMATED, '?')} estimated", before, after


def doubtful_units_note(payload: dict) -> str | None:
    """A reminder beside the test errors when the unit checks doubted some labels (metrics.json doubtful_units):
    their errors are in the labels' units, whatever those are."""
    doubtful = payload.get("doubtful_units") or {}
    if not doubtful:
        return None
    which = "; ".join(f"{label} at {', '.join(names)}" for label, names in doubtful.items())
    return (
        f"note: these labels looked like another unit when read ({which}; the warnings are in train.log): "
        "their errors above are in the labels' own units; fix the data and train again if the warning was right"
    )
