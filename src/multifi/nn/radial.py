"""Radial bases and cutoff functions of the interatomic distance r (Å)."""

from __future__ import annotations

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sin(n π r / r_c) / r for n = 1..n_basis (PaiNN, DimeNet); [E] → [E, n_basis]."""

    def __init__(self, cutoff: float, n_basis: int = 20, trainable: bool = False):
        super().__init__()
        freq = torch.arange(1, n_basis + 1, dtype=torch.float32) * math.pi / cutoff
        self.freq = nn.Parameter(freq, requires_grad=trainable)
        self.norm = math.sqrt(2.0 / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return self.norm * torch.sin(self.freq * r) / r


class CosineCutoff(nn.Module):
    """0.5 (cos(π r / r_c) + 1) for r < r_c, else 0."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.cos(r * math.pi / self.cutoff) + 1.0) * (r < self.cutoff).to(r.dtype)


class PolynomialCutoff(nn.Module):
    """Smooth polynomial envelope 1 − 6x⁵ + 15x⁴ − 10x³ with x = r / r_c (zero value and slopes at r_c)."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = r / self.cutoff
        f = 1 - 6 * x**5 + 15 * x**4 - 10 * x**3
        return f * (x < 1).to(r.dtype)


def second_order(r: torch.Tensor, f: torch.Tensor, df: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """A function of the distances r [E] given by its values f and derivatives df, ddf [E, ...] (evaluated without
    autograd): f + δ df + δ²/2 ddf with δ = r − r.detach(), zero in value, so autograd sees exact first and second
    derivatives in r (forces, and their training's double backward) without differentiating how f was computed."""
    d = (r - r.detach()).view(-1, *([1] * (f.dim() - 1)))
    return f.to(r.dtype) + d * (df.to(r.dtype) + 0.5 * d * ddf.to(r.dtype))
