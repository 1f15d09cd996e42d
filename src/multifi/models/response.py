"""Forces and stress from the derivative of the energy with respect to the edge vectors.

Every backbone sees positions only through the edge vectors r_ij = r_j − r_i + shift (Å), so
g_ij = ∂E/∂r_ij (eV/Å) gives both: forces F_i = Σ_j g_ij − Σ_j g_ji, and under a homogeneous
strain ε every edge vector (shifts included) becomes r_ij (1 + ε), so ∂E/∂ε = Σ r_ij ⊗ g_ij per
structure: the virial, whose symmetric part over the volume is the stress.
"""

from __future__ import annotations

import torch

from multifi.nn import scatter_sum

EV_PER_A3_TO_GPA = 160.21766208


def forces_from_edge_gradient(g: torch.Tensor, edge_index: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """g [E,3] = ∂E/∂r_ij → forces [N,3] = −∂E/∂r (eV/Å)."""
    i, j = edge_index
    return scatter_sum(g, i, n_atoms) - scatter_sum(g, j, n_atoms)


def stress_from_edge_gradient(
    g: torch.Tensor, edge_vec: torch.Tensor, edge_graph: torch.Tensor, volume: torch.Tensor
) -> torch.Tensor:
    """g [E,3], edge_vec [E,3] Å, edge_graph [E] structure of each edge, volume [B] Å³ → stress [B,3,3]
    in GPa, ASE sign convention (positive under tension); zero for structures without a cell."""
    virial = scatter_sum(edge_vec.unsqueeze(-1) * g.unsqueeze(-2), edge_graph, volume.shape[0])  # [B,3,3] eV
    virial = 0.5 * (virial + virial.transpose(1, 2))
    periodic = volume > 0
    safe_v = torch.where(periodic, volume, torch.ones_like(volume)).view(-1, 1, 1).to(g.dtype)
    return virial / safe_v * EV_PER_A3_TO_GPA * periodic.view(-1, 1, 1).to(g.dtype)
