"""Deploy a potential at one fidelity as a Python-free TorchScript file for MD engines (LAMMPS).

The energy and its derivative with respect to the edge vectors (as in Potential: forces and virial
come from ∂E/∂r_ij, see models/response.py) are traced once into aten operations with symbolic
sizes (make_fx), so the file holds the backward pass as plain operations and works for any number
of atoms and pairs; the geometry-only bookkeeping (M3GNet's bonds within the three-body cutoff) is the
model's own threebody_bonds, compiled by TorchScript. The fidelity is baked in; the file records it with the
cutoff, the elements and the multifi version (TorchScript extra file `multifi.json`).

Interface of the deployed module (energies float64; forces and virial in the dtype deployed with, float64 by default):
    forward(species [N] int64 atomic numbers, positions [N,3] Å, cell [3,3] Å,
            edge_index [2,E] int64 (centre i, neighbour j),
            shifts [E,3] cell shifts (r_ij = r_j − r_i + shifts @ cell), nlocal: int)
    → {"energy": [] eV (sum over the first nlocal atoms), "atom_energies": [N] eV,
       "forces": [N,3] eV/Å on every atom (ghosts too), "virial": [3,3] eV}
The atoms beyond nlocal are ghosts (an MD engine's copies of atoms owned elsewhere): their energies
do not count, the forces on them belong to their owners. virial W_ab = −Σ_ij r_ij,a ∂E/∂r_ij,b
(symmetrised; LAMMPS convention, W = −V σ with σ the ASE stress).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from multifi.data.cells import complete_cells
from multifi.errors import MultifiError
from multifi.models.m3gnet import threebody_bonds
from multifi.models.response import EnergyForcesVirial
from multifi.scripted import scriptable

log = logging.getLogger("multifi")
META_FILE = "multifi.json"
FORMAT = 1


class Deployed(nn.Module):
    """TorchScript entry point (see the module docstring for the interface)."""

    def __init__(
        self,
        core: torch.jit.ScriptModule,
        cutoff: float,
        threebody_cutoff: float,
        dtype: torch.dtype,
        interactions: int,
        known: torch.Tensor,
    ):
        super().__init__()
        self.core = core
        self.register_buffer("known", known)  # [119] bool: elements with a reference energy (seen in training)
        self.cutoff = cutoff
        self.interactions = interactions
        self.threebody_cutoff = threebody_cutoff  # 0: no three-body terms
        self.dtype = dtype

    def forward(
        self,
        species: torch.Tensor,
        positions: torch.Tensor,
        cell: torch.Tensor,
        edge_index: torch.Tensor,
        shifts: torch.Tensor,
        nlocal: int,
    ) -> dict[str, torch.Tensor]:
        z = species.clamp(0, self.known.shape[0] - 1)
        if bool((species != z).any()) or bool((~self.known[z]).any()):
            raise RuntimeError(
                "multifi: an atom's element was not in the model's training data (elements: multifi.json)"
            )
        positions, cell, shifts = positions.to(self.dtype), cell.to(self.dtype), shifts.to(self.dtype)
        n = positions.shape[0]
        shift_vec = shifts @ cell
        vec = positions.index_select(0, edge_index[1]) - positions.index_select(0, edge_index[0]) + shift_vec
        r = torch.linalg.norm(vec, dim=-1)
        keep = torch.nonzero(r < self.cutoff).squeeze(-1)  # an engine's list has pairs up to cutoff + skin
        edge_index, shift_vec, r = edge_index.index_select(1, keep), shift_vec.index_select(0, keep), r[keep]
        if nlocal < n:  # ghosts: only atoms within interactions − 1 hops of a local atom need their own edges
            keep = torch.nonzero(_within_hops(edge_index, n, nlocal, self.interactions - 1)[edge_index[0]]).squeeze(-1)
            edge_index, shift_vec, r = edge_index.index_select(1, keep), shift_vec.index_select(0, keep), r[keep]
        if self.threebody_cutoff > 0:
            bonds = threebody_bonds(r, self.threebody_cutoff)
        else:
            bonds = torch.zeros(0, dtype=torch.long, device=positions.device)
        weight = (torch.arange(n, device=positions.device) < nlocal).to(self.dtype)
        atom_energy, forces, virial = self.core(species, positions, edge_index, shift_vec, weight, bonds)
        return {
            "energy": (atom_energy * weight.to(atom_energy.dtype)).sum(),
            "atom_energies": atom_energy,
            "forces": forces,
            "virial": virial,
        }


def _within_hops(edge_index: torch.Tensor, n: int, nlocal: int, hops: int) -> torch.Tensor:
    """[n] bool: atoms at most `hops` edges away from a local atom (index < nlocal).

    After K interactions a local atom's energy depends on features that atoms h hops away have after
    K − h interactions, which need all their edges only while h ≤ K − 1: the edges centred on atoms
    further out (ghosts near the edge of an MD engine's ghost shell) change no local energy."""
    reached = torch.arange(n, device=edge_index.device) < nlocal
    for _ in range(hops):
        nxt = reached.clone()
        nxt[edge_index[1][reached[edge_index[0]]]] = True
        reached = nxt
    return reached


def _example(potential, dtype: torch.dtype):
    """A small periodic structure of the model's elements with every kind of input filled."""
    from ase.build import bulk

    from multifi.data.batch import graph_from_atoms

    atoms = bulk("Si", "diamond", 5.43, cubic=True)
    atoms.numbers[:] = np.resize(potential.elements or [14], len(atoms))
    atoms.rattle(0.05, seed=0)
    g = graph_from_atoms([atoms], potential.cutoff, 0, dtype=dtype)
    return g.numbers, g.positions, g.edge_index, g.shifts @ g.cell[0]


def build_deployed(potential, fidelity: str, dtype: torch.dtype = torch.float64) -> torch.jit.ScriptModule:
    """A TorchScript module of `potential` at `fidelity` (by name; unknown names are an error)."""
    import copy

    index = potential.fidelity_index(fidelity)
    potential = copy.deepcopy(potential).to(dtype).eval()
    potential.use_compile = False
    for p in potential.parameters():
        p.requires_grad_(False)
    rep = potential.representation
    threebody = float(getattr(rep, "threebody_cutoff", 0.0))
    core = EnergyForcesVirial(potential, index)
    species, positions, edge_index, shift_vec = _example(potential, dtype)
    n = positions.shape[0]
    if threebody > 0:
        r = torch.linalg.norm(shift_vec + positions[edge_index[1]] - positions[edge_index[0]], dim=-1)
        bonds = threebody_bonds(r, threebody)
        fn = core
    else:
        bonds = torch.zeros(0, dtype=torch.long)
        fn = lambda s, p, e, v, w, b: core(s, p, e, v, w, None)  # noqa: E731
    weight = torch.ones(n, dtype=dtype)
    with warnings.catch_warnings():  # TorchScript deprecation notes: it stays the format libtorch loads
        warnings.simplefilter("ignore")
        return _script(
            fn,
            potential.cutoff,
            threebody,
            dtype,
            (species, positions, edge_index, shift_vec, weight, bonds),
            potential.config.interactions,
            potential.head.known().detach().cpu(),
        )


def _script(
    fn, cutoff: float, threebody: float, dtype, example, interactions: int, known: torch.Tensor
) -> torch.jit.ScriptModule:
    """make_fx(fn) with symbolic sizes (the backward pass becomes plain operations), then TorchScript."""
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    scripted_core = torch.jit.script(scriptable(traced))
    return torch.jit.script(Deployed(scripted_core, cutoff, threebody, dtype, interactions, known))


def metadata(potential, fidelity: str, dtype: torch.dtype) -> dict:
    """What the deployed file records: fidelity, cutoffs (Å), elements, the interaction count (an MD engine
    needs ghost atoms out to interactions × cutoff for exact domain decomposition), multifi version."""
    from ase.data import atomic_masses, chemical_symbols

    import multifi

    model = potential.config
    interactions = model.interactions
    return {
        "format": FORMAT,
        "multifi_version": multifi.__version__,
        "fidelity": fidelity,
        "fidelities": list(potential.fidelities.names),
        "backbone": model.backbone,
        "cutoff": float(potential.cutoff),
        "interactions": interactions,
        "ghost_cutoff": interactions * float(potential.cutoff),
        "threebody_cutoff": float(getattr(potential.representation, "threebody_cutoff", 0.0)),
        "elements": [chemical_symbols[z] for z in potential.elements],
        "masses": [round(float(atomic_masses[z]), 4) for z in potential.elements],  # u, beside each element
        "estimated_elements": [chemical_symbols[z] for z in estimated_elements(potential, fidelity)],
        "open_elements": [chemical_symbols[z] for z in open_elements(potential, fidelity)],
        # a given atomic energy as reference, no labels at this fidelity (data.atomic_energies): bonding learnt elsewhere
        "given_elements": [
            chemical_symbols[z]
            for z in potential.elements
            if bool(
                potential.head.given[
                    int(z), 0 if potential.head.shared_baseline else potential.fidelity_index(fidelity)
                ]
            )
        ],
        "open_compositions": open_compositions(potential, fidelity),
        # training structures with a stress label at this fidelity (0: its virial never fitted, said by pair_coeff,
        # as the calculator says it when asked for stress); null: not recorded (older models)
        "stress_labels": potential.spec.get("stress_labels", {}).get(fidelity),
        "dtype": str(dtype).replace("torch.", ""),
    }


def estimated_elements(potential, fidelity: str) -> list[int]:
    """Atomic numbers whose reference energy at `fidelity` was estimated from other fidelities (no label)."""
    k = 0 if potential.head.shared_baseline else potential.fidelity_index(fidelity)
    fitted = potential.head.fitted.detach().cpu()  # [119, K]
    return [int(z) for z in potential.elements if not bool(fitted[int(z), k])]


def open_elements(potential, fidelity: str) -> list[int]:
    """Atomic numbers the labels of `fidelity` contain only in fixed proportions (their split is estimated)."""
    k = 0 if potential.head.shared_baseline else potential.fidelity_index(fidelity)
    return potential.head.open_elements(k)


def open_compositions(potential, fidelity: str) -> list[float]:
    """The compositions the labels of `fidelity` leave open, [directions × elements] flattened row by row over
    the model's elements (`elements` of multifi.json): a system with element counts c whose c · row ≠ 0 for
    some row has an estimated reference energy (EnergyHead.open_structures); [] when none."""
    k = 0 if potential.head.shared_baseline else potential.fidelity_index(fidelity)
    null = potential.head.null[:, k].detach().cpu().numpy()  # [119, NULL_DIRS]
    rows = [d for d in range(null.shape[1]) if np.abs(null[:, d]).max() > 1e-8]
    return [float(null[int(z), d]) for d in rows for z in potential.elements]


def _report_open_elements(potential, fidelity: str, where: str, strict: bool) -> None:
    from ase.data import chemical_symbols

    zs = open_elements(potential, fidelity)
    if not zs:
        return
    symbols = ", ".join(chemical_symbols[z] for z in zs)
    msg = (
        f"{where}: the {fidelity} labels held {symbols} only in fixed proportions (e.g. Ga and As only as GaAs): "
        f"structures with other proportions of them get estimated {fidelity} reference energies"
    )
    if strict:
        raise MultifiError(msg)
    log.warning("%s", msg)


def deploy(checkpoint, fidelity: str, out: str | Path, dtype: str = "float64", strict_references: bool = False) -> dict:
    """Write `checkpoint` (model.pt / .ckpt path or a Potential) at `fidelity` to `out`; returns its metadata.
    Nothing is written when the fidelity is unknown or the model cannot be converted. Elements whose
    reference energy at `fidelity` was estimated (no label of it contained them) get a warning, as in
    `predict` (an error with strict_references), and are listed in the metadata (`estimated_elements`)."""
    from multifi.data.dataset import atomic_write
    from multifi.models.elements import check_elements, check_stress_trained
    from multifi.models.registry import load_potential

    if dtype not in ("float32", "float64"):
        raise MultifiError(f"dtype must be float32 or float64, not {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    potential = checkpoint if isinstance(checkpoint, nn.Module) else load_potential(checkpoint, compile=False)
    where = "model" if isinstance(checkpoint, nn.Module) else str(checkpoint)
    k = potential.fidelities.index(fidelity, where=where)  # unknown names: one error naming the file, before any work
    numbers = np.asarray(potential.elements, dtype=np.int64)
    check_elements(
        potential, numbers, np.ones(len(numbers), np.int64), k, str(out), strict=strict_references, compositions=False
    )
    _report_open_elements(potential, fidelity, str(out), strict_references)
    check_stress_trained(potential, k, str(out))  # LAMMPS' pressure and NPT use it (pair_coeff says so too)
    meta = metadata(potential, fidelity, torch_dtype)
    module = build_deployed(potential, fidelity, torch_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        atomic_write(Path(out), lambda f: torch.jit.save(module, f, _extra_files={META_FILE: json.dumps(meta)}))
    return meta


def deployed_metadata(path: str | Path) -> dict | None:
    """The metadata (META_FILE) of a deployed file, read from its archive without loading the model; None for
    any other file."""
    import zipfile

    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("/extra/" + META_FILE):
                return json.loads(archive.read(name))
    return None


def load_deployed(path: str | Path, cutoff: float | None = None, elements=None):
    """(module, metadata) of a deployed file; a cutoff (Å) other than the model's, or an element the
    model does not know (symbols or atomic numbers), is an error."""
    from ase.data import atomic_numbers, chemical_symbols

    path = Path(path)
    if not path.exists():
        raise MultifiError(f"{path}: no such file")
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[META_FILE])
    except Exception as exc:  # any unreadable file is one user error
        raise MultifiError(f"{path}: not a deployed multifi model ({type(exc).__name__})") from None
    if cutoff is not None and abs(float(cutoff) - meta["cutoff"]) > 1e-9:
        raise MultifiError(f"{path}: cutoff {cutoff:g} Å requested, the model was trained with {meta['cutoff']:g} Å")
    for e in elements or []:
        sym = chemical_symbols[e] if isinstance(e, (int, np.integer)) else str(e)
        if sym not in meta["elements"] or sym not in atomic_numbers:
            raise MultifiError(f"{path}: element {sym} unknown to the model (knows {', '.join(meta['elements'])})")
    return module, meta


def ghost_atoms(atoms, ghost_cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Local atoms followed by the periodic images an MD engine keeps as ghosts (LAMMPS' rule: images
    within ghost_cutoff Å of the cell along each lattice direction, in fractional coordinates).
    Returns positions [N_all, 3] Å (locals wrapped into the cell) and owner [N_all] (local index)."""
    n = len(atoms)
    pbc = np.asarray(atoms.pbc, bool)
    if not pbc.any():
        return atoms.positions.copy(), np.arange(n)
    cell = complete_cells(atoms.cell.array, pbc)  # a slab without vacuum: unit vectors across it
    frac = atoms.positions @ np.linalg.inv(cell)
    frac[:, pbc] %= 1.0
    spacing = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    ext = np.where(pbc, ghost_cutoff / spacing, 0.0)
    ranges = [np.arange(-np.ceil(e), np.ceil(e) + 1) for e in ext]
    images = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    images = images[np.argsort(np.abs(images).sum(1), kind="stable")]  # (0, 0, 0) first: locals first
    f = (frac[None] + images[:, None]).reshape(-1, 3)
    owner = np.tile(np.arange(n), len(images))
    keep = np.all(~pbc | ((f >= -ext - 1e-12) & (f < 1 + ext)), axis=1)  # no bound across non-periodic axes
    return f[keep] @ cell, owner[keep]


def lammps_style_inputs(atoms, ghost_cutoff: float, cutoff: float) -> dict:
    """Inputs of a deployed model as LAMMPS gives them: locals, then ghosts, a full neighbour list of all
    atoms within `cutoff` without periodic shifts. Returns the forward's arguments and the ghosts' owners."""
    from multifi.data.neighbors import neighbor_list

    positions, owner = ghost_atoms(atoms, ghost_cutoff)
    i, j, _ = neighbor_list(positions, np.zeros((3, 3)), np.zeros(3, bool), cutoff)
    t = torch.as_tensor
    return {
        "species": t(atoms.numbers[owner], dtype=torch.long),
        "positions": t(positions, dtype=torch.float64),
        "cell": torch.zeros(3, 3, dtype=torch.float64),
        "edge_index": t(np.stack([i, j]), dtype=torch.long),
        "shifts": torch.zeros(len(i), 3, dtype=torch.float64),
        "nlocal": len(atoms),
        "owner": owner,
    }


def evaluate_like_lammps(module, meta: dict, atoms) -> dict:
    """Energy (eV), forces (eV/Å, ghost forces added to their owners as LAMMPS' newton on does) and the
    ASE stress (eV/Å³, periodic cells) of `atoms` through a deployed module with explicit ghost atoms."""
    args = lammps_style_inputs(atoms, meta["ghost_cutoff"], meta["cutoff"])
    owner = args.pop("owner")
    out = module(**args)
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, owner, out["forces"].double().numpy())
    result = {"energy": float(out["energy"]), "forces": forces}
    if atoms.pbc.all():
        s = -out["virial"].double().numpy() / atoms.get_volume()
        result["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return result
