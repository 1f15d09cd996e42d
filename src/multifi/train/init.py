"""Start a potential from the weights of another one (pre-training → fine-tuning, `train.init_from`).

Weights shared by all fidelities (representation, readout MLP, input projection) are copied and must
have the same shapes (same model settings). Weights that belong to one fidelity — its embedding
vector, its reference energies and scale, its own head in `heads` mode — are copied by fidelity
*name*: each fidelity of the new model starts from the fidelity of the same name in the old one, or
from the one `fidelity_map` names (e.g. {"B3LYP/6-31G(2df,p)": "GFN2-xTB"}). Fidelities with no
counterpart keep their fresh initialisation. Reference energies and scales are refitted on the new
training data afterwards by the run driver, so copying them only matters for their initial value.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from multifi.data.fidelity import FidelityTable
from multifi.errors import MultifiError

log = logging.getLogger("multifi")

# parameter/buffer name → axis indexed by fidelity
FIDELITY_AXIS = {
    "conditioning.table.weight": 0,
    "head.ref": 1,
    "head.scale": 0,
    "head.fitted": 1,
    "head.null": 1,
    "head.spread": 0,
    "head.atomic": 0,
    "head.atomic_shift": 0,
    "head.given": 1,
}
FIXED = {"conditioning.onehot"}  # depends only on the number of fidelities; never copied
_HEAD = re.compile(r"^head\.mlps\.(\d+)\.(.+)$")


def init_from_potential(potential, path: str | Path, fidelity_map: dict[str, str] | None = None) -> dict:
    """Copy weights of the potential saved at `path` into `potential` (in place); returns a summary."""
    from multifi.models.registry import load_potential

    source = load_potential(path)
    where = f"train.init_from {path}"
    if source.config.backbone != potential.config.backbone:
        raise MultifiError(
            f"{where}: backbone {source.config.backbone!r} differs from this run's {potential.config.backbone!r}"
        )
    pairs = fidelity_pairs(potential.fidelities, source.fidelities, fidelity_map or {}, where)
    src, new = source.state_dict(), {}
    missing, copied = [], []
    for key, target in potential.state_dict().items():
        if key in FIXED:
            continue
        value = _initial_value(key, target, src, pairs, potential.head.heads, source.head.heads, where)
        if value is None:
            missing.append(key)
        else:
            new[key] = value
            copied.append(key)
    potential.load_state_dict(new, strict=False)
    names = {potential.fidelities.names[t]: source.fidelities.names[s] for t, s in pairs}
    log.info(
        "initialised %d tensors from %s (fidelities %s)%s",
        len(copied),
        path,
        ", ".join(f"{t} ← {s}" for t, s in names.items()) or "none mapped",
        f"; fresh: {', '.join(missing)}" if missing else "",
    )
    return {"copied": copied, "fresh": missing, "fidelities": names}


def fidelity_pairs(target: FidelityTable, source: FidelityTable, fidelity_map: dict[str, str], where: str):
    """[(target index, source index)] for each target fidelity that has a counterpart in the source."""
    for t, s in fidelity_map.items():
        target.index(t, f"{where}: init_fidelities")
        source.index(s, f"{where}: init_fidelities[{t!r}] (fidelities of the checkpoint)")
    return [
        (k, source.index(fidelity_map.get(name, name)))
        for k, name in enumerate(target)
        if fidelity_map.get(name, name) in source
    ]


def _initial_value(key, target, src, pairs, target_heads, source_heads, where):
    """The tensor `key` should start from, or None when the source has nothing for it."""
    m = _HEAD.match(key)
    if m and (target_heads or source_heads):
        return _head_value(int(m.group(1)), m.group(2), target, src, pairs, target_heads, source_heads, where)
    if key not in src:
        return None
    value = src[key]
    axis = FIDELITY_AXIS.get(key)
    if axis is None:
        if value.shape != target.shape:
            raise MultifiError(
                f"{where}: {key} has shape {tuple(value.shape)} there and {tuple(target.shape)} here; "
                "the model settings (features, interactions, n_rbf, embedding dim, inject) must match"
            )
        return value.to(target.dtype)
    other = lambda shape: [d for i, d in enumerate(shape) if i != axis]  # noqa: E731 - all but the fidelity axis
    if value.dim() != target.dim() or other(value.shape) != other(target.shape):
        raise MultifiError(f"{where}: {key} has shape {tuple(value.shape)} there and {tuple(target.shape)} here")
    out = target.clone()
    for t, s in pairs:
        out.select(axis, t).copy_(value.select(axis, s))
    return out


def _head_value(k, rest, target, src, pairs, target_heads, source_heads, where):
    """Per-fidelity heads: head k of the new model starts from the head of its mapped fidelity."""
    if target_heads:
        s = dict(pairs).get(k)
        if s is None:
            return None
        key = f"head.mlps.{s if source_heads else 0}.{rest}"
    else:  # one shared head from a model with one head per fidelity: only if that choice is unambiguous
        if len(pairs) != 1:
            raise MultifiError(
                f"{where}: cannot start a shared readout from a model with one head per fidelity "
                "unless exactly one fidelity is mapped (set train.init_fidelities)"
            )
        key = f"head.mlps.{pairs[0][1]}.{rest}"
    if key not in src:
        return None
    value = src[key]
    if value.shape != target.shape:
        raise MultifiError(f"{where}: {key} has shape {tuple(value.shape)} there and {tuple(target.shape)} here")
    return value.to(target.dtype)
