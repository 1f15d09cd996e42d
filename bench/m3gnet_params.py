"""Parameter count (and speed) of multifi's M3GNet potential next to matgl's, at matgl's defaults.

    python bench/m3gnet_params.py [--matgl-python /tmp/matgl-venv/bin/python] [--time] [--threads 1]

Counts multifi's potential in this interpreter and matgl's M3GNet (is_intensive=False, i.e. a PES
model) by running this script again under the matgl interpreter (`--side matgl`, HOME pointed at a
scratch folder because importing matgl writes ~/.cache/matgl). Either side alone:

    python bench/m3gnet_params.py --side multifi
    HOME=/tmp/mghome /tmp/matgl-venv/bin/python bench/m3gnet_params.py --side matgl

Settings: 64 features, 3 blocks, cutoff 5 Å, three-body cutoff 4 Å, max_n = max_l = 3. multifi uses
n_rbf = max_n·max_l = 9 two-body functions, the width of matgl's default (non-smooth) two-body basis,
so every bond/atom block has the same shapes; fidelity conditioning 'readout' with a 4-dim vector.

With --time: forward + backward on the first 32 structures of the shared PBE solids (1-4 atom
cells), median of --repeats timed calls after warm-up, for (a) energy + forces, (b) energy + forces
+ stress, (c) a training step (forces and stress with create_graph, loss backward). Graph building
is not timed (multifi: neighbour list in the collate; matgl: its line graph is built inside forward,
as multifi's triplets are).

Measured (November 2026, shared 2-core machine under load ≈ 5, torch 2.13 CPU, 1 thread, median of 7):
  parameters  multifi 267,236 · matgl 4.1.2 288,157 (ratio 0.927). Blocks are identical in shape
              (three-body 5,211, graph convolutions 251,520); the gap is the readout: matgl's gated
              64-64-64-1 MLP (25,090) vs multifi's EnergyHead 68-32-1 MLP (2,241); embeddings
              7,616 (119 elements) + 640 vs 6,336 (89 elements, incl. the bond embedding).
  32 solids   85 atoms, 3,390 edges, 36,766 triplets
              multifi: energy+forces 152 ms, +stress 153 ms, training step 540-590 ms
              matgl:   energy+forces 202 ms, +stress 200 ms, training step 710-730 ms
              (2 threads under the same load: multifi 178 / 181 / 680 ms, matgl 238 / 249 / 899 ms)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import median_time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SOLIDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "solids" / "PBE.jsonl.gz"
SETTINGS = {"features": 64, "interactions": 3, "cutoff": 5.0, "threebody_cutoff": 4.0, "max_n": 3, "max_l": 3}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def records(n: int) -> list[dict]:
    with gzip.open(SOLIDS, "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


# ---------------------------------------------------------------------------------------------- multifi
def multifi_side(args) -> dict:
    import torch

    from multifi.models.registry import build_potential

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = {
        "backbone": "m3gnet",
        **SETTINGS,
        "n_rbf": SETTINGS["max_n"] * SETTINGS["max_l"],
        "fidelity_embedding": {"dim": 4, "inject": "readout"},
    }
    pot = build_potential(model, ["PBE", "R2SCAN"])
    parts = {k: count(m) for k, m in pot.representation.named_children() if count(m)}
    parts.update({"head": count(pot.head), "fidelity conditioning": count(pot.conditioning)})
    out = {"version": "multifi", "total": count(pot), "parts": parts}
    if args.time:
        out["time"] = multifi_times(pot, args)
    return out


def multifi_times(pot, args) -> dict:
    import numpy as np
    import torch

    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import NeighborCache
    from multifi.data.readers.matpes import read_matpes
    from multifi.data.stats import fit_references
    from multifi.train.loss import MultiFidelityLoss

    ds = read_matpes(SOLIDS, stress_order="vasp").subset(np.arange(args.batch_size))
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    refs = fit_references(ds, pairs)  # as `multifi train` fits and sets them
    pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    g = GraphCollator(ds, NeighborCache(ds, pot.cutoff, progress=False))(pairs)
    loss_fn = MultiFidelityLoss(energy=1.0, forces=1.0, stress=0.1)
    opt = torch.optim.Adam(pot.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        loss, _ = loss_fn(pot(g, forces=True, stress=True, create_graph=True), g)
        loss.backward()
        opt.step()

    i, j = g.edge_index
    n_triplets = _triplet_count(pot, g)
    pot.eval()
    out = {
        "atoms": int(g.n_atoms.sum()),
        "edges": int(i.numel()),
        "triplets": n_triplets,
        "energy_forces_s": median_time(lambda: pot(g, forces=True), args.repeats, warmup=2),
        "energy_forces_stress_s": median_time(lambda: pot(g, forces=True, stress=True), args.repeats, warmup=2),
    }
    pot.train()
    out["train_step_s"] = median_time(step, args.repeats, warmup=2)
    return out


def _triplet_count(pot, g) -> int:
    """Triplets: ordered pairs of distinct bonds within the three-body cutoff sharing their centre atom, Σ d(d−1)
    over the atoms' bond counts d (the bonds as the model's geometry() selects them)."""
    import torch

    i, j = g.edge_index
    vec = g.positions[j] - g.positions[i] + torch.einsum("ea,eab->eb", g.shifts, g.cell[g.batch[i]])
    bonds = pot.representation.geometry(g.edge_index, vec)
    d = torch.bincount(i[bonds], minlength=g.positions.shape[0])
    return int((d * (d - 1)).sum())


# ---------------------------------------------------------------------------------------------- matgl
def matgl_side(args) -> dict:
    import torch
    from matgl.apps.pes import Potential
    from matgl.models import M3GNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = M3GNet(
        is_intensive=False,
        dim_node_embedding=SETTINGS["features"],
        dim_edge_embedding=SETTINGS["features"],
        units=SETTINGS["features"],
        nblocks=SETTINGS["interactions"],
        cutoff=SETTINGS["cutoff"],
        threebody_cutoff=SETTINGS["threebody_cutoff"],
        max_n=SETTINGS["max_n"],
        max_l=SETTINGS["max_l"],
    )
    import matgl

    out = {
        "version": matgl.__version__,
        "total": count(model),
        "parts": {k: count(m) for k, m in model.named_children() if count(m)},
    }
    if args.time:
        out["time"] = matgl_times(model, Potential, args)
    return out


def matgl_times(model, Potential, args) -> dict:
    import torch
    from matgl.ext.pymatgen import Structure2Graph
    from pymatgen.core import Structure
    from torch_geometric.data import Batch

    conv = Structure2Graph(element_types=model.element_types, cutoff=model.cutoff)
    graphs, lats = [], []
    for rec in records(args.batch_size):
        g, lat, _ = conv.get_graph(Structure.from_dict(rec["structure"]))
        graphs.append(g)
        lats.append(torch.as_tensor(lat, dtype=torch.float32).reshape(1, 3, 3))
    g, lat = Batch.from_data_list(graphs), torch.cat(lats)
    ef = Potential(model=model, calc_forces=True, calc_stresses=False).eval()
    efs = Potential(model=model, calc_forces=True, calc_stresses=True).eval()
    train = Potential(model=model, calc_forces=True, calc_stresses=True).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        e, f, s, _ = train(g, lat)
        loss = (e**2).mean() + (f**2).mean() + 0.1 * (s**2).mean()
        loss.backward()
        opt.step()

    return {
        "atoms": int(g.num_nodes),
        "edges": int(g.edge_index.shape[1]),
        "energy_forces_s": median_time(lambda: ef(g, lat), args.repeats, warmup=2),
        "energy_forces_stress_s": median_time(lambda: efs(g, lat), args.repeats, warmup=2),
        "train_step_s": median_time(step, args.repeats, warmup=2),
    }


# ---------------------------------------------------------------------------------------------- driver
def run_matgl(args) -> dict | None:
    if not args.matgl_python or not Path(args.matgl_python).exists():
        return None
    cmd = [
        args.matgl_python,
        __file__,
        "--side",
        "matgl",
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--batch-size",
        str(args.batch_size),
    ] + (["--time"] if args.time else [])
    with tempfile.TemporaryDirectory() as home:
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": home})
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=["both", "multifi", "matgl"], default="both")
    ap.add_argument("--matgl-python", default="/tmp/matgl-venv/bin/python")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if args.side == "matgl":
        print(json.dumps(matgl_side(args)))
        return
    if args.side == "multifi":
        print(json.dumps(multifi_side(args)))
        return
    ours, theirs = multifi_side(args), run_matgl(args)
    print(f"settings: {SETTINGS}, threads {args.threads}")
    describe = lambda side: ", ".join(f"{k} {v:,}" for k, v in side["parts"].items())  # noqa: E731
    print(f"multifi M3GNet potential : {ours['total']:>8,d} parameters ({describe(ours)})")
    if theirs is None:
        print(f"matgl: not available (pass --matgl-python; tried {args.matgl_python})")
    else:
        print(f"matgl {theirs['version']} M3GNet (PES): {theirs['total']:>8,d} parameters ({describe(theirs)})")
        print(f"ratio multifi / matgl: {ours['total'] / theirs['total']:.3f}")
    for name, side in (("multifi", ours), ("matgl", theirs)):
        if side is None or "time" not in side:
            continue
        t = side["time"]
        print(
            f"{name}: batch of {args.batch_size} solids, {t['atoms']} atoms, {t['edges']} edges"
            + (f", {t['triplets']} triplets" if "triplets" in t else "")
            + f"; energy+forces {1e3 * t['energy_forces_s']:.0f} ms, +stress "
            f"{1e3 * t['energy_forces_stress_s']:.0f} ms, training step {1e3 * t['train_step_s']:.0f} ms"
        )


if __name__ == "__main__":
    main()
