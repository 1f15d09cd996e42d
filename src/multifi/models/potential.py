"""Potential = fidelity conditioning + representation + energy head; forces and stress by autograd.

Forces and stress are derivatives of the energy with respect to the edge vectors (see response.py).
Eager by default; with `compile` the energy and its edge-vector gradient are one torch.compile'd
function (torch.func.grad inside, dynamic shapes), so force training's second derivative is part of
the compiled graph's own backward instead of a double backward through hundreds of small eager ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import fields

import torch
from torch import nn

from multifi.config import ModelConfig
from multifi.data.batch import Graph
from multifi.data.fidelity import FidelityTable
from multifi.models.head import EnergyHead
from multifi.models.response import forces_from_edge_gradient, stress_from_edge_gradient
from multifi.nn import fused, scatter_sum
from multifi.nn.fidelity import FidelityConditioning

log = logging.getLogger("multifi")


def compile_requested(flag: bool | None = None) -> bool:
    """The model's `compile` setting, or MULTIFI_COMPILE=1 in the environment when unset."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("MULTIFI_COMPILE", "0").lower() not in ("", "0", "false")


class Potential(nn.Module):
    """An interatomic potential that predicts at any of its fidelities.

    forward(graph) → {"energy": [B] float64 eV, "forces": [N,3] eV/Å, "stress": [B,3,3] GPa (ASE sign)}
    (forces/stress only when asked). The fidelity of each structure is graph.fidelity [B].
    compile: run energy (+ gradient) through torch.compile (minutes of compilation on a CPU first).
    """

    def __init__(
        self,
        representation: nn.Module,
        conditioning: FidelityConditioning,
        head: EnergyHead,
        fidelities: FidelityTable,
        config: ModelConfig,
        spec: dict,
        compile: bool = False,
    ):
        super().__init__()
        self.representation = representation
        self.conditioning = conditioning
        self.head = head
        self.fidelities = fidelities
        self.config = config  # the model settings it was built from
        self.cutoff = float(config.cutoff)
        self.spec = spec  # constructor arguments as plain data (config dumped); saved with the weights, used to rebuild
        self.use_compile = compile

    @property
    def elements(self) -> list[int]:
        """Atomic numbers seen in training (with a reference energy at some fidelity)."""
        return torch.nonzero(self.head.known()).flatten().tolist()

    def atom_energies(
        self, edge_vec: torch.Tensor, numbers: torch.Tensor, edge_index: torch.Tensor, geometry, fid_atom: torch.Tensor
    ) -> torch.Tensor:
        """Atom energies [N] (float64, eV) as a function of the edge vectors [E,3] (Å). Structure sums are
        taken outside (and outside compiled code: nothing compiled depends on the number of structures)."""
        s = self.representation(numbers, edge_index, edge_vec, self.conditioning.input_condition(fid_atom), geometry)
        return self.head(s, self.conditioning.readout_condition(fid_atom), numbers, fid_atom)

    def forward(
        self,
        graph: Graph,
        forces: bool = False,
        stress: bool = False,
        create_graph: bool = False,
        atom_energies: bool = False,
        periodic: bool | None = None,
        geometry=None,
    ) -> dict[str, torch.Tensor]:
        """energy [B] eV (float64); forces [N, 3] eV/Å, stress [B, 3, 3] GPa when asked (stress of periodic
        structures, zero for the others); with `atom_energies` also atom_energy [N] eV, the atoms' shares of the
        energy (a partition the model makes, not an observable: it sums to the energy).
        periodic (whether any structure has a cell) and geometry (representation.geometry of the edge vectors) are
        read from the graph when not given; given, nothing here depends on the values of the tensors (tracing:
        multifi.scripted)."""
        if (forces or stress) and torch.is_inference_mode_enabled():  # a caller's torch.inference_mode()
            with torch.inference_mode(False):  # autograd needs tensors made outside it: the graph copied
                graph = Graph(**{f.name: getattr(graph, f.name).clone() for f in fields(graph)})
                return self.forward(graph, forces, stress, create_graph, atom_energies, periodic)
        B = graph.num_graphs
        if periodic is None:
            periodic = bool((graph.cell.abs().sum((1, 2)) > 0).any())
        stress = stress and periodic
        need_grad = forces or stress
        i = graph.edge_index[0]
        edge_vec = self.edge_vectors(graph)
        if geometry is None:
            geometry = self.representation.geometry(graph.edge_index, edge_vec.detach())
        args = (graph.numbers, graph.edge_index, geometry, graph.fidelity[graph.batch])
        if not need_grad:
            atom_energy = (_compiled(_atom_energies) if self.use_compile else _atom_energies)(self, edge_vec, *args)
            out = {"energy": scatter_sum(atom_energy, graph.batch, B)}
            return {**out, "atom_energy": atom_energy} if atom_energies else out
        vec = edge_vec.detach()
        # eager autograd needs grad mode on; the compiled torch.func.grad differentiates in any mode, and
        # with grad mode off it builds no backward graph (validation, the ASE calculator)
        with torch.set_grad_enabled(create_graph or not self.use_compile):
            if self.use_compile:
                atom_energy, g = _compiled(_energy_and_grad_functional)(self, vec, *args)
            else:
                atom_energy, g = _energy_and_grad(self, vec.requires_grad_(True), *args, create_graph=create_graph)
            out = {"energy": scatter_sum(atom_energy, graph.batch, B)}
            if atom_energies:
                out["atom_energy"] = atom_energy
            if forces:
                out["forces"] = forces_from_edge_gradient(g, graph.edge_index, graph.positions.shape[0])
            if stress:
                out["stress"] = stress_from_edge_gradient(g, vec, graph.batch[i], graph.volume())
        if not create_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out

    @staticmethod
    def edge_vectors(graph: Graph) -> torch.Tensor:
        """[E, 3] Å: r_ij = r_j − r_i + shifts_ij @ cell of the edge's structure."""
        i, j = graph.edge_index
        shift = torch.einsum("ea,eab->eb", graph.shifts, graph.cell[graph.batch[i]])
        return graph.positions[j] - graph.positions[i] + shift

    def fidelity_index(self, name: str) -> int:
        """The index of fidelity `name` (an unknown name is an error listing the known ones). A fidelity-blind
        model (inject `single`) trained on several fidelities' pooled labels predicts the same for each: said
        once per model, since the name then selects nothing."""
        k = self.fidelities.index(name, where="model")
        if self.head.shared_baseline and len(self.fidelities) > 1 and not getattr(self, "_said_blind", False):
            self._said_blind = True
            log.warning(
                "model: fidelity-blind (fidelity_embedding.inject: single), trained on the pooled labels of %s: "
                "%r gets the same prediction as every other fidelity",
                ", ".join(map(repr, self.fidelities.names)),
                name,
            )
        return k


