"""Energy head: atomwise readout MLP(s) plus per-fidelity reference energies and scale."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from multifi.nn import MLP

N_ELEMENTS = 119


class EnergyHead(nn.Module):
    """Atom energies E_i = scale[f] · MLP([s_i, c_i]) + ref[Z_i, f]  (eV), float64 on output.

    With `heads`, one MLP per fidelity; otherwise one MLP shared by all fidelities.
    ref [119, K] eV and scale [K] eV are buffers fitted on the training labels (fit_baseline).
    With `shared_baseline` (fidelity-blind models, mode `single`) every fidelity uses column 0 of
    ref and scale, fitted on all fidelities pooled (fit_baseline(..., pooled=True)).
    """

    def __init__(self, features: int, n_fidelities: int, readout_dim: int = 0, heads: bool = False,
                 hidden: int | None = None, shared_baseline: bool = False):
        super().__init__()
        hidden = hidden or max(features // 2, 1)
        n_mlps = n_fidelities if heads else 1
        self.heads = heads
        self.shared_baseline = shared_baseline
        self.mlps = nn.ModuleList(MLP([features + readout_dim, hidden, 1]) for _ in range(n_mlps))
        self.register_buffer("ref", torch.zeros(N_ELEMENTS, n_fidelities, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_fidelities, dtype=torch.float64))

    def forward(self, s: torch.Tensor, cond: torch.Tensor | None, numbers: torch.Tensor,
                fid_atom: torch.Tensor) -> torch.Tensor:
        """s [N,F], cond [N,d] or None, numbers [N], fid_atom [N] → atom energies [N] float64 eV."""
        x = s if cond is None else torch.cat([s, cond], dim=-1)
        # every head on every atom (heads are small), then each atom's own: no data-dependent shapes; a head
        # whose fidelity a batch lacks gets a zero gradient (not None), like the rows of an embedding table
        if self.heads:
            y = torch.cat([mlp(x) for mlp in self.mlps], dim=-1).gather(1, fid_atom.unsqueeze(-1)).squeeze(-1)
        else:
            y = self.mlps[0](x).squeeze(-1)
        col = torch.zeros_like(fid_atom) if self.shared_baseline else fid_atom
        return y.double() * self.scale[col] + self.ref[numbers, col]

    def _apply(self, fn, recurse=True):
        """Module casts (.float(), .to(dtype)) move ref/scale between devices but keep them float64:
        total energies of hundreds of eV need double precision for meV accuracy."""
        keep = {"ref": self.ref, "scale": self.scale}
        super()._apply(fn, recurse)
        for name, before in keep.items():
            setattr(self, name, before.to(device=getattr(self, name).device, dtype=torch.float64))
        return self

    @torch.no_grad()
    def set_baseline(self, ref: np.ndarray, scale: np.ndarray) -> None:
        self.ref.copy_(torch.as_tensor(ref, dtype=torch.float64))
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float64))


def fit_baseline(dataset, pairs: np.ndarray, ridge: float = 1e-8, pooled: bool = False,
                 shared_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-fidelity atomic reference energies (least squares on composition) and residual scales.

    dataset: FidelityDataset; pairs [P, 2] (structure, fidelity) training samples.
    Returns ref [119, K] eV per atom of each element, scale [K] eV: the standard deviation of the
    per-atom residual energy (fallback: RMS of force labels, then 1 eV).
    With `pooled`, the labels of all fidelities are fitted together and every column holds that fit.
    With `shared_scale`, references stay per fidelity but every fidelity gets one scale: the standard
    deviation of the per-atom residuals of all fidelities together (a fidelity with a handful of
    labels otherwise gets a scale from a near-exact fit, or the force fallback, far from the others').
    """
    K = len(dataset.fidelities)
    ref, scale = np.zeros((N_ELEMENTS, K)), np.ones(K)
    elements, counts = composition_matrix(dataset)  # [n_el], [S, n_el]
    residuals = []
    for ks in ([list(range(K))] if pooled else [[k] for k in range(K)]):
        sel = pairs[np.isin(pairs[:, 1], ks)]
        sel = sel[~np.isnan(dataset.energy[sel[:, 0], sel[:, 1]])]
        s, k = sel[:, 0], sel[:, 1]
        if len(s) == 0:
            scale[ks] = _force_rms(dataset, pairs, ks)
            continue
        y = np.asarray(dataset.energy)[s, k]
        coef, cols, resid = _least_squares(counts, s, y, ridge)
        ref[np.ix_(elements[cols], ks)] = coef[:, None]
        scale[ks] = float(resid.std()) if len(s) > 1 and resid.std() > 1e-4 else _force_rms(dataset, pairs, ks)
        residuals.append(resid)
    if shared_scale and not pooled and residuals:
        resid = np.concatenate(residuals)
        all_ks = list(range(K))
        scale[:] = float(resid.std()) if len(resid) > 1 and resid.std() > 1e-4 else _force_rms(dataset, pairs, all_ks)
    return ref, scale


def _least_squares(counts: np.ndarray, rows: np.ndarray, y: np.ndarray, ridge: float, chunk: int = 262144):
    """Ridge least squares y ≈ counts[rows] @ coef, in chunks (bounded memory for millions of rows).

    Returns coef [n_cols], the used columns (elements present in rows) and per-atom residuals [n]."""
    n_el = counts.shape[1]
    ata, aty = np.zeros((n_el, n_el)), np.zeros(n_el)
    for a in range(0, len(rows), chunk):
        X = counts[rows[a:a + chunk]].astype(np.float64)
        ata += X.T @ X
        aty += X.T @ y[a:a + chunk]
    cols = np.flatnonzero(np.diag(ata) > 0)
    coef = np.linalg.solve(ata[np.ix_(cols, cols)] + ridge * len(rows) * np.eye(len(cols)), aty[cols])
    resid = np.empty(len(rows))
    for a in range(0, len(rows), chunk):
        X = counts[rows[a:a + chunk]][:, cols].astype(np.float64)
        resid[a:a + chunk] = (y[a:a + chunk] - X @ coef) / X.sum(1)
    return coef, cols, resid


def composition_matrix(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Elements present [n_el] (atomic numbers) and element counts per structure [S, n_el] (int32)."""
    S = len(dataset)
    numbers = np.asarray(dataset.numbers)
    elements = np.unique(numbers).astype(np.int64)
    struct = np.repeat(np.arange(S, dtype=np.int32 if S < 2**31 else np.int64), dataset.n_atoms)
    out = np.zeros((S, len(elements)), np.int32)
    for c, z in enumerate(elements):  # one bincount per element: far faster than np.add.at
        out[:, c] = np.bincount(struct[numbers == z], minlength=S)
    return elements, out


def _force_rms(dataset, pairs, ks) -> float:
    if dataset.forces is None:
        return 1.0
    sel = pairs[np.isin(pairs[:, 1], ks)]
    sel = sel[dataset.forces_mask[sel[:, 0], sel[:, 1]]]
    if len(sel) == 0:
        return 1.0
    from multifi.data.dataset import ranges

    n = dataset.n_atoms[sel[:, 0]]
    f = dataset.forces[ranges(dataset.offsets[sel[:, 0]], n), np.repeat(sel[:, 1], n)]
    return float(np.sqrt((f.astype(np.float64) ** 2).mean())) or 1.0
