"""Data-efficiency factor: how many times more data a reference model needs for a given error.

Learning curves are close to power laws, MAE ≈ a·n^(−b), i.e. straight lines in log-log space, so the
reference curve is interpolated piecewise-linearly in (log n, log MAE). A target error outside the
range the reference curve covers is reached by extending its first or last segment (a power law
through the two end points) and flagged as an extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: how far beyond the measured sizes an extrapolation reports (a factor in n; beyond it: undefined, as for a flat
#: curve): a power law through two points says little two decades away (a flat end segment gave 4.5e9)
MAX_EXTRAPOLATION = 100.0


@dataclass
class Efficiency:
    n: float  # training-set size at which the target error was measured
    target_mae: float  # error of the model being compared, at n
    n_reference: float | None  # reference training-set size reaching target_mae (None: never, by the fit)
    factor: float | None  # n_reference / n
    extrapolated: bool  # n_reference lies outside the measured reference curve
    note: str = ""
    # where the target lies if the reference curve never reaches it between measured points: "beyond" (an error
    # below every measured reference error: the reference needs more than its largest n) or "before" (above
    # every one: the reference needs less than its smallest n); "" when interpolated
    outside: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _points(ns, maes) -> list[tuple[float, float]]:
    """(n, MAE) of a curve with positive values, by ascending n."""
    return sorted((float(n), float(m)) for n, m in zip(ns, maes) if m is not None and m > 0 and n > 0)


def n_for_error(ns, maes, target: float) -> tuple[float | None, bool, str]:
    """Training-set size at which the reference curve (ns, maes) reaches `target` error.

    Returns (n, extrapolated, note). The reference reaches an error at the smallest n where its curve is at or
    below it: an error at or above the curve's at its smallest n is reached there or before (the first segment
    extended, when it decreases); otherwise log-log linear interpolation on the segment where the curve first
    falls to the target (a noisy, rising segment before it never counts); an error below every point is reached
    beyond the largest n (the end segment extended).
    """
    pts = _points(ns, maes)
    if len(pts) < 2:
        return None, True, "reference curve has fewer than two points"
    if not target > 0:
        return None, True, "target error must be positive"
    x = [math.log(n) for n, _ in pts]
    y = [math.log(m) for _, m in pts]
    t = math.log(target)
    if t == y[0]:
        return math.exp(x[0]), False, ""
    if t > y[0]:  # the reference is already this good at its smallest n
        return _extend(x, y, t, 0, "below the smallest")
    for i in range(len(pts) - 1):
        if y[i + 1] <= t:  # first point at or below the target (y[i] > t)
            return math.exp(x[i] + (t - y[i]) * (x[i + 1] - x[i]) / (y[i + 1] - y[i])), False, ""
    return _extend(x, y, t, len(pts) - 2, "beyond the largest")


def _extend(x: list[float], y: list[float], t: float, i: int, where: str) -> tuple[float | None, bool, str]:
    """The power law through points i and i + 1 of the log-log curve (x, y), solved for log-error t."""
    slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    if slope >= 0:
        return None, True, f"target {where} measured n, and the reference curve does not decrease there"
    log_n = x[i] + (t - y[i]) / slope
    if not x[0] - math.log(MAX_EXTRAPOLATION) <= log_n <= x[-1] + math.log(MAX_EXTRAPOLATION):
        return (
            None,
            True,
            (
                f"target {where} measured n, and the reference curve's end segment is almost flat (its power law "
                f"reaches the target only more than {MAX_EXTRAPOLATION:g}× beyond the measured n)"
            ),
        )
    return math.exp(log_n), True, f"extrapolated {where} measured n (power law of the end segment)"


def efficiency_factor(ref_ns, ref_maes, n: float, target_mae: float) -> Efficiency:
    """n_reference(target_mae) / n: how many times more data the reference model needs."""
    n_ref, extrapolated, note = n_for_error(ref_ns, ref_maes, target_mae)
    factor = None if n_ref is None else n_ref / n
    pts = _points(ref_ns, ref_maes)
    outside = ""
    if len(pts) > 1 and target_mae > 0:  # as n_for_error decides
        outside = "before" if target_mae > pts[0][1] else "beyond" if target_mae < min(m for _, m in pts) else ""
    return Efficiency(
        n=n,
        target_mae=target_mae,
        n_reference=n_ref,
        factor=factor,
        extrapolated=extrapolated,
        note=note,
        outside=outside,
    )


def bounded(e: dict, ref_ns) -> tuple[float | None, str | None]:
    """(factor, bound) of an efficiency (as_dict) measured against the reference sizes ref_ns.

    Outside the measured reference curve only a bound is measured: an error below every reference error
    needs more than the largest n, factor > n_max / n (bound "lower"); an error above every reference
    error needs less than the smallest n, factor < n_min / n (bound "upper"). Power-law extensions of the
    curve are estimates and never stand in for these bounds.
    """
    ns = [float(n) for n in ref_ns]
    if e.get("outside") == "beyond" and ns:
        return max(ns) / e["n"], "lower"
    if e.get("outside") == "before" and ns:
        return min(ns) / e["n"], "upper"
    return e["factor"], None


def non_monotone(ref_ns, ref_maes) -> list[float]:
    """Reference sizes whose error is not below the error at the next smaller size (a noisy curve: factors then
    use the smallest n at which the curve first reaches an error, n_for_error)."""
    pts = sorted((float(n), float(m)) for n, m in zip(ref_ns, ref_maes) if m is not None)
    return [b[0] for a, b in zip(pts, pts[1:]) if b[1] >= a[1]]
