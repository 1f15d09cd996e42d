"""Ahead-of-time compiled energy, forces and virial of a potential (torch.export + AOTInductor).

For MD of small systems an eager step is hundreds of tiny operator calls whose Python and dispatch
overhead outweighs the arithmetic; torch.compile removes most of it but keeps guards and wrappers per
call. Here the energy and its edge-vector derivative (models.response.EnergyForcesVirial, the graph
`multifi deploy` writes) are exported with symbolic sizes and compiled once into a C++ package, called
without Python in between. The fidelity is an input, so one package serves every fidelity. Building needs
a C++ compiler and takes minutes; packages are cached on disk by weights, model code, dtype, torch version
and CPU capability (MULTIFI_CACHE, default ~/.cache/multifi), so later calculators load in a second.

Interface: AotModel(potential, dtype)(numbers [N], positions [N,3] Å, edge_index [2,E], shift_vec [E,3] Å,
fidelity index) → (atom energies [N] eV, forces [N,3] eV/Å, virial [3,3] eV, W = −Σ r_ij ⊗ ∂E/∂r_ij).
CPU only. Structures with fewer than 2 atoms, 2 edges or (M3GNet) 2 bonds within the three-body cutoff are outside
the exported sizes: the call returns None and the caller runs the eager model.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch

from multifi.errors import MultifiError
from multifi.models.m3gnet import threebody_bonds
from multifi.models.potential import WeightVersions
from multifi.models.response import EnergyForcesVirial

MIN_SIZE = 2  # torch.export specialises sizes 0 and 1


def cache_dir() -> Path:
    return Path(os.environ.get("MULTIFI_CACHE") or Path.home() / ".cache" / "multifi") / "aot"


class AotModel:
    """The potential compiled ahead of time for `dtype` (loaded from the cache if built)."""

    def __init__(self, potential, dtype: torch.dtype):
        self._weights = WeightVersions(potential, copies=True)  # the package holds a copy of them
        self._source = potential
        potential = copy.deepcopy(potential).to(dtype).eval()
        potential.use_compile = False
        for p in potential.parameters():
            p.requires_grad_(False)
        self.dtype = dtype
        self.threebody = threebody_cutoff(potential)
        path = cache_dir() / f"{_key(potential, dtype)}.pt2"
        if not path.exists():
            _build(EnergyForcesVirial(potential, 0), self.threebody, dtype, path)
        self._run = torch._inductor.aoti_load_package(str(path))
        self.path = path

    def current(self, potential=None) -> bool:
        """Whether `potential` (default: the one it was made from) is the one it was made from and its weights and
        buffers are unchanged since (any change of a value, in place, through `.data` or by a replaced tensor,
        makes it stale)."""
        return (potential is None or potential is self._source) and not self._weights.changed()

    def __call__(self, numbers, positions, edge_index, shift_vec, fidelity: int):
        """(atom energies, forces, virial), or None for a structure outside the exported sizes."""
        if numbers.shape[0] < MIN_SIZE or edge_index.shape[1] < MIN_SIZE:
            return None
        fid = torch.full_like(numbers, fidelity)
        args = _inputs(numbers, positions.to(self.dtype), edge_index, shift_vec.to(self.dtype), fid, self.threebody)
        if self.threebody > 0 and args[-1].shape[0] < MIN_SIZE:
            return None
        atom_energy, forces, virial = self._run(*args)
        return atom_energy, forces, virial


def threebody_cutoff(potential) -> float:
    """The representation's three-body cutoff (Å), 0 for a backbone without three-body terms."""
    return float(getattr(potential.representation, "threebody_cutoff", 0.0) or 0.0)


def inside_sizes(numbers, positions, edge_index, shift_vec, threebody: float) -> bool:
    """Whether a package takes the structure: at least MIN_SIZE atoms, edges and (threebody > 0, Å) bonds within the
    three-body cutoff. What a caller checks before building a package for a structure it could not run."""
    if numbers.shape[0] < MIN_SIZE or edge_index.shape[1] < MIN_SIZE:
        return False
    fid = torch.zeros_like(numbers)
    return threebody <= 0 or _inputs(numbers, positions, edge_index, shift_vec, fid, threebody)[-1].shape[0] >= MIN_SIZE


def _inputs(numbers, positions, edge_index, shift_vec, fid, threebody: float) -> tuple:
    """The exported function's arguments: (species, positions, edges, shift vectors, atom weights, atom
    fidelities[, ids of the bonds within the three-body cutoff])."""
    weight = torch.ones(positions.shape[0], dtype=positions.dtype)
    args = (numbers, positions, edge_index, shift_vec, weight, fid)
    if threebody > 0:
        vec = positions.index_select(0, edge_index[1]) - positions.index_select(0, edge_index[0]) + shift_vec
        r = torch.linalg.norm(vec, dim=-1)
        args = args + (threebody_bonds(r, threebody),)
    return args


def _key(potential, dtype: torch.dtype) -> str:
    """Hash of everything the compiled package depends on: weights and buffers, architecture, the model code,
    dtype, torch version and CPU capability."""
    h = hashlib.sha256()
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in potential.state_dict().items()}, buffer)
    h.update(buffer.getvalue())
    h.update(repr(potential).encode())
    package = Path(__file__).parent  # the code that defines the traced graph
    for source in sorted([*package.glob("models/*.py"), *package.glob("nn/*.py"), Path(__file__)]):
        h.update(source.read_bytes())
    h.update(f"{dtype}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}".encode())
    return h.hexdigest()[:24]


def _example(core: EnergyForcesVirial, threebody: float, dtype: torch.dtype) -> tuple:
    """Inputs to trace with: a structure with enough atoms, edges and three-body bonds."""
    from ase.build import molecule

    from multifi.data.batch import graph_from_atoms

    g = graph_from_atoms([molecule("CH3CH2OH")], core.potential.cutoff, 0, dtype=dtype)
    zeros = torch.zeros(g.edge_index.shape[1], 3, dtype=dtype)
    return _inputs(g.numbers, g.positions, g.edge_index, zeros, torch.zeros_like(g.numbers), threebody)


def _trace(core: EnergyForcesVirial, threebody: float, dtype: torch.dtype):
    """core as an fx graph of aten operations at symbolic sizes (make_fx), arguments as `_inputs` orders them."""
    from torch.fx.experimental.proxy_tensor import make_fx

    if threebody > 0:
        fn = lambda s, p, e, v, w, f, b: core(s, p, e, v, w, b, f)  # noqa: E731
    else:
        fn = lambda s, p, e, v, w, f: core(s, p, e, v, w, None, f)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*_example(core, threebody, dtype))


def _build(core: EnergyForcesVirial, threebody: float, dtype: torch.dtype, path: Path) -> None:
    """Trace core at symbolic sizes, export, compile with AOTInductor, write the package atomically."""
    example = _example(core, threebody, dtype)
    N, E = torch.export.Dim("N", min=MIN_SIZE), torch.export.Dim("E", min=MIN_SIZE)
    dims = [{0: N}, {0: N}, {1: E}, {0: E}, {0: N}, {0: N}]
    if threebody > 0:
        dims.append({0: torch.export.Dim("B", min=MIN_SIZE)})
    path.parent.mkdir(parents=True, exist_ok=True)
    traced = _trace(core, threebody, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(traced, example, dynamic_shapes=tuple(dims), strict=False)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            try:
                built = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tmp) / path.name))
            except Exception as exc:  # no C++ compiler, unsupported operator …
                first = " ".join(str(exc).split())[:300]
                raise MultifiError(f"ahead-of-time compilation failed (needs a C++ compiler): {first}") from None
            os.replace(built, path)
