"""PaiNN (Schütt, Unke, Gastegger, ICML 2021): equivariant message passing with scalar and vector features.

Performance notes (bench/RESULTS.md has the measurements): the radial filters are matrix products with
the bias and the cutoff envelope folded into them; gathers use index_select (its backward is index_add,
much cheaper on CPU than the index_put of `x[j]`); all edge-sized tensors are contiguous (index_add from
strided views is ~10× slower); the first interaction skips the vector term of v_j, which is zero there.
Outputs match the original implementation to float32 rounding (tests/test_model_regression.py).

Compilation (model.compile, MULTIFI_COMPILE=1) is done for every backbone by Potential.
"""

from __future__ import annotations

import torch
from torch import nn

from multifi.config import ModelConfig
from multifi.data.stats import N_ELEMENTS
from multifi.nn import MLP, BesselBasis, CosineCutoff, fused, linear
from multifi.nn.fused import EdgePlan, gather_mul_scatter
from multifi.nn.sparse import DirectionSum

DEFAULT = ModelConfig()  # the constructor's defaults are the config's field defaults (one place)


class PaiNNMessage(nn.Module):
    """Scalar and vector messages from neighbours j to centres i, filtered by the radial basis."""

    def __init__(self, features: int, n_rbf: int):
        super().__init__()
        self.F = features
        self.phi = MLP([features, features, 3 * features])
        self.filter = nn.Linear(n_rbf, 3 * features)  # evaluated for all interactions at once by PaiNN

    def forward(
        self,
        s,
        v,
        edge_index,
        filt,
        unit,
        direction: DirectionSum | None = None,
        plan: EdgePlan | None = None,
    ):
        """s [N,F], v [N,3,F] or None (all zeros), filt: three [E,F] = filter(rbf)·envelope (scalar, v_j and
        direction parts), unit [E,3], direction: the sparse Σ_j x_ij ⊗ û_ij when û is constant, plan: the
        edges for the fused gather-multiply-scatter kernels (nn/fused.py) → (s, v).

        Every edge-sized tensor is contiguous: the three parts of phi are gathered and filtered
        separately instead of splitting one [E,3F] product (index_add from a strided view of it was
        ~10× slower, and the split's backward copies all of it once more); the v_j product and the
        direction term are one product and one in-place addcmul instead of two products and a sum;
        φ_v(s_j) ⊙ v_j is formed per atom and gathered once (`_vj`).
        """
        i, j = edge_index
        parts = torch.split(self.phi(s), self.F, dim=-1)  # [N,F] each: scalar, v_j, direction
        if plan is not None:  # the fused kernels built: no edge-sized message tensor
            if v is None:
                v = s.new_zeros((s.shape[0], 3, self.F))
            else:
                v = gather_mul_scatter(v, parts[1].unsqueeze(1) * v, filt[1], plan)
            v = gather_mul_scatter(v, parts[2], filt[2], plan, unit)
            s = gather_mul_scatter(s.unsqueeze(1), parts[0].unsqueeze(1), filt[0], plan).squeeze(1)
            return s, v
        ds, dvs = (parts[k].contiguous().index_select(0, j) * filt[k] for k in (0, 2))  # [E,F]
        if direction is not None:  # û constant: the direction term without an [E,3,F] tensor
            dir_sum = direction(dvs)  # [N,3,F]
            if v is not None:
                dir_sum = v.index_add(0, i, self._vj(parts[1], v, j, filt[1])) + dir_sum
            v = dir_sum
        elif v is None:  # v is identically zero before the first interaction: no v_j term
            dv = dvs.unsqueeze(1) * unit.unsqueeze(-1)  # [E,3,F]
            v = dv.new_zeros((s.shape[0],) + dv.shape[1:]).index_add_(0, i, dv)
        else:
            dv = self._vj(parts[1], v, j, filt[1]).addcmul_(dvs.unsqueeze(1), unit.unsqueeze(-1))
            v = v.index_add(0, i, dv)
        s = s.index_add(0, i, ds)
        return s, v

    @staticmethod
    def _vj(phi_v, v, j, filt):
        """[E,3,F] v_j term φ_v(s_j) ⊙ v_j ⊙ W_ij: the product of the two atom factors is formed per atom
        ([N,3,F]) and gathered once, instead of gathering [E,F] and [E,3,F] and multiplying them per edge."""
        return (phi_v.unsqueeze(1) * v).index_select(0, j) * filt.unsqueeze(1)


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
    """PaiNN representation: (numbers, edges, edge vectors, optional atom conditioning) → scalar features [N, F].

    sparse_direction: when the edge directions need no gradient (energy-only training, inference without
    forces) and edges are sorted by centre, Σ_j x_ij ⊗ û_ij is a sparse product (nn/sparse.py).
    fused_messages: the three messages are fused gather-multiply-scatter kernels (nn/fused.py, differentiable
    to any order: energy and force training, inference) where they could be built; no edge-sized tensor is
    formed but the filters.
    Defaults: those of ModelConfig.
    """

    sparse_direction = True
    fused_messages = True

    def __init__(
        self,
        features: int = DEFAULT.features,
        interactions: int = DEFAULT.interactions,
        cutoff: float = DEFAULT.cutoff,
        n_rbf: int = DEFAULT.n_rbf,
        max_z: int = N_ELEMENTS,
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

    @classmethod
    def from_config(cls, m: ModelConfig) -> PaiNN:
        return cls(features=m.features, interactions=m.interactions, cutoff=m.cutoff, n_rbf=m.n_rbf)

    def filters(self, r: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Radial filters of every interaction: three contiguous [E, F] parts each (scalar, v_j, direction).

        (W·rbf + b)·fcut = [rbf·fcut, fcut] @ [W | b]ᵀ: the envelope multiplies the filter after its
        bias (messages vanish smoothly at the cutoff) without a separate [E, 3F] product. One product
        per part rather than one for all and a split: the products stay contiguous and the split's
        backward would copy all filter gradients into one edge-sized tensor first. The first
        interaction has no v_j term, so its v_j part is not computed.
        """
        fcut = self.fcut(r).unsqueeze(-1)
        basis = torch.cat([self.rbf(r) * fcut, fcut], dim=-1)  # [E, n_rbf + 1]
        out = []
        for k, m in enumerate(self.messages):
            weight = torch.cat([m.filter.weight, m.filter.bias.unsqueeze(-1)], dim=-1)  # [3F, n_rbf + 1]
            w = torch.split(weight, self.features, dim=0)
            out.append(tuple(None if (k == 0 and p == 1) else linear(basis, w[p]) for p in range(3)))
        return out

    def geometry(self, edge_index: torch.Tensor, edge_vec: torch.Tensor) -> None:
        """PaiNN needs no precomputed geometry beyond the edges."""
        return None

    def forward(
        self,
        numbers: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vec: torch.Tensor,
        condition: torch.Tensor | None = None,
        geometry: None = None,
    ) -> torch.Tensor:
        """numbers [N], edge_index [2,E], edge_vec [E,3] Å (r_j − r_i), condition [N,F] added to the embedding."""
        s = self.embedding(numbers)
        if condition is not None:
            s = s + condition
        return self._interactions(s, edge_index, edge_vec)

    def _interactions(self, s: torch.Tensor, edge_index: torch.Tensor, edge_vec: torch.Tensor) -> torch.Tensor:
        r = torch.linalg.norm(edge_vec, dim=-1)
        unit = edge_vec / r.unsqueeze(-1)
        v = None
        constant_unit = DirectionSum.applicable(edge_index[0], unit)  # CPU, edges, no gradient for û wanted
        plan = (
            EdgePlan(edge_index[0], edge_index[1], s.shape[0])
            if self.fused_messages and edge_index.shape[1] > 0 and fused.applicable(s, edge_vec)
            else None
        )
        direction = (
            DirectionSum(edge_index[0], unit, s.shape[0])
            if (plan is None and constant_unit and self.sparse_direction)
            else None
        )
        for message, update, filt in zip(self.messages, self.updates, self.filters(r)):
            s, v = message(s, v, edge_index, filt, unit, direction, plan)
            s, v = update(s, v)
        return s
