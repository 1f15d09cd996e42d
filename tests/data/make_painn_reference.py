"""Writes tests/data/painn_reference.json (or m3gnet_reference.json): model outputs on a fixed input
with fixed weights.

    python tests/data/make_painn_reference.py [--backbone m3gnet]   (run once, BEFORE performance changes;
                                                                     see tests/test_model_regression.py)

The PaiNN reference was recorded at commit 7c91c1d (unoptimised PaiNN), the M3GNet one at c272e06
(before the edge-gradient forces, model.compile and the triplet split), each with this
script and PYTHONPATH pointing at that revision's src/, so later optimisations are checked against
the implementation before them.

Input: three rattled molecules (QM9-like) and a sheared, rattled periodic NaCl cell, two fidelities,
conditioning mode "both". Weights are set deterministically by parameter *name* (not by module
construction order), so the reference survives a re-ordering of module construction. Outputs: energy
[B], forces [N,3], stress of the periodic cell, in float32 and float64, and the gradients of an
energy+forces training loss (double backward) w.r.t. every parameter tensor, as sums and norms.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MODEL = {
    "backbone": "painn",
    "features": 128,
    "interactions": 3,
    "cutoff": 5.0,
    "n_rbf": 20,
    "fidelity_embedding": {"dim": 16, "inject": "both"},
}
M3GNET = {
    "backbone": "m3gnet",
    "features": 64,
    "interactions": 3,
    "cutoff": 5.0,
    "threebody_cutoff": 4.0,
    "n_rbf": 9,
    "max_n": 3,
    "max_l": 3,
    "fidelity_embedding": {"dim": 4, "inject": "both"},
}
MODELS = {"painn": MODEL, "m3gnet": M3GNET}
FIDELITIES = ["lo", "hi"]


def make_input() -> list:
    from ase.build import bulk, molecule

    frames = []
    for k, name in enumerate(("CH3CH2OH", "C6H6", "CH3COOH")):
        a = molecule(name)
        a.rattle(0.05, seed=k)
        frames.append(a)
    cell = bulk("NaCl", "rocksalt", a=4.6) * (1, 1, 2)
    shear = np.eye(3) + np.array([[0.02, 0.03, 0.0], [0.0, -0.01, 0.04], [0.01, 0.0, 0.03]])
    cell.set_cell(cell.cell.array @ shear, scale_atoms=True)
    cell.rattle(0.08, seed=3)
    frames.append(cell)
    return frames


def frames_to_json(frames) -> list[dict]:
    return [
        {
            "numbers": a.numbers.tolist(),
            "positions": a.positions.tolist(),
            "cell": a.cell.array.tolist(),
            "pbc": a.pbc.tolist(),
        }
        for a in frames
    ]


def frames_from_json(rows) -> list:
    from ase import Atoms

    return [Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=r["pbc"]) for r in rows]


def build(dtype=torch.float32, model: dict = MODEL):
    """The potential with weights fixed by parameter name."""
    from multifi.models.registry import build_potential

    pot = build_potential(model, FIDELITIES)
    with torch.no_grad():
        for name, p in sorted(pot.named_parameters()):
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            bound = np.sqrt(3.0 / p.shape[-1]) if p.dim() > 1 else 0.1
            p.copy_(torch.from_numpy(rng.uniform(-bound, bound, tuple(p.shape))))
        ref = np.zeros((119, len(FIDELITIES)))
        for z, e in {1: -0.5, 6: -1.5, 7: -1.2, 8: -0.9, 11: -0.7, 17: -0.3}.items():  # small: float32-exact energies
            ref[z] = [e, 1.01 * e]
        pot.head.set_baseline(ref, np.array([2.0, 3.0]))
    return pot.to(dtype)


def evaluate(pot, frames, dtype) -> dict:
    """Energy, forces and stress (eval), and parameter gradients of an energy+forces loss (training)."""
    from multifi.data.batch import graph_from_atoms

    g = graph_from_atoms(frames, pot.cutoff, fidelity=[0, 1, 1, 0], dtype=dtype)
    out = pot(g, forces=True, stress=True)
    # training: loss on energy and forces needs the double backward through the forces
    pot.zero_grad(set_to_none=True)
    o = pot(g, forces=True, create_graph=True)
    loss = ((o["energy"] / g.n_atoms).float() ** 2).mean() + (o["forces"] ** 2).mean()
    loss.backward()
    grads = {
        n: [float(p.grad.double().sum()), float(p.grad.double().norm())]
        for n, p in sorted(pot.named_parameters())
        if p.grad is not None
    }
    return {
        "energy": out["energy"].double().tolist(),
        "forces": out["forces"].double().tolist(),
        "stress": out["stress"][3].double().tolist(),
        "loss": loss.item(),
        "grads": grads,
    }


def main() -> None:
    backbone = sys.argv[sys.argv.index("--backbone") + 1] if "--backbone" in sys.argv else "painn"
    model = MODELS[backbone]
    torch.set_num_threads(1)
    frames = make_input()
    result = {
        "model": model,
        "fidelities": FIDELITIES,
        "fidelity_of_structure": [0, 1, 1, 0],
        "input": frames_to_json(frames),
        "torch": torch.__version__,
    }
    frames = frames_from_json(result["input"])
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        result[name] = evaluate(build(dtype, model), frames, dtype)
    out = HERE / f"{backbone}_reference.json"
    out.write_text(json.dumps(result, indent=0))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