# ---------------------------------------------------------------------------------------------- energy (+ gradient)
class WeightVersions:
    """Whether a module's parameters and buffers are still those it had when this was made: `changed()`, for code
    that holds them. Always seen (a few µs): a tensor replaced by another (`load_state_dict(assign=True)`, a new
    nn.Parameter or buffer, a replaced submodule) or given new storage (`p.data = …`, vector_to_parameters, `.double()`).
    Code reading the tensors themselves (a TorchScript graph) needs no more: in-place changes reach it. With
    `copies` (code holding copies of the values, an ahead-of-time package), any change of a value too, in place or
    through `p.data`, bit by bit against a copy taken now (the size of the weights; 0.3-0.5 ms per check for M3GNet
    64×3 and PaiNN 128×3 against 10-22 µs without: bench/weight_checks.py)."""

    def __init__(self, module: nn.Module, copies: bool = False):
        # every (owner's dict, name, object) of the module tree: a replaced tensor or submodule is another object
        # there (checked by lookups: listing module.parameters() again took 0.1-0.3 ms)
        self._slots = [
            (table, name, obj)
            for m in module.modules()
            for table in (m._parameters, m._buffers, m._modules)
            for name, obj in table.items()
            if obj is not None
        ]
        self._tensors = [*module.parameters(), *module.buffers()]
        self._pointers = [t.data_ptr() for t in self._tensors]
        self._live = [_bits(t) for t in self._tensors] if copies else []
        self._saved = [b.clone() for b in self._live]

    def changed(self) -> bool:
        if any(table.get(name) is not obj for table, name, obj in self._slots):
            return True
        if [t.data_ptr() for t in self._tensors] != self._pointers:
            return True
        return any(not torch.equal(a, b) for a, b in zip(self._live, self._saved))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's storage as integers of its width (floating point): compared bit for bit, a NaN equals itself."""
    t = t.detach()
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _atom_energies(pot: Potential, edge_vec, *args) -> torch.Tensor:
    return pot.atom_energies(edge_vec, *args)


def _energy_and_grad(pot: Potential, vec, *args, create_graph: bool):
    """Eager: atom energies [N] and ∂(Σ E)/∂vec [E,3] by autograd (vec requires grad); with create_graph the
    representation prepares for the second derivative that follows (nn.fused.differentiated_twice)."""
    with fused.differentiated_twice(create_graph):
        atom_energy = pot.atom_energies(vec, *args)
    (g,) = torch.autograd.grad(atom_energy.sum(), vec, create_graph=create_graph, allow_unused=True)
    return atom_energy, (torch.zeros_like(vec) if g is None else g)


def _energy_and_grad_functional(pot: Potential, vec, *args):
    """The same by torch.func.grad, so that torch.compile traces the derivative into its graph."""

    def total(v):
        atom_energy = pot.atom_energies(v, *args)
        return atom_energy.sum(), atom_energy

    g, atom_energy = torch.func.grad(total, has_aux=True)(vec)
    return atom_energy, g


COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same tracing and autograd, without code generation
_COMPILED: dict = {}


RECOMPILE_LIMIT = 32  # grad mode, dtype, trainable vs frozen (EMA) weights and 0/1 sizes each add a graph


def _compiled(fn):
    """torch.compile(fn) with dynamic shapes (atoms and edges vary per batch), made once per function.
    Its calls run with dynamo's recompile limit raised to RECOMPILE_LIMIT (default 8, beyond which dynamo
    silently falls back to eager); the limit of other compiled code in the process is not touched. With
    inductor, float32 sums compile without a guard on their length (models/inductor.py): one graph for
    every edge count, no recompilation when a batch first exceeds 4 096 edges."""
    key = (fn, COMPILE_BACKEND)
    if key not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        from multifi.models.inductor import unguarded_float_sums

        compiled = torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND)
        limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        codegen = unguarded_float_sums if COMPILE_BACKEND == "inductor" else contextlib.nullcontext

        def call(*args, **kwargs):
            with dynamo_config.patch(recompile_limit=limit), codegen():
                return compiled(*args, **kwargs)

        _COMPILED[key] = call
    return _COMPILED[key]
