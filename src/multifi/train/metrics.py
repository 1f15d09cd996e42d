"""Per-fidelity error accumulators: energy MAE/RMSE (meV, meV/atom), force MAE/RMSE (meV/Å), stress MAE (GPa)."""

from __future__ import annotations

import math

import torch

from multifi.data.batch import Graph
from multifi.keys import (
    COUNT,
    ENERGY_MAE,
    ENERGY_MAE_PER_ATOM,
    ENERGY_RMSE,
    ENERGY_RMSE_PER_ATOM,
    FORCES_COSINE,
    FORCES_COUNT,
    FORCES_MAE,
    FORCES_RMSE,
    FORCES_SLOPE,
    STRESS_MAE,
)

# columns of the accumulator
N_E, AE, SE, AE_ATOM, N_F, AE_F, N_S, AE_S, F_LP, F_PP, F_LL, SE_ATOM, SE_F, N_FS = range(14)


class FidelityMetrics:
    """Sums of errors per fidelity, reducible across processes; .compute() gives metrics.json entries."""

    def __init__(self, fidelity_names: list[str]):
        self.names = list(fidelity_names)
        self.reset()

    def reset(self):
        self.acc = torch.zeros(len(self.names), N_FS + 1, dtype=torch.float64)

    @classmethod
    def in_groups(cls, fidelity_names: list[str], n_groups: int) -> FidelityMetrics:
        """One accumulator for `n_groups` groups of samples: updated with slots group · K + fidelity (K names), then
        `split` into one per group."""
        return cls(list(fidelity_names) * n_groups)

    def split(self, n_groups: int) -> list[FidelityMetrics]:
        """The accumulators of `in_groups`, one per group."""
        k = len(self.names) // n_groups
        parts = [FidelityMetrics(self.names[:k]) for _ in range(n_groups)]
        for g, part in enumerate(parts):
            part.acc = self.acc[g * k : (g + 1) * k].clone()
        return parts

    def __add__(self, other: FidelityMetrics) -> FidelityMetrics:
        """The accumulator of both sets of samples (the same fidelity names)."""
        total = FidelityMetrics(self.names)
        total.acc = self.acc + other.acc
        return total

    def update(self, out: dict, graph: Graph, slots: torch.Tensor | None = None) -> None:
        """Add the errors of `out` against `graph`'s labels; `slots` [B]: the row each structure adds to (its
        fidelity when not given)."""
        acc = torch.zeros_like(self.acc)
        fid = (graph.fidelity if slots is None else slots).cpu()
        m = graph.energy_mask.cpu()
        if m.any():
            err = (out["energy"].detach().cpu().double() - graph.energy.cpu().double())[m]
            n = graph.n_atoms.cpu()[m].double()
            f = fid[m]
            acc[:, N_E].index_add_(0, f, torch.ones_like(err))
            acc[:, AE].index_add_(0, f, err.abs())
            acc[:, SE].index_add_(0, f, err**2)
            acc[:, AE_ATOM].index_add_(0, f, err.abs() / n)
            acc[:, SE_ATOM].index_add_(0, f, (err / n) ** 2)
        if "forces" in out and graph.forces_mask.any():
            am = graph.forces_mask[graph.batch].cpu()
            pred, label = out["forces"].detach().cpu().double()[am], graph.forces.cpu().double()[am]  # [n,3]
            fa = fid[graph.batch.cpu()][am]
            acc[:, N_F].index_add_(0, fa, torch.full((len(fa),), 3.0, dtype=torch.float64))
            acc[:, AE_F].index_add_(0, fa, (pred - label).abs().sum(-1))
            acc[:, SE_F].index_add_(0, fa, ((pred - label) ** 2).sum(-1))
            acc[:, F_LP].index_add_(0, fa, (label * pred).sum(-1))
            acc[:, F_PP].index_add_(0, fa, (pred * pred).sum(-1))
            acc[:, F_LL].index_add_(0, fa, (label * label).sum(-1))
            fs = fid[graph.forces_mask.cpu()]
            acc[:, N_FS].index_add_(0, fs, torch.ones(len(fs), dtype=torch.float64))
        if "stress" in out and graph.stress_mask.any():
            sm = graph.stress_mask.cpu()
            serr = (out["stress"].detach().cpu().double() - graph.stress.cpu().double())[sm].abs()
            acc[:, N_S].index_add_(0, fid[sm], torch.full((int(sm.sum()),), 9.0, dtype=torch.float64))
            acc[:, AE_S].index_add_(0, fid[sm], serr.sum((-1, -2)))
        self.acc += acc

    def compute(self) -> dict[str, dict]:
        """{fidelity: {COUNT, *METRIC_KEYS}} (multifi.keys), the metrics.json entries."""
        out = {}
        for k, name in enumerate(self.names):
            a = self.acc[k].tolist()
            if a[N_E] == 0 and a[N_F] == 0 and a[N_S] == 0:
                continue
            ne = a[N_E]
            out[name] = {
                COUNT: int(ne),
                ENERGY_MAE: 1000 * a[AE] / ne if ne else None,
                ENERGY_RMSE: 1000 * math.sqrt(a[SE] / ne) if ne else None,
                ENERGY_MAE_PER_ATOM: 1000 * a[AE_ATOM] / ne if ne else None,
                ENERGY_RMSE_PER_ATOM: 1000 * math.sqrt(a[SE_ATOM] / ne) if ne else None,
                FORCES_MAE: 1000 * a[AE_F] / a[N_F] if a[N_F] else None,
                FORCES_RMSE: 1000 * math.sqrt(a[SE_F] / a[N_F]) if a[N_F] else None,
                STRESS_MAE: a[AE_S] / a[N_S] if a[N_S] else None,
            }
            if a[N_F]:
                out[name][FORCES_COUNT] = int(a[N_FS])
            if a[N_F] and a[F_PP] > 0:
                out[name][FORCES_SLOPE] = a[F_LP] / a[F_PP]
                if a[F_LL] > 0:
                    out[name][FORCES_COSINE] = a[F_LP] / math.sqrt(a[F_LL] * a[F_PP])
        return out
