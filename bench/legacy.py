"""Model modules from older revisions or variant files, for the A/B scripts, under today's Potential.

A source is a git revision (its src/multifi/models/<name>.py), `REV:PATH` (any file at a revision, e.g.
a hand-made variant kept in the history: `b697116:bench/variants/painn_v1_index_select.py`) or a file path.

Since the second version a representation has `geometry(edge_index, edge_vec)` (precomputed, non-differentiable
bookkeeping such as M3GNet's triplet lists) and `forward(..., condition, geometry)`. Older revisions
lack both; `current(rep)` wraps such a module so that Potential can call it (it then makes its own
geometry inside forward, as it always did). Older revisions' `from_config` took the dict of the model
settings, today's takes the typed ModelConfig: `from_config(cls, cfg)` passes what `cls` expects.
"""

from __future__ import annotations

import inspect
import subprocess
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str, name: str) -> types.ModuleType:
    """src/multifi/models/<name>.py at a git revision, a file at a revision (`REV:PATH`) or a file path, as a module."""
    if Path(rev).is_file():
        src = Path(rev).read_text()
    else:
        obj = rev if ":" in rev else f"{rev}:src/multifi/models/{name}.py"
        src = subprocess.run(["git", "show", obj], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    mod = types.ModuleType(f"{name}_variant")
    exec(compile(src, f"{name}@{rev}", "exec"), mod.__dict__)
    fused = getattr(mod, "fused", None)
    if fused is not None and not hasattr(fused, "first_order_only_active"):
        # revisions between 0fe91a9 and 6c6c7f2 asked whether a first-order-only context (gone since: the kernels
        # are differentiable to any order) was active; outside one, as in every A/B script, it is not
        mod.fused = types.SimpleNamespace(**vars(fused), first_order_only_active=lambda: False)
    if fused is not None and "EdgePlan(self.ij, self.k, self.n_bonds, n_atoms)" in src:
        # M3GNet between 64bad94 and ba6e8fb summed over triplets on the kernels with bonds receiving from atoms
        mod.fused = types.SimpleNamespace(**{**vars(mod.fused), "EdgePlan": _TwoSetPlan})
    return mod


class _TwoSetPlan:
    """fused.EdgePlan with centres and neighbours from two sets (n_atoms centre rows, n_neighbors neighbour rows),
    as the library had it from 64bad94 to ba6e8fb."""

    def __init__(self, center, neighbor, n_atoms: int, n_neighbors: int):
        from multifi.nn.fused import Rows

        self.center, self.neighbor = center.contiguous(), neighbor.contiguous()
        self.by_center, self.by_neighbor = Rows(self.center, n_atoms), Rows(self.neighbor, n_neighbors)


def from_config(cls, cfg):
    """cls.from_config(cfg) for a ModelConfig `cfg`: its dict of fields when cls's from_config is annotated
    with dict (revisions before the typed config was passed through), else cfg itself."""
    (param,) = inspect.signature(cls.from_config).parameters.values()
    wants_dict = param.annotation is dict or str(param.annotation).startswith("dict")
    return cls.from_config(cfg.model_dump() if wants_dict else cfg)


class LegacyRepresentation(torch.nn.Module):
    def __init__(self, rep: torch.nn.Module):
        super().__init__()
        self.rep, self.features, self.cutoff = rep, rep.features, rep.cutoff

    def geometry(self, edge_index, edge_vec):
        return None

    def forward(self, numbers, edge_index, edge_vec, condition=None, geometry=None):
        return self.rep(numbers, edge_index, edge_vec, condition)


def current(rep: torch.nn.Module) -> torch.nn.Module:
    """rep itself when it has today's interface, else wrapped (weights must be loaded before)."""
    return rep if hasattr(rep, "geometry") else LegacyRepresentation(rep)
