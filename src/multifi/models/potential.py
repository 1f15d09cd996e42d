"""Potential = fidelity conditioning + representation + energy head; forces and stress by autograd."""
from __future__ import annotations

import torch
from torch import nn

from multifi.data.batch import Graph
from multifi.data.fidelity import FidelityTable
from multifi.models.head import EnergyHead
from multifi.models.response import derivatives, strained
from multifi.nn import scatter_sum
from multifi.nn.fidelity import FidelityConditioning


class Potential(nn.Module):
    """An interatomic potential that predicts at any of its fidelities.

    forward(graph) → {"energy": [B] float64 eV, "forces": [N,3] eV/Å, "stress": [B,3,3] GPa (ASE sign)}
    (forces/stress only when asked). The fidelity of each structure is graph.fidelity [B].
    """

    def __init__(self, representation: nn.Module, conditioning: FidelityConditioning, head: EnergyHead,
                 fidelities: FidelityTable, cutoff: float, spec: dict):
        super().__init__()
        self.representation = representation
        self.conditioning = conditioning
        self.head = head
        self.fidelities = fidelities
        self.cutoff = float(cutoff)
        self.spec = spec  # constructor arguments; saved with the weights and used to rebuild

    @property
    def elements(self) -> list[int]:
        """Atomic numbers that have a reference energy at some fidelity (the elements seen in training)."""
        return torch.nonzero(self.head.ref.abs().sum(1) > 0).flatten().tolist()

    def forward(self, graph: Graph, forces: bool = False, stress: bool = False,
                create_graph: bool = False) -> dict[str, torch.Tensor]:
        B = graph.num_graphs
        stress = stress and bool((graph.cell.abs().sum((1, 2)) > 0).any())
        need_grad = forces or stress
        with torch.set_grad_enabled(need_grad or torch.is_grad_enabled()):
            positions = graph.positions
            if need_grad:
                positions = positions.detach().requires_grad_(True)
            pos, cell, eps = strained(positions, graph.cell, graph.batch, B, stress)
            i, j = graph.edge_index
            shift = torch.einsum("ea,eab->eb", graph.shifts, cell[graph.batch[i]])
            edge_vec = pos[j] - pos[i] + shift
            fid_atom = graph.fidelity[graph.batch]
            s = self.representation(graph.numbers, graph.edge_index, edge_vec,
                                    self.conditioning.input_condition(fid_atom))
            atom_energy = self.head(s, self.conditioning.readout_condition(fid_atom), graph.numbers, fid_atom)
            energy = scatter_sum(atom_energy, graph.batch, B)
            out = {"energy": energy}
            if need_grad:
                f, st = derivatives(energy, positions, eps, graph.volume(), create_graph)
                if forces:
                    out["forces"] = f
                if st is not None:
                    out["stress"] = st
            if not create_graph and need_grad:
                out = {k: v.detach() for k, v in out.items()}
        return out

    def fidelity_index(self, name: str) -> int:
        return self.fidelities.index(name, where="model")
