"""TorchScript (what `multifi deploy` writes) vs torch.export + AOTInductor for the deployed model, on CPU.

Both run the same make_fx graph of the energy and its edge-vector gradient (forces, virial) for a 64-atom
Si cell given with explicit ghost atoms, as LAMMPS gives it; times are medians of repeated calls.
    python bench/deploy_formats.py [--backbone m3gnet|painn] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import median_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="m3gnet", choices=("m3gnet", "painn"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from conftest import tiny_m3gnet
    from test_deploy import si64_sheared
    from torch.fx.experimental.proxy_tensor import make_fx

    from multifi.deploy import _scriptable, _within_hops, build_deployed, lammps_style_inputs, metadata
    from multifi.models.m3gnet import threebody_bonds
    from multifi.models.registry import load_potential
    from multifi.models.response import EnergyForcesVirial

    pot = (
        tiny_m3gnet()
        if args.backbone == "m3gnet"
        else load_potential(Path(__file__).parents[1] / "tests/data/solids_painn.pt")
    )
    fid = pot.fidelities.names[-1]
    meta = metadata(pot, fid, torch.float64)
    atoms = si64_sheared()
    inp = lammps_style_inputs(atoms, meta["ghost_cutoff"], meta["cutoff"])
    inp.pop("owner")
    script = build_deployed(pot, fid)
    t_script = median_time(lambda: script(**inp), args.repeats, warmup=3)
    ref = script(**inp)

    # AOTInductor: the same core (energy, forces, virial) exported with dynamic sizes and compiled ahead of time
    pot64 = pot.double().eval()
    for p in pot64.parameters():
        p.requires_grad_(False)
    core = EnergyForcesVirial(pot64, pot.fidelity_index(fid))
    ei = inp["edge_index"]  # pruned as the deployed module does: cutoff, then hops from the local atoms
    n = inp["positions"].shape[0]
    ei = ei[:, (inp["positions"][ei[1]] - inp["positions"][ei[0]]).norm(dim=-1) < meta["cutoff"]]
    ei = ei[:, _within_hops(ei, n, inp["nlocal"], meta["interactions"] - 1)[ei[0]]]
    vec = inp["positions"][ei[1]] - inp["positions"][ei[0]]
    threebody = meta["threebody_cutoff"]
    if threebody > 0:
        bonds = threebody_bonds(torch.linalg.norm(vec, dim=-1), threebody)
        fn = core
    else:
        bonds = torch.zeros(0, dtype=torch.long)
        fn = lambda s, p, e, v, w, b: core(s, p, e, v, w, None)  # noqa: E731
    weight = (torch.arange(n) < inp["nlocal"]).double()
    example = (inp["species"], inp["positions"], ei, torch.zeros_like(vec), weight, bonds)
    gm = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    t0 = time.perf_counter()
    N, E = torch.export.Dim("N", min=2), torch.export.Dim("E", min=2)
    B = torch.export.Dim("B", min=2)
    dyn = (
        {0: N},
        {0: N},
        {1: E},
        {0: E},
        {0: N},
        {0: B} if threebody else None,
    )
    ep = torch.export.export(gm, example, dynamic_shapes=dyn, strict=False)
    scripted = torch.jit.script(_scriptable(gm))
    t_core = median_time(lambda: scripted(*example), args.repeats, warmup=3)
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=f"/tmp/multifi_aoti_{args.backbone}.pt2")
    compile_s = time.perf_counter() - t0
    aoti = torch._inductor.aoti_load_package(pkg)
    out = aoti(*example)
    err = max(abs(float(out[0] @ example[4]) - float(ref["energy"])), (out[2] - ref["virial"]).abs().max().item())
    t_aoti = median_time(lambda: aoti(*example), args.repeats, warmup=3)
    print(
        f"{args.backbone}: {len(atoms)} local + {n - len(atoms)} ghost atoms, {ei.shape[1]} pairs; "
        f"deployed file (TorchScript) {t_script * 1e3:.1f} ms/call; the same graph: TorchScript "
        f"{t_core * 1e3:.1f} ms/call, AOTInductor {t_aoti * 1e3:.1f} ms/call "
        f"(compiled in {compile_s:.0f} s; max |ΔE|, |ΔW| {err:.1e} eV)"
    )


if __name__ == "__main__":
    main()
