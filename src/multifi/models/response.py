"""Forces and stress as derivatives of the energy, by autograd, in one place."""
from __future__ import annotations

import torch

EV_PER_A3_TO_GPA = 160.21766208


def strained(positions, cell, batch, n_graphs: int, need_stress: bool):
    """Apply a symmetric zero strain ε [B,3,3] to positions and cells so that dE/dε gives the virial."""
    if not need_stress:
        return positions, cell, None
    eps = torch.zeros(n_graphs, 3, 3, dtype=positions.dtype, device=positions.device, requires_grad=True)
    sym = 0.5 * (eps + eps.transpose(1, 2))
    positions = positions + torch.einsum("na,nab->nb", positions, sym[batch])
    cell = cell + torch.bmm(cell, sym)
    return positions, cell, eps


def derivatives(energy, positions, eps, volume, create_graph: bool):
    """forces [N,3] = −∂E/∂r (eV/Å); stress [B,3,3] = (1/V) ∂E/∂ε in GPa (ASE sign), or None."""
    inputs = [positions] + ([eps] if eps is not None else [])
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
    g_pos = grads[0] if grads[0] is not None else torch.zeros_like(positions)
    forces = -g_pos
    stress = None
    if eps is not None:
        g_eps = grads[1] if grads[1] is not None else torch.zeros_like(eps)
        safe_v = torch.where(volume > 0, volume, torch.ones_like(volume))
        stress = g_eps / safe_v.view(-1, 1, 1).to(g_eps.dtype) * EV_PER_A3_TO_GPA
        stress = stress * (volume > 0).view(-1, 1, 1).to(stress.dtype)
    return forces, stress
