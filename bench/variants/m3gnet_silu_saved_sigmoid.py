"""Variant (not kept): models/m3gnet.py at 64bad94 with a SiLU that saves σ(x) in its forward, so that both backward
passes run the arithmetic-only kernels; measured in bench/RESULTS.md with `bench/ab_m3gnet.py --base 64bad94 --tree
bench/variants/m3gnet_silu_saved_sigmoid.py --steps 100` (0.994).

M3GNet (Chen & Ong, Nat. Comput. Sci. 2022): graph convolution with explicit three-body terms.

Per block: (1) three-body update of each bond i→j from every other bond i→k within the three-body
cutoff, using a spherical Bessel × Legendre basis of (r_ik, θ_jik) gated by the atom k; (2) gated
MLP update of the bond features; (3) gated MLP update of the atom features from their bonds. All
messages carry a factor that vanishes smoothly at the cutoffs (smooth Bessel radial basis for the
two-body terms, polynomial envelope on both bonds of a triplet), so energy and forces are
continuous when atoms enter or leave a cutoff sphere.

Written for multifi from the paper; matgl's implementation was read for reference. Deliberate
differences from matgl's default model: the two-body basis is the smooth Bessel basis of Kocer et
al. (J. Chem. Phys. 2019; matgl's `use_smooth=True`) with `n_rbf` functions (vanishing value,
slope and curvature at the cutoff, so forces are continuous there), and the three-body radial
basis is scaled to the three-body cutoff (the range it is used in) rather than the two-body one.
Readout and fidelity conditioning live in Potential/EnergyHead, as for every backbone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from multifi.config import ModelConfig
from multifi.data.stats import N_ELEMENTS
from multifi.errors import MultifiError
from multifi.nn import PolynomialCutoff, fused, scatter_sum
from multifi.nn.radial import second_order

Tensor = torch.Tensor


class _SiLU2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return torch.ops.multifi_fused.silu_grad(x, s, g)
        return fused._SiLUGrad.apply(x, s, g)


def _silu2(x):
    if getattr(fused._twice, "on", False) and x.requires_grad and torch.is_grad_enabled() and fused.applicable(x):
        return _SiLU2.apply(x)
    return F.silu(x)


DEFAULT = ModelConfig()  # the constructor's defaults are the config's field defaults (one place)


# ---------------------------------------------------------------------------------------------- special functions
def spherical_jn(x: Tensor, l: int) -> Tensor:
    """Spherical Bessel function j_l(x) of x > 0 (any shape), evaluated in float64.

    Upward recurrence where it is stable (x ≥ l + 1); the power series below that, where the
    recurrence would cancel catastrophically. Both branches are smooth, so gradients are exact.
    """
    x = x.double()
    xr = x.clamp(min=1.0)  # recurrence branch; its values below 1 are discarded
    s, c = torch.sin(xr), torch.cos(xr)
    prev, cur = s / xr, s / xr**2 - c / xr  # j_0, j_1
    if l == 0:
        cur = prev
    for m in range(1, l):
        prev, cur = cur, (2 * m + 1) / xr * cur - prev
    # j_l(x) = x^l / (2l+1)!! · Σ_k (−x²/2)^k / (k! (2l+3)(2l+5)…(2l+2k+1))
    x2 = -0.5 * x * x
    term = torch.ones_like(x)
    series = term
    for k in range(1, 21):
        term = term * x2 / (k * (2 * l + 2 * k + 1))
        series = series + term
    series = series * x**l / _double_factorial(2 * l + 1)
    return torch.where(x < l + 1, series, cur)


def _double_factorial(n: int) -> float:
    return float(math.prod(range(n, 0, -2)))


def spherical_jn_roots(max_l: int, max_n: int) -> Tensor:
    """[max_l, max_n] float64: the first max_n positive zeros of j_l for l < max_l.

    Zeros of j_l interlace those of j_{l−1}: each bracket between consecutive zeros of j_{l−1} holds
    one zero of j_l, found by bisection (all brackets at once).
    """
    roots = [torch.arange(1, max_n + max_l, dtype=torch.float64) * math.pi]  # zeros of j_0 = sin x / x
    for l in range(1, max_l):
        lo, hi = roots[-1][:-1].clone(), roots[-1][1:].clone()
        f_lo = spherical_jn(lo, l)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            f_mid = spherical_jn(mid, l)
            left = torch.sign(f_mid) == torch.sign(f_lo)
            lo, f_lo = torch.where(left, mid, lo), torch.where(left, f_mid, f_lo)
            hi = torch.where(left, hi, mid)
        roots.append(0.5 * (lo + hi))
    return torch.stack([r[:max_n] for r in roots])


def legendre(c: Tensor, max_l: int) -> Tensor:
    """Legendre polynomials P_0 … P_{max_l−1} of c → [..., max_l] (Bonnet's recurrence)."""
    p = [torch.ones_like(c), c]
    for l in range(1, max_l - 1):
        p.append(((2 * l + 1) * c * p[l] - l * p[l - 1]) / (l + 1))
    return torch.stack(p[:max_l], dim=-1)


# ---------------------------------------------------------------------------------------------- bases
class SmoothBesselBasis(nn.Module):
    """Smooth orthonormal Bessel basis (Kocer, Mason, Erturk, J. Chem. Phys. 2019); [E] → [E, n].

    f_n(r) ∝ (−1)^n [sinc((n+1)πr/r_c) + sinc((n+2)πr/r_c)] vanish at r_c with their first and second
    derivatives; g_n are their Gram–Schmidt-like combinations (lower triangular), so g = S Cᵀ with
    S_k = sinc(k r / r_c) (k = 1 … n+1) and one fixed matrix C [n, n+1].
    """

    def __init__(self, cutoff: float, n: int):
        super().__init__()
        self.cutoff, self.n = float(cutoff), n
        A = torch.zeros(n, n + 1, dtype=torch.float64)  # f = S Aᵀ
        for i in range(n):
            a = (-1) ** i * math.sqrt(2.0) * math.pi / cutoff**1.5 * (i + 1) * (i + 2) / math.hypot(i + 1, i + 2)
            A[i, i] = A[i, i + 1] = a
        e = [i**2 * (i + 2) ** 2 / (4 * (i + 1) ** 4 + 1) for i in range(n)]
        d = [1.0]
        for i in range(1, n):
            d.append(1 - e[i] / d[-1])
        G = [A[0]]
        for i in range(1, n):
            G.append((A[i] + math.sqrt(e[i] / d[i - 1]) * G[-1]) / math.sqrt(d[i]))
        self.register_buffer("coef", torch.stack(G), persistent=False)  # [n, n+1]
        self.register_buffer("k", torch.arange(1, n + 2, dtype=torch.float64) / cutoff, persistent=False)

    def forward(self, r: Tensor) -> Tensor:
        s = torch.sinc(r.unsqueeze(-1) * self.k.to(r.dtype))  # sin(kπr/r_c) / (kπr/r_c), [E, n+1]
        return (s @ self.coef.to(r.dtype).T) * (r < self.cutoff).to(r.dtype).unsqueeze(-1)


class SphericalBesselRadial(nn.Module):
    """Three-body radial functions √(2/r_c³) j_l(z_ln r / r_c) / |j_{l+1}(z_ln)| for l < max_l, n < max_n
    (orthonormal on [0, r_c] with weight r²); [E] → [E, max_l, max_n]."""

    def __init__(self, cutoff: float, max_n: int, max_l: int):
        super().__init__()
        self.cutoff, self.max_n, self.max_l = float(cutoff), max_n, max_l
        roots = spherical_jn_roots(max_l, max_n)  # [L, Nn]
        norm = torch.stack([spherical_jn(roots[l], l + 1) for l in range(max_l)]).abs()
        self.register_buffer("roots", roots, persistent=False)
        self.register_buffer("norm", math.sqrt(2.0 / cutoff**3) / norm, persistent=False)

    def forward(self, r: Tensor) -> Tensor:
        """Values with exact first and second derivatives in r (what forces and their training need): the
        functions and their two derivatives are evaluated in closed form without autograd, then joined as
        f + δ f′ + δ²/2 f″ with δ = r − r.detach() (zero in value), so no backward pass runs through the
        Bessel recurrences and series (~9 % of an M3GNet force+stress training step when it did)."""
        return second_order(r, *self.values_and_derivatives(r.detach()))  # [E, L, Nn]

    def values_and_derivatives(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The functions and their first and second derivatives in r (Å⁻¹, Å⁻²), float64 [E, L, Nn] each:
        j_l′ = j_{l−1} − (l+1)/x j_l (j_0′ = −j_1), and j_l″ from Bessel's equation,
        j_l″ = −(2/x) j_l′ − (1 − l(l+1)/x²) j_l, at x = z_ln r / r_c."""
        with torch.no_grad():
            roots, norm = self.roots.double(), self.norm.double()
            k = roots / self.cutoff  # [L, Nn] Å⁻¹: dx/dr
            out = []
            for l in range(self.max_l):
                x = r.double().unsqueeze(-1) * k[l]  # [E, Nn]
                j = spherical_jn(x, l)
                dj = -spherical_jn(x, 1) if l == 0 else spherical_jn(x, l - 1) - (l + 1) / x * j
                ddj = -2 / x * dj - (1 - l * (l + 1) / x**2) * j
                out.append((j * norm[l], dj * k[l] * norm[l], ddj * k[l] ** 2 * norm[l]))
            return tuple(torch.stack(part, dim=1) for part in zip(*out))


# ---------------------------------------------------------------------------------------------- layers
class GatedMLP(nn.Module):
    """MLP(x) ⊙ sigmoid-gated MLP(x) (M3GNet's φ): both branches Linear+SiLU per hidden layer; the value
    branch ends with SiLU when `activate_last`, the gate branch with a sigmoid."""

    def __init__(self, sizes: list[int], bias: bool = True, activate_last: bool = True):
        super().__init__()
        pairs = list(zip(sizes[:-1], sizes[1:]))
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in pairs)
        self.gates = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in pairs)
        self.activate_last = activate_last

    def forward(self, x: Tensor, filter: Tensor | None = None) -> Tensor:
        """φ(x), times `filter` (same shape as the output) when given."""
        return self.rest(self.layers[0](x), self.gates[0](x), filter)

    def rest(self, a: Tensor, g: Tensor, filter: Tensor | None = None) -> Tensor:
        """Everything after the first linear layers, given their outputs a (values) and g (gates)."""
        for value, gate in zip(self.layers[1:], self.gates[1:]):
            a, g = value(_silu2(a)), gate(_silu2(g))
        if self.activate_last:
            return fused.gate(a, g, filter)  # silu(a) ⊙ σ(g) ⊙ filter
        return a * torch.sigmoid(g) if filter is None else a * torch.sigmoid(g) * filter

    def on_edges(self, s: Tensor, e: Tensor, i: Tensor, j: Tensor, filter: Tensor | None = None) -> Tensor:
        """forward(s_i ⊕ s_j ⊕ e_ij, filter) for every edge without building the [E, 2F+F_e] concatenation:
        the atom parts of the first layer are computed once per atom and gathered."""
        W = torch.cat([self.layers[0].weight, self.gates[0].weight])  # [2H, 2F + F_e]
        b = None if self.layers[0].bias is None else torch.cat([self.layers[0].bias, self.gates[0].bias])
        Fs, H = s.shape[-1], self.layers[0].out_features
        hi, hj = F.linear(s, torch.cat([W[:, :Fs], W[:, Fs : 2 * Fs]])).split(2 * H, dim=-1)  # [N, 2H] each
        h = hi.index_select(0, i) + hj.index_select(0, j) + F.linear(e, W[:, 2 * Fs :], b)
        a, g = h.split(H, dim=-1)
        return self.rest(a, g, filter)


class ThreeBodyInteraction(nn.Module):
    """e_ij += φ₃( f_c(r_ij) Σ_{k≠j} B(r_ik, θ_jik) ⊙ σ(W s_k + b) f_c(r_ik) ),
    B the spherical Bessel × Legendre basis, φ₃ a bias-free gated layer."""

    def __init__(self, features: int, degree: int):
        super().__init__()
        self.atom_gate = nn.Linear(features, degree)
        self.update = GatedMLP([degree, features], bias=False)

    def forward(self, s: Tensor, e: Tensor, t: Triplets) -> Tensor:
        gate = torch.sigmoid(self.atom_gate(s))  # [N, degree]
        if t.plan is not None and fused.applicable(gate, t.basis):  # Σ_k basis ⊙ gate[k] in one pass per bond
            zero = gate.new_zeros(t.n_bonds, 1, gate.shape[-1])
            summed = fused.gather_mul_scatter(zero, gate.unsqueeze(1), t.basis, t.plan).squeeze(1)
        else:
            summed = scatter_sum(t.basis * gate.index_select(0, t.k), t.ij, t.n_bonds)  # [E3, degree]
        return e.index_add(0, t.bonds, self.update(summed * t.fc_bond.unsqueeze(-1)))


class GraphConv(nn.Module):
    """Bond then atom update (paper eqs. 4, 5), ẽ the two-body radial basis:
    e_ij ← e_ij + φ_e(s_i ⊕ s_j ⊕ e_ij) ⊙ W_e ẽ_ij
    s_i  ← s_i + Σ_j φ_s(s_i ⊕ s_j ⊕ e_ij) ⊙ W_s ẽ_ij   (with the updated e_ij)"""

    def __init__(self, features: int, n_rbf: int, hidden: int):
        super().__init__()
        self.phi_e = GatedMLP([3 * features, hidden, hidden, features])
        self.phi_s = GatedMLP([3 * features, hidden, hidden, features])
        self.w_e = nn.Linear(n_rbf, features, bias=False)
        self.w_s = nn.Linear(n_rbf, features, bias=False)

    def forward(self, s: Tensor, e: Tensor, i: Tensor, j: Tensor, rbf: Tensor) -> tuple[Tensor, Tensor]:
        e = e + self.phi_e.on_edges(s, e, i, j, filter=self.w_e(rbf))
        m = self.phi_s.on_edges(s, e, i, j, filter=self.w_s(rbf))
        return s + scatter_sum(m, i, s.shape[0]), e


# ---------------------------------------------------------------------------------------------- triplets
def edge_pairs(centre: Tensor, n_atoms: int) -> tuple[Tensor, Tensor]:
    """All ordered pairs (a, b), a ≠ b, of edges sharing their centre atom, as indices into `centre`.

    Tensor ops only: sort edges by centre; an edge with d edges at its centre pairs with the d
    consecutive sorted positions of that centre (one of them itself, removed).
    """
    order = torch.argsort(centre, stable=True)
    c = centre[order]
    count = torch.bincount(c, minlength=n_atoms)  # edges per atom
    first = torch.cumsum(count, 0) - count  # first sorted position of each atom's edges
    deg = count[c]  # [E3] partners of each sorted edge, itself included
    a = torch.repeat_interleave(torch.arange(len(c), device=c.device), deg)  # [Σ d²]
    offset = torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg)
    b = first[c][a] + torch.arange(len(a), device=c.device) - offset
    keep = a != b
    return order[a[keep]], order[b[keep]]


def triplet_index(edge_index: Tensor, r: Tensor, n_atoms: int, cutoff: float) -> tuple[Tensor, Tensor, Tensor]:
    """Geometry-only bookkeeping of the three-body terms (no gradient flows through it):
    bonds [E3] ids of the edges shorter than `cutoff` (Å); ij, ik [T] for each triplet the receiving
    bond i→j and the other bond i→k, as indices into bonds."""
    with torch.no_grad():
        bonds = torch.nonzero(r < cutoff).squeeze(-1)
        ij, ik = edge_pairs(edge_index[0, bonds], n_atoms)
    return bonds, ij, ik


class Triplets:
    """Three-body features for one forward pass, shared by all blocks.

    bonds [E3], ij, ik [T]  from triplet_index
    k [T]        atom k of each triplet
    basis [T, L·Nn]  radial(r_ik) · Y_l0(θ_jik) · f_c(r_ik)
    fc_bond [E3] envelope f_c(r_ij) of each bond, applied after summing over k
    plan         the triplets as edges k → ij (nn.fused.EdgePlan) where the fused kernels apply, else None
    """

    def __init__(
        self,
        index: tuple[Tensor, Tensor, Tensor],
        edge_index: Tensor,
        edge_vec: Tensor,
        r: Tensor,
        radial: SphericalBesselRadial,
        envelope: nn.Module,
        n_atoms: int,
    ):
        self.bonds, self.ij, self.ik = index
        self.n_bonds = self.bonds.shape[0]
        self.k = edge_index[1, self.bonds][self.ik]
        r3 = r[self.bonds]
        unit = edge_vec[self.bonds] / r3.unsqueeze(-1)
        cos = (unit[self.ij] * unit[self.ik]).sum(-1)  # [T]
        L = radial.max_l
        ylm = legendre(cos, L) * torch.sqrt((2 * torch.arange(L, dtype=r.dtype, device=r.device) + 1) / (4 * math.pi))
        self.fc_bond = envelope(r3)  # [E3]
        rad = radial(r3) * self.fc_bond.view(-1, 1, 1)  # [E3, L, Nn]
        self.basis = (rad[self.ik] * ylm.unsqueeze(-1)).flatten(1)  # [T, L·Nn]
        # the triplets as edges from atom k into bond ij, for the fused sum over k (built once, used by each block)
        usable = self.ij.numel() > 0 and fused.applicable(self.basis)
        self.plan = fused.EdgePlan(self.ij, self.k, self.n_bonds, n_atoms) if usable else None


# ---------------------------------------------------------------------------------------------- model
class M3GNet(nn.Module):
    """M3GNet representation: (numbers, edges, edge vectors, optional atom conditioning) → atom features [N, F].

    features F (atom and bond features, and hidden width of the gated MLPs), interactions (blocks),
    cutoff (Å, two-body), threebody_cutoff (Å, ≤ cutoff), max_n × max_l three-body basis functions,
    n_rbf smooth Bessel functions of the two-body distance. Defaults: those of ModelConfig.
    """

    def __init__(
        self,
        features: int = DEFAULT.features,
        interactions: int = DEFAULT.interactions,
        cutoff: float = DEFAULT.cutoff,
        threebody_cutoff: float = DEFAULT.threebody_cutoff,
        max_n: int = DEFAULT.max_n,
        max_l: int = DEFAULT.max_l,
        n_rbf: int = DEFAULT.n_rbf,
        max_z: int = N_ELEMENTS,
    ):
        super().__init__()
        if not 0 < threebody_cutoff <= cutoff:
            raise MultifiError(
                f"m3gnet: threebody_cutoff ({threebody_cutoff} Å) must be positive and at most the cutoff ({cutoff} Å)"
            )
        self.features, self.cutoff, self.threebody_cutoff = features, float(cutoff), float(threebody_cutoff)
        degree = max_n * max_l
        self.embedding = nn.Embedding(max_z, features)
        self.rbf = SmoothBesselBasis(cutoff, n_rbf)
        self.edge_embedding = nn.Linear(n_rbf, features)
        self.radial3 = SphericalBesselRadial(threebody_cutoff, max_n, max_l)
        self.envelope3 = PolynomialCutoff(threebody_cutoff)
        self.three_body = nn.ModuleList(ThreeBodyInteraction(features, degree) for _ in range(interactions))
        self.convs = nn.ModuleList(GraphConv(features, n_rbf, features) for _ in range(interactions))

    @classmethod
    def from_config(cls, m: ModelConfig) -> M3GNet:
        return cls(
            features=m.features,
            interactions=m.interactions,
            cutoff=m.cutoff,
            threebody_cutoff=m.threebody_cutoff,
            max_n=m.max_n,
            max_l=m.max_l,
            n_rbf=m.n_rbf,
        )

    def geometry(self, edge_index: Tensor, edge_vec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The triplet index lists of these edges (integer tensors; see triplet_index)."""
        n_atoms = int(edge_index.max()) + 1 if edge_index.numel() else 0
        return triplet_index(edge_index, torch.linalg.norm(edge_vec, dim=-1), n_atoms, self.threebody_cutoff)

    def forward(
        self,
        numbers: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        condition: Tensor | None = None,
        geometry: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """numbers [N], edge_index [2,E] (centre i, neighbour j), edge_vec [E,3] Å (r_j − r_i),
        condition [N,F] added to the initial atom features, geometry from self.geometry (made here when
        None) → atom features [N,F]."""
        s = self.embedding(numbers)
        if condition is not None:
            s = s + condition
        r = torch.linalg.norm(edge_vec, dim=-1)
        rbf = self.rbf(r)  # [E, n_rbf], vanishes smoothly at the cutoff
        e = _silu2(self.edge_embedding(rbf))
        if geometry is None:
            geometry = triplet_index(edge_index, r, s.shape[0], self.threebody_cutoff)
        t = Triplets(geometry, edge_index, edge_vec, r, self.radial3, self.envelope3, s.shape[0])
        i, j = edge_index[0], edge_index[1]
        for three_body, conv in zip(self.three_body, self.convs):
            e = three_body(s, e, t)
            s, e = conv(s, e, i, j, rbf)
        return s
