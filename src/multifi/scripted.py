"""The calculator's eager model as a TorchScript graph: the same operators, without Python between them.

An eager call of a small system (MD, relaxations) is hundreds of small operator calls, and Python's overhead
between them outweighs their arithmetic. Here Potential.forward with forces (and stress) is traced once
(make_fx at symbolic sizes; the fused kernels of nn/fused.py recorded as the eager model calls them) and run
by TorchScript's interpreter with its graph optimisations off (they reorder floating-point operations and
specialise to the first sizes seen): the same operators on the same values in the same order as the eager
call, so the same numbers, bit for bit. A graph is used only after it reproduced the eager result of the
structure it was traced on exactly. Tracing takes a few seconds, in memory (no compiler, no file); the
graph calls the kernels loaded in this process. CPU only. (TorchScript is in maintenance in torch 2.x; it is
also what `multifi deploy` writes for LAMMPS.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import warnings

import torch

from multifi.data.batch import Graph
from multifi.models.potential import Potential, WeightVersions

log = logging.getLogger("multifi")

MIN_SIZE = 2  # tracing specialises sizes 0 and 1: atoms, edges and three-body bonds below it run eagerly
_BUILDING = threading.Lock()  # make_fx's tracing state is global: one build at a time in a process


class ScriptedPotential:
    """Potential.forward(graph, forces=True, stress=stress) of one structure as a TorchScript graph, traced on
    `example` (a structure within the traced sizes: see `fits`). Raises when tracing fails or the graph does
    not reproduce the eager result on `example` exactly."""

    def __init__(self, potential: Potential, example: Graph, stress: bool, reference: dict | None = None):
        """reference: the eager model's result for `example` (Potential.forward with forces and `stress`), if at
        hand (computed here otherwise)."""
        from multifi.nn import fused

        self.potential, self.stress = potential, stress
        fused.available()  # built (or found unavailable) before tracing
        inputs = self._inputs(example)
        self._weights = WeightVersions(potential)
        with (
            _BUILDING,
            fused.traced_kernels(),
            warnings.catch_warnings(),
            torch.fx.experimental._config.patch(use_duck_shape=False),
        ):
            warnings.simplefilter("ignore")
            from torch.fx.experimental.proxy_tensor import make_fx

            traced = make_fx(self._function(example), tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs)
            with _own_compilation_unit(type(traced)):
                # not frozen: a frozen graph (8 % faster for an 18-atom PaiNN) holds the weights and what it computed
                # from them as constants, which a change through `p.data` (an EMA copy, a fine-tuning loop) leaves
                # stale, unseen; this one reads the potential's own tensors at every call
                self._run = torch.jit.script(scriptable(traced)).eval()
        want = self._eager(example) if reference is None else reference
        got = self._call(inputs)
        if not all(torch.equal(want[k], got[k]) for k in got):
            raise RuntimeError("the traced graph does not reproduce the eager model's result exactly")

    def current(self, potential: Potential | None = None) -> bool:
        """Whether the graph still reads `potential`'s (default: its own) weights: it holds their tensors, so
        in-place changes (also through `.data`, and load_state_dict's copies) reach it at the next call, but another
        potential, a tensor replaced (load_state_dict(assign=True), a new parameter or buffer, a replaced module)
        or given new storage (`p.data = …`, vector_to_parameters, `.double()`) makes it stale."""
        return (potential is None or potential is self.potential) and not self._weights.changed()

    @staticmethod
    def fits(potential: Potential, graph: Graph) -> bool:
        """One structure with at least MIN_SIZE atoms, edges and (three-body models) bonds."""
        return _inputs(potential, graph) is not None

    def __call__(self, graph: Graph) -> dict[str, torch.Tensor] | None:
        """{"energy": [1], "forces": [N, 3], "stress": [1, 3, 3] when traced with stress}, as the eager model;
        None for a structure that does not fit (the caller runs the eager model)."""
        inputs = _inputs(self.potential, graph)
        return None if inputs is None else self._call(inputs)

    # ------------------------------------------------------------------------------------------------ internals
    def _inputs(self, graph: Graph) -> tuple:
        inputs = _inputs(self.potential, graph)
        if inputs is None:
            raise ValueError(f"a structure of at least {MIN_SIZE} atoms, edges and three-body bonds is needed to trace")
        return inputs

    def _function(self, example: Graph):
        potential, stress = self.potential, self.stress
        names = ("numbers", "positions", "cell", "batch", "n_atoms", "edge_index", "shifts", "fidelity")

        def forward(*tensors):
            graph = dataclasses.replace(example, **dict(zip(names, tensors)))
            geometry = tensors[len(names)] if len(tensors) > len(names) else None
            out = potential(graph, forces=True, stress=stress, periodic=stress, geometry=geometry)
            return (out["energy"], out["forces"]) + ((out["stress"],) if stress else ())

        return forward

    def _eager(self, graph: Graph) -> dict[str, torch.Tensor]:
        return self.potential(graph, forces=True, stress=self.stress)

    def _call(self, inputs: tuple) -> dict[str, torch.Tensor]:
        with torch.jit.optimized_execution(False), torch.no_grad():
            out = self._run(*inputs)
        return dict(zip(("energy", "forces", "stress"), out))


@contextlib.contextmanager
def _own_compilation_unit(module_class: type):
    """Script under a TorchScript compilation unit of its own: the process-wide one keeps every scripted type's code
    for the process's life (3-9 MB per build), and so does torch's cache of module types, which holds each traced
    graph's class (one per build). The scripted modules hold their own unit, so the code goes with them. Other
    threads scripting meanwhile use this unit too (their modules hold it just the same)."""
    from torch.jit._recursive import concrete_type_store

    state = torch.jit._state
    saved, state._python_cu = state._python_cu, torch._C.CompilationUnit()
    try:
        yield
    finally:
        state._python_cu = saved
        concrete_type_store.type_store.pop(module_class, None)


def _inputs(potential: Potential, graph: Graph) -> tuple | None:
    """The traced function's arguments for one structure (graph tensors, then the representation's geometry),
    or None when it has fewer than MIN_SIZE atoms, edges or three-body bonds."""
    g = graph
    geometry = potential.representation.geometry(g.edge_index, Potential.edge_vectors(g).detach())
    extra = (geometry,) if isinstance(geometry, torch.Tensor) else ()
    sizes = [g.numbers.shape[0], g.edge_index.shape[1], *(x.shape[0] for x in extra)]
    if g.num_graphs != 1 or min(sizes) < MIN_SIZE:
        return None
    return (g.numbers, g.positions, g.cell, g.batch, g.n_atoms, g.edge_index, g.shifts, g.fidelity) + extra


def scriptable(gm):
    """make_fx graphs call overloads (aten.select.int) and sym_size; TorchScript wants the packets."""
    gm.graph.eliminate_dead_code()
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            sym_size = node.target is torch.ops.aten.sym_size.int
            node.target = torch.ops.aten.size if sym_size else node.target.overloadpacket
    gm.recompile()
    return gm
