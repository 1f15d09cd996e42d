"""M3GNet (Chen & Ong, Nat. Comput. Sci. 2022): graph convolution with explicit three-body terms.

Per block: (1) three-body update of each bond i→j from every other bond i→k within the three-body
cutoff, using a spherical Bessel × Legendre basis of (r_ik, θ_jik) gated by the atom k; (2) gated
MLP update of the bond features; (3) gated MLP update of the atom features from their bonds. All
messages carry a factor that vanishes smoothly at the cutoffs (smooth Bessel radial basis for the
two-body terms, polynomial envelope on both bonds of a triplet), so energy and forces are
continuous when atoms enter or leave a cutoff sphere. The sums over triplets are computed bond by bond
(ThreeBodyBasis: Legendre polynomials of cos θ_jik split into monomials of the two bond directions), never
enumerating the triplets: the same values, at a cost in bonds rather than triplets.

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
from multifi.nn.gather import EdgePairs, pair_sum
from multifi.nn.radial import second_order

Tensor = torch.Tensor
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

    def padded(self, x: Tensor, width: int = 16) -> Tensor:
        """forward(x) for float32 x [M, d] on the CPU with d < `width`: x's features and the first layers' weights
        zero-padded to `width` columns. The same values (the added terms are 0 · 0; float32 rounding may differ in the
        last bit), but the products whose output has x's width (input gradient [M, d], weight gradient [H, d]) get
        `width` columns: MKL's float32 products with fewer (M3GNet's 9 three-body features) ran 3-4× slower than
        with 16, and ones wider than 16 are not helped by padding (bench/thin_products.py). forward(x) otherwise."""
        pad = width - x.shape[-1]
        if pad <= 0 or x.dtype != torch.float32 or x.device.type != "cpu":
            return self(x)
        x = F.pad(x, (0, pad))
        value, gate = self.layers[0], self.gates[0]
        a = F.linear(x, F.pad(value.weight, (0, pad)), value.bias)
        g = F.linear(x, F.pad(gate.weight, (0, pad)), gate.bias)
        return self.rest(a, g)

    def rest(self, a: Tensor, g: Tensor, filter: Tensor | None = None) -> Tensor:
        """Everything after the first linear layers, given their outputs a (values) and g (gates)."""
        for value, gate in zip(self.layers[1:], self.gates[1:]):
            a, g = value(fused.silu(a)), gate(fused.silu(g))
        if self.activate_last:
            return fused.gate(a, g, filter)  # silu(a) ⊙ σ(g) ⊙ filter
        return a * torch.sigmoid(g) if filter is None else a * torch.sigmoid(g) * filter

    def on_edges(self, s: Tensor, e: Tensor, pairs: EdgePairs, filter: Tensor | None = None) -> Tensor:
        """forward(s_i ⊕ s_j ⊕ e_ij, filter) for every edge (centre i, neighbour j: `pairs`) without building the
        [E, 2F+F_e] concatenation: the atom parts of the first layer (and its bias) are computed once per atom,
        their sum per edge is gathered in one pass (nn/gather.py) and the edge part's product adds to it (addmm),
        so the first layer writes each edge-sized tensor once. Values and gates stay two contiguous [E, H]
        tensors (splitting one [E, 2H] product made strided views, copied by every later operation, and a
        concatenation of their gradients)."""
        Fs = s.shape[-1]
        value, gate = self.layers[0], self.gates[0]
        Wa, Wg = value.weight, gate.weight  # [H, 2F + F_e] each
        atom = F.linear(s, torch.cat([Wa[:, :Fs], Wa[:, Fs : 2 * Fs], Wg[:, :Fs], Wg[:, Fs : 2 * Fs]]))  # [N, 4H]
        ai, aj, gi, gj = atom.split(value.out_features, dim=-1)
        if value.bias is not None:
            ai, gi = ai + value.bias, gi + gate.bias
        a = torch.addmm(pair_sum(ai, aj, pairs), e, Wa[:, 2 * Fs :].t())
        g = torch.addmm(pair_sum(gi, gj, pairs), e, Wg[:, 2 * Fs :].t())
        return self.rest(a, g, filter)


class ThreeBodyInteraction(nn.Module):
    """e_ij += φ₃( f_c(r_ij) Σ_{k≠j} B(r_ik, θ_jik) ⊙ σ(W s_k + b) f_c(r_ik) ),
    B the spherical Bessel × Legendre basis, φ₃ a bias-free gated layer."""

    def __init__(self, features: int, degree: int):
        super().__init__()
        self.atom_gate = nn.Linear(features, degree)
        self.update = GatedMLP([degree, features], bias=False)

    def forward(self, s: Tensor, e: Tensor, t: ThreeBodyBasis) -> Tensor:
        summed = t.sum_over_k(torch.sigmoid(self.atom_gate(s)))  # [E3, degree]
        return e.index_add(0, t.bonds, self.update.padded(summed * t.fc_bond.unsqueeze(-1)))


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

    def forward(self, s: Tensor, e: Tensor, pairs: EdgePairs, rbf: Tensor) -> tuple[Tensor, Tensor]:
        """s [N, F], e [E, F], pairs: the edges (centre i, neighbour j), rbf [E, n_rbf] → (s, e)."""
        e = e + self.phi_e.on_edges(s, e, pairs, filter=self.w_e(rbf))
        m = self.phi_s.on_edges(s, e, pairs, filter=self.w_s(rbf))
        return s + scatter_sum(m, pairs.center, s.shape[0]), e


# ---------------------------------------------------------------------------------------------- three-body terms
def threebody_bonds(r: Tensor, cutoff: float) -> Tensor:
    """[E3] ids of the edges shorter than `cutoff` (Å): the bonds that take part in three-body terms
    (geometry-only bookkeeping, no gradient)."""
    with torch.no_grad():
        return torch.nonzero(r < cutoff).squeeze(-1)


class AngularMonomials(nn.Module):
    """Y_l(û·v̂) = √((2l+1)/4π) P_l(û·v̂) for l < max_l as a sum of products of monomials of û and v̂ (see
    ThreeBodyBasis): the pairs (l, α) with a non-zero coefficient, ordered by l. [E, 3] unit vectors →
    (monomials û^α [E, P], weighted c_l|α| (|α|!/α!) û^α [E, P]); `l` [P] the degree of each pair, `self_term` [L]
    Y_l(1) = √((2l+1)/4π)."""

    def __init__(self, max_l: int):
        super().__init__()
        from numpy.polynomial import legendre as npleg

        alpha, ls, coef = [], [], []
        for l in range(max_l):
            poly = npleg.leg2poly([0] * l + [1])  # P_l in powers of x
            for p in range(l % 2, l + 1, 2):
                for a in range(p, -1, -1):
                    for b in range(p - a, -1, -1):
                        c = p - a - b
                        multinomial = math.factorial(p) / (math.factorial(a) * math.factorial(b) * math.factorial(c))
                        alpha.append((a, b, c))
                        ls.append(l)
                        coef.append(math.sqrt((2 * l + 1) / (4 * math.pi)) * poly[p] * multinomial)
        self.max_l = max_l
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.long), persistent=False)  # [P, 3]
        self.register_buffer("l", torch.tensor(ls, dtype=torch.long), persistent=False)  # [P]
        # float64 constants, not buffers: module.to(float32) would round them for a later float64 copy
        self.coef = torch.tensor(coef, dtype=torch.float64)  # [P]
        self.self_term = torch.tensor(
            [math.sqrt((2 * l + 1) / (4 * math.pi)) for l in range(max_l)], dtype=torch.float64
        )

    def forward(self, unit: Tensor) -> tuple[Tensor, Tensor]:
        powers = torch.stack([torch.ones_like(unit)] + [unit**p for p in range(1, self.max_l)], dim=-1)  # [E, 3, L]
        a = self.alpha
        monomial = powers[:, 0, a[:, 0]] * powers[:, 1, a[:, 1]] * powers[:, 2, a[:, 2]]  # [E, P]
        return monomial, monomial * self.coef.to(unit)


class ThreeBodyBasis:
    """Three-body features of one forward pass, shared by all blocks: the sums over triplets
    Σ_{k≠j} R_ln(r_ik) Y_l(cos θ_jik) f_c(r_ik) x_k per bond i→j, without enumerating the triplets.

    Y_l(cos θ) = √((2l+1)/4π) P_l(û_ij·û_ik) is a polynomial Σ_p c_lp (û_ij·û_ik)^p (p ≤ l, p ≡ l mod 2), and
    (û·v̂)^p = Σ_{|α|=p} (p!/α!) û^α v̂^α, so every sum over the bonds i→k of atom i factorises:
    Σ_k Y_l(û_ij·û_ik) X_ik = Σ_α c_l|α| (|α|!/α!) û_ij^α · A_i,α,l with A_i,α,l = Σ_k û_ik^α X_ik,l: one sum per
    atom and (l, α) pair. The term k = j (Y_l(1) X_ij) is subtracted. The same values as the triplet sums (to
    rounding), at a cost in bonds × pairs (11 for l < 3) instead of triplets × basis functions (tens of
    triplets per bond in dense solids, 9 functions).

    bonds [E3] edge ids within the three-body cutoff, centre / k [E3] their atoms i and k,
    radial [E3, L, Nn] radial(r_ik) f_c(r_ik), fc_bond [E3] f_c(r_ij), and per (l, α) pair P: monomial [E3, P] û^α,
    angular [E3, P] c_l|α| (|α|!/α!) û^α.
    """

    def __init__(
        self,
        bonds: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        r: Tensor,
        radial: SphericalBesselRadial,
        angular: AngularMonomials,
        envelope: nn.Module,
        n_atoms: int,
    ):
        self.bonds, self.n_atoms = bonds, n_atoms
        self.centre, self.k = edge_index[0, bonds], edge_index[1, bonds]
        r3 = r[bonds]
        unit = edge_vec[bonds] / r3.unsqueeze(-1)  # [E3, 3]
        self.monomial, self.angular = angular(unit)  # [E3, P] each
        self.l, self.self_term = angular.l, angular.self_term.to(r)
        self.fc_bond = envelope(r3)  # [E3]
        self.radial = radial(r3) * self.fc_bond.view(-1, 1, 1)  # [E3, L, Nn]

    def sum_over_k(self, x: Tensor) -> Tensor:
        """x [N, L·Nn] per atom → [E3, L·Nn]: Σ_{k≠j} R_ln(r_ik) Y_l(cos θ_jik) f_c(r_ik) x[k, (l, n)] for every
        bond i→j (over the other bonds i→k of its atom i, periodic images included)."""
        X = self.radial * x.index_select(0, self.k).view_as(self.radial)  # [E3, L, Nn]
        terms = self.monomial.unsqueeze(-1) * X.index_select(1, self.l)  # [E3, P, Nn]
        per_atom = terms.new_zeros((self.n_atoms, *terms.shape[1:])).index_add_(0, self.centre, terms)  # [N, P, Nn]
        at_bond = self.angular.unsqueeze(-1) * per_atom.index_select(0, self.centre)  # [E3, P, Nn]
        summed = torch.zeros_like(X).index_add_(1, self.l, at_bond) - self.self_term.view(1, -1, 1) * X
        return summed.flatten(1)


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
        self.angular3 = AngularMonomials(max_l)
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

    def geometry(self, edge_index: Tensor, edge_vec: Tensor) -> Tensor:
        """The ids [E3] of the edges within the three-body cutoff (see threebody_bonds)."""
        return threebody_bonds(torch.linalg.norm(edge_vec, dim=-1), self.threebody_cutoff)

    def forward(
        self,
        numbers: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        condition: Tensor | None = None,
        geometry: Tensor | None = None,
    ) -> Tensor:
        """numbers [N], edge_index [2,E] (centre i, neighbour j), edge_vec [E,3] Å (r_j − r_i),
        condition [N,F] added to the initial atom features, geometry from self.geometry (made here when
        None) → atom features [N,F]."""
        s = self.embedding(numbers)
        if condition is not None:
            s = s + condition
        r = torch.linalg.norm(edge_vec, dim=-1)
        rbf = self.rbf(r)  # [E, n_rbf], vanishes smoothly at the cutoff
        e = fused.silu(self.edge_embedding(rbf))
        bonds = threebody_bonds(r, self.threebody_cutoff) if geometry is None else geometry
        t = ThreeBodyBasis(bonds, edge_index, edge_vec, r, self.radial3, self.angular3, self.envelope3, s.shape[0])
        pairs = EdgePairs(edge_index[0], edge_index[1], s.shape[0])
        for three_body, conv in zip(self.three_body, self.convs):
            e = three_body(s, e, t)
            s, e = conv(s, e, pairs, rbf)
        return s
