"""The ahead-of-time compiled calculator (Calculator(aot=True)) against the eager one, in one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/aot_calculator.py [--features 128] [--steps 300]

PaiNN (random weights, 2 fidelities) on ethanol (9 atoms): the time to build the package (empty cache:
a temporary MULTIFI_CACHE), then forces of slightly moved geometries through both calculators, alternating
call by call; thread CPU time per call (other processes' time slices do not count), median and the
median of per-call ratios, and the largest force difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--interactions", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    os.environ["MULTIFI_CACHE"] = tempfile.mkdtemp()
    import numpy as np
    import torch
    from ase.build import molecule

    import multifi
    from multifi.models.registry import build_potential

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pot = build_potential(
        {"backbone": "painn", "features": args.features, "interactions": args.interactions}, ["lo", "hi"]
    )
    with torch.no_grad():
        pot.head.fitted.fill_(True)
    atoms = molecule("CH3CH2OH")
    eager = multifi.Calculator(pot, fidelity="hi")
    aot = multifi.Calculator(pot, fidelity="hi", aot=True)
    t0 = time.perf_counter()
    aot.get_property("forces", atoms)
    build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    cpu = {"eager": [], "aot": []}
    diff = 0.0
    for k in range(args.steps):
        atoms.positions += rng.normal(0, 0.002, atoms.positions.shape)
        forces = {}
        order = (("eager", eager), ("aot", aot)) if k % 2 else (("aot", aot), ("eager", eager))
        for name, calc in order:
            t = time.thread_time()
            forces[name] = calc.get_property("forces", atoms)
            cpu[name].append(time.thread_time() - t)
        diff = max(diff, float(np.abs(forces["eager"] - forces["aot"]).max()))
    ratios = [a / b for a, b in zip(cpu["eager"][10:], cpu["aot"][10:])]
    print(
        f"PaiNN {args.features}x{args.interactions}, ethanol: build (empty cache) {build:.0f} s wall; "
        f"thread CPU per force call eager {1e3 * statistics.median(cpu['eager'][10:]):.2f} ms, "
        f"aot {1e3 * statistics.median(cpu['aot'][10:]):.2f} ms; median of per-call ratios {statistics.median(ratios):.2f} "
        f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}..{statistics.quantiles(ratios, n=4)[2]:.2f}); "
        f"max |ΔF| {diff:.1e} eV/Å; load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
