"""PaiNN (Schütt, Unke, Gastegger, ICML 2021): equivariant message passing with scalar and vector features."""

from __future__ import annotations

import torch
from torch import nn

from multifi.nn import MLP, BesselBasis, CosineCutoff, scatter_sum


class PaiNNMessage(nn.Module):
    """Scalar and vector messages from neighbours j to centres i, filtered by the radial basis."""

    def __init__(self, features: int, n_rbf: int):
        super().__init__()
        self.F = features
        self.phi = MLP([features, features, 3 * features])
        self.filter = nn.Linear(n_rbf, 3 * features)

    def forward(self, s, v, edge_index, rbf, fcut, unit):
        # s [N,F], v [N,3,F], rbf [E,n_rbf], fcut [E] cutoff envelope, unit [E,3]
        i, j = edge_index
        # the envelope multiplies the filter *after* its bias: messages vanish smoothly at the cutoff
        x = self.phi(s).index_select(0, j) * (self.filter(rbf) * fcut.unsqueeze(-1))  # [E, 3F]
        ds, dvv, dvs = torch.split(x, self.F, dim=-1)
        dv = dvv.unsqueeze(1) * v.index_select(0, j) + dvs.unsqueeze(1) * unit.unsqueeze(-1)  # [E,3,F]
        n = s.shape[0]
        return s + scatter_sum(ds, i, n), v + scatter_sum(dv, i, n)


class PaiNNUpdate(nn.Module):
    """Atomwise mixing of scalar and vector channels."""

    def __init__(self, features: int):
        super().__init__()
        self.F = features
        self.UV = nn.Linear(features, 2 * features, bias=False)
        self.mix = MLP([2 * features, features, 3 * features])

    def forward(self, s, v):
        Uv, Vv = torch.split(self.UV(v), self.F, dim=-1)  # [N,3,F] each
        norm = torch.sqrt((Vv * Vv).sum(1) + 1e-8)
        a_vv, a_sv, a_ss = torch.split(self.mix(torch.cat([s, norm], dim=-1)), self.F, dim=-1)
        v = v + a_vv.unsqueeze(1) * Uv
        s = s + a_sv * (Uv * Vv).sum(1) + a_ss
        return s, v


class PaiNN(nn.Module):
    """PaiNN representation: (numbers, edges, edge vectors, optional atom conditioning) → scalar features [N, F]."""

    def __init__(
        self,
        features: int = 128,
        interactions: int = 3,
        cutoff: float = 5.0,
        n_rbf: int = 20,
        max_z: int = 119,
        shared_filters: bool = False,
    ):
        super().__init__()
        self.features, self.cutoff = features, cutoff
        self.embedding = nn.Embedding(max_z, features)
        self.rbf = BesselBasis(cutoff, n_rbf)
        self.fcut = CosineCutoff(cutoff)
        self.messages = nn.ModuleList(PaiNNMessage(features, n_rbf) for _ in range(interactions))
        self.updates = nn.ModuleList(PaiNNUpdate(features) for _ in range(interactions))
        if shared_filters:
            for m in self.messages[1:]:
                m.filter = self.messages[0].filter

    def forward(
        self,
        numbers: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vec: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """numbers [N], edge_index [2,E], edge_vec [E,3] Å (r_j − r_i), condition [N,F] added to the embedding."""
        s = self.embedding(numbers)
        if condition is not None:
            s = s + condition
        v = s.new_zeros(s.shape[0], 3, self.features)
        r = torch.linalg.norm(edge_vec, dim=-1)
        unit = edge_vec / r.unsqueeze(-1)
        rbf, fcut = self.rbf(r), self.fcut(r)
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, edge_index, rbf, fcut, unit)
            s, v = update(s, v)
        return s
