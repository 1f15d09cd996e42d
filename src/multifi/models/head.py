"""Energy head: atomwise readout MLP(s) plus per-fidelity reference energies and scale."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from multifi.data.stats import N_ELEMENTS, composition_matrix, estimate_errors, fit_baseline  # noqa: F401 - re-exported
from multifi.nn import MLP

NULL_DIRS = 4  # open compositions kept per fidelity; beyond that, their elements count as estimated
UNKNOWN_SPREAD = -1.0  # head.spread of a fidelity whose estimated references have no known error


class EnergyHead(nn.Module):
    """Atom energies E_i = scale[f] · MLP([s_i, c_i]) + ref[Z_i, f]  (eV), float64 on output.

    With `heads`, one MLP per fidelity; otherwise one MLP shared by all fidelities.
    ref [119, K] eV and scale [K] eV are buffers fitted on the training labels (data.stats.fit_references);
    fitted [119, K] bool records which references came from the fidelity's own labels (the others were
    estimated from the other fidelities; all False: element unknown to the model). null [119, K, NULL_DIRS]
    float64: per fidelity the compositions its labels leave open (data.stats.References.null, zero-padded):
    a structure with counts c has an estimated reference sum where c·null[:, k] ≠ 0 (open_structures).
    contact [119, 119] Å: the shortest distance of each element pair in the training structures (0: unknown),
    reach [119] Å: the farthest any training atom of each element lay from its nearest neighbour (0: unknown),
    to warn when a prediction's atoms are far closer to, or farther from, their neighbours than in training.
    spread [K] eV/atom: the expected error of an estimated reference at each fidelity (References.spread, the
    leave-one-out error of the shared shift model; UNKNOWN_SPREAD, −1: unknown; not NaN, which no state-dict
    comparison would find equal to itself), for the uncertainty of structures containing one
    (reference_error).
    atomic [K] bool: fidelities whose references are given atomic energies plus atomic_shift [K] eV/atom (their
    labels' mean binding energy per atom; 0 elsewhere; data/atomic_energies.py); given [119, K] bool: references
    given as an atomic energy to an element without labels at that fidelity (known, but its environments were
    learnt at the other fidelities only).
    With `shared_baseline` (fidelity-blind models, mode `single`) every fidelity uses column 0 of
    ref and scale, fitted on all fidelities pooled (fit_baseline(..., pooled=True)).
    """

    def __init__(
        self,
        features: int,
        n_fidelities: int,
        readout_dim: int = 0,
        heads: bool = False,
        hidden: int | None = None,
        shared_baseline: bool = False,
    ):
        super().__init__()
        hidden = hidden or max(features // 2, 1)
        n_mlps = n_fidelities if heads else 1
        self.heads = heads
        self.shared_baseline = shared_baseline
        self.mlps = nn.ModuleList(MLP([features + readout_dim, hidden, 1]) for _ in range(n_mlps))
        self.register_buffer("ref", torch.zeros(N_ELEMENTS, n_fidelities, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_fidelities, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros(N_ELEMENTS, n_fidelities, dtype=torch.bool))
        self.register_buffer("null", torch.zeros(N_ELEMENTS, n_fidelities, NULL_DIRS, dtype=torch.float64))
        self.register_buffer("contact", torch.zeros(N_ELEMENTS, N_ELEMENTS, dtype=torch.float64))
        self.register_buffer("reach", torch.zeros(N_ELEMENTS, dtype=torch.float64))
        self.register_buffer("spread", torch.full((n_fidelities,), UNKNOWN_SPREAD, dtype=torch.float64))
        self.register_buffer("atomic", torch.zeros(n_fidelities, dtype=torch.bool))
        self.register_buffer("atomic_shift", torch.zeros(n_fidelities, dtype=torch.float64))
        self.register_buffer("given", torch.zeros(N_ELEMENTS, n_fidelities, dtype=torch.bool))

    def forward(
        self, s: torch.Tensor, cond: torch.Tensor | None, numbers: torch.Tensor, fid_atom: torch.Tensor
    ) -> torch.Tensor:
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
        keep = {
            name: getattr(self, name) for name in ("ref", "scale", "null", "contact", "reach", "spread", "atomic_shift")
        }
        super()._apply(fn, recurse)
        for name, before in keep.items():
            setattr(self, name, before.to(device=getattr(self, name).device, dtype=torch.float64))
        return self

    @staticmethod
    def upgrade_state(state_dict: dict, prefix: str) -> None:
        """Fill in place the buffers a head saved by an earlier multifi version lacks (keys under `prefix`):
        `fitted` (every nonzero reference was fitted), `null` (none recorded), `contact` and `reach` (unknown), and
        `spread` (from the recorded references, stats.estimate_errors), `atomic`, `atomic_shift`, `given` (least-squares
        references, none given)."""
        if prefix + "ref" not in state_dict:
            return
        ref = state_dict[prefix + "ref"]
        state_dict.setdefault(prefix + "atomic", torch.zeros(ref.shape[1], dtype=torch.bool))
        state_dict.setdefault(prefix + "atomic_shift", torch.zeros(ref.shape[1], dtype=torch.float64))
        state_dict.setdefault(prefix + "given", torch.zeros(ref.shape, dtype=torch.bool))
        state_dict.setdefault(prefix + "fitted", ref != 0)
        state_dict.setdefault(prefix + "null", torch.zeros(*ref.shape, NULL_DIRS, dtype=torch.float64))
        state_dict.setdefault(prefix + "contact", torch.zeros(N_ELEMENTS, N_ELEMENTS, dtype=torch.float64))
        state_dict.setdefault(prefix + "reach", torch.zeros(N_ELEMENTS, dtype=torch.float64))
        if prefix + "spread" not in state_dict:  # from the references it recorded (stats.estimate_errors)
            spread = estimate_errors(
                ref.cpu().numpy(),
                state_dict[prefix + "fitted"].cpu().numpy(),
                state_dict[prefix + "null"].cpu().numpy(),
            )
            state_dict[prefix + "spread"] = torch.as_tensor(np.where(np.isnan(spread), UNKNOWN_SPREAD, spread))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.upgrade_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_baseline(
        self,
        ref: np.ndarray,
        scale: np.ndarray,
        fitted: np.ndarray | None = None,
        null: list | None = None,
        spread: np.ndarray | None = None,
        atomic_shift: np.ndarray | None = None,
        given: np.ndarray | None = None,
    ) -> None:
        """ref [119, K] eV, scale [K] eV, fitted [119, K] bool (default: where ref is nonzero), null: per
        fidelity its open compositions [d, 119] (References.null; default none), spread [K] eV/atom: the expected
        error of an estimated reference (References.spread; NaN or default: unknown); atomic_shift [K] eV/atom
        (NaN: least-squares references) and given [119, K] bool of atomic energies (References; default: none)."""
        ref = torch.as_tensor(ref, dtype=torch.float64)
        self.set_atomic(torch.arange(len(self.atomic)), atomic_shift, given)
        self.spread.fill_(UNKNOWN_SPREAD)
        if spread is not None:
            self.set_spread(torch.arange(len(self.spread)), spread)
        self.ref.copy_(ref)
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float64))
        self.fitted.copy_(ref != 0 if fitted is None else torch.as_tensor(fitted, dtype=torch.bool))
        for k in range(self.null.shape[1]):
            self.set_open(k, None if null is None else null[k])

    @torch.no_grad()
    def set_atomic(self, columns, shift: np.ndarray | None, given: np.ndarray | None) -> None:
        """atomic, atomic_shift, given [:, columns] ← shift [len(columns)] eV/atom (NaN or None: least-squares
        references) and given [119, len(columns)] bool (None: none)."""
        columns = torch.as_tensor(columns)
        value = torch.full((len(columns),), float("nan"), dtype=torch.float64)
        if shift is not None:
            value = torch.as_tensor(np.asarray(shift, dtype=np.float64))
        self.atomic[columns] = ~torch.isnan(value).to(self.atomic.device)
        self.atomic_shift[columns] = torch.nan_to_num(value, nan=0.0).to(self.atomic_shift.device)
        self.given[:, columns] = False
        if given is not None:
            self.given[:, columns] = torch.as_tensor(np.asarray(given, dtype=bool)).to(self.given.device)

    @torch.no_grad()
    def set_spread(self, columns, spread) -> None:
        """spread[columns] ← `spread` [len(columns)] (eV/atom; NaN: unknown); columns: fidelity indices."""
        value = torch.as_tensor(np.asarray(spread, dtype=np.float64))
        self.spread[columns] = torch.where(torch.isnan(value), UNKNOWN_SPREAD, value).to(self.spread.device)

    @torch.no_grad()
    def set_open(self, k: int, null: np.ndarray | None) -> None:
        """Record fidelity k's open compositions [d, 119]; with more than NULL_DIRS, their elements are marked
        estimated instead (every structure with them is then flagged, as for an element without labels)."""
        self.null[:, k] = 0.0
        if null is None or len(null) == 0:
            return
        null = torch.as_tensor(np.asarray(null), dtype=torch.float64)
        if len(null) > NULL_DIRS:
            self.fitted[(null.abs() > 1e-8).any(0), k] = False
            return
        self.null[:, k, : len(null)] = null.T

    @torch.no_grad()
    def record_contacts(self, contact: np.ndarray, reach: np.ndarray | None = None) -> None:
        """Merge shortest training distances [119, 119] Å (0: pair absent) into `contact` (the smaller wins) and
        each element's farthest nearest-neighbour distance [119] Å (0: absent, inf: an atom without neighbours)
        into `reach` (the larger wins)."""
        new = torch.as_tensor(contact, dtype=torch.float64, device=self.contact.device)
        both = (self.contact > 0) & (new > 0)
        self.contact.copy_(torch.where(both, torch.minimum(self.contact, new), torch.maximum(self.contact, new)))
        if reach is not None:
            self.reach.copy_(
                torch.maximum(self.reach, torch.as_tensor(reach, dtype=torch.float64, device=self.reach.device))
            )

    def known(self) -> torch.Tensor:
        """[119] bool: elements seen in training (a reference at some fidelity, fitted or estimated)."""
        return self.fitted.any(1) | (self.ref != 0).any(1)

    def open_elements(self, k: int) -> list[int]:
        """Elements fidelity k's labels contain only in fixed proportions (their split is estimated)."""
        return torch.nonzero((self.null[:, k].abs() > 1e-8).any(1)).flatten().tolist()

    def determined_structures(self, numbers: torch.Tensor, structure: torch.Tensor, fidelity: torch.Tensor, n: int):
        """[n] bool: structures whose reference energy at their fidelity the training labels determine: no
        element's reference estimated and a composition not open. numbers, structure [N], fidelity [n]."""
        column = torch.zeros_like(fidelity) if self.shared_baseline else fidelity
        estimated = (~self.fitted[numbers, column[structure]]).to(torch.float64)
        per_structure = torch.zeros(n, dtype=torch.float64, device=numbers.device).index_add_(0, structure, estimated)
        return (per_structure == 0) & ~self.open_structures(numbers, structure, column, n)

    def reference_error(self, numbers: torch.Tensor, structure: torch.Tensor, fidelity: torch.Tensor, n: int):
        """[n] eV: the expected error of each structure's reference energy sum at its fidelity, 0 where its
        training labels determine it. An estimated reference errs by about spread[k] per atom, alike for the atoms
        of one element and independently between elements: spread[k]·sqrt(Σ_Z n_Z² + |c·null|²), the sum over the
        estimated elements, c·null the projection of an open composition c; NaN where that error is unknown
        (UNKNOWN_SPREAD).
        numbers, structure [N] (atom → structure), fidelity [n]."""
        column = torch.zeros_like(fidelity) if self.shared_baseline else fidelity
        estimated = (~self.fitted[numbers, column[structure]]).to(torch.float64)
        counts = torch.zeros(n * N_ELEMENTS, dtype=torch.float64, device=numbers.device)
        counts.index_add_(0, structure * N_ELEMENTS + numbers.long(), estimated)  # estimated atoms per (structure, Z)
        variance = counts.view(n, N_ELEMENTS).square().sum(1)
        if bool(self.null.any()):
            proj = torch.zeros(n, NULL_DIRS, dtype=torch.float64, device=numbers.device)
            proj.index_add_(0, structure, self.null[numbers, column[structure]])
            variance = variance + proj.square().sum(1) * (proj.abs() > 1e-6).any(1)
        spread = self.spread[column]
        spread = torch.where(spread < 0, float("nan"), spread)
        return torch.where(variance > 0, spread * variance.sqrt(), torch.zeros_like(variance))

    def open_structures(self, numbers: torch.Tensor, structure: torch.Tensor, column: torch.Tensor, n: int):
        """[n] bool: structures whose composition is open at their fidelity column (a reference sum the labels
        do not fix). numbers, structure [N] (atom → structure), column [n]."""
        if not bool(self.null.any()):
            return torch.zeros(n, dtype=torch.bool, device=numbers.device)
        proj = torch.zeros(n, NULL_DIRS, dtype=torch.float64, device=numbers.device)
        proj.index_add_(0, structure, self.null[numbers, column[structure]])  # Σ over atoms of null[Z, k]
        return (proj.abs() > 1e-6).any(1)
