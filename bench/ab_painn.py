"""In-process A/B of two PaiNN implementations on identical QM9 batches, alternating step by step.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ab_painn.py [--base 7c91c1d] [--threads 1] [--steps 40]
        [--mode train|forces|infer] [--features 128] [--interactions 3] [--a-no-onednn]

A = models/painn.py as of git revision --base (default: the unoptimised original), B = the working
tree. Both get the same weights; each step runs A then B (then B then A on the next step) on the same
collated batch: train = forward + energy loss + backward; forces = forward with forces
(create_graph) + energy/force loss + backward (double backward); infer = forward under no_grad.
Prints median step times, the median of per-step ratios A/B (= speed-up of B), and the largest
output difference (energy) between A and B. On a shared, noisy machine only the ratio is meaningful.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="7c91c1d")
    ap.add_argument(
        "--tree", default=None, help="B = this revision, REV:PATH or file instead of the work tree (bench/legacy.py)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--mode",
        choices=["train", "forces", "infer", "calc"],
        default="train",
        help="calc: one molecule per step, frozen parameters, forces by one backward (the ASE calculator)",
    )
    ap.add_argument("--compile-b", action="store_true", help="B is the compiled potential (model.compile)")
    ap.add_argument(
        "--a-no-onednn",
        action="store_true",
        help="A computes its float32 products with torch's default BLAS (multifi.nn.onednn.ONEDNN off)",
    )
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--interactions", type=int, default=3)
    args = ap.parse_args()
    import copy

    import torch
    from legacy import current, module_at
    from profile_painn import setup

    import multifi.nn.onednn as lin

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pot_b, collate, batches, loss_fn = setup(
        batch=1 if args.mode == "calc" else 32, features=args.features, interactions=args.interactions
    )
    base = module_at(args.base, "painn")
    pot_a = copy.deepcopy(pot_b)
    rep = pot_b.representation
    pot_a.representation = base.PaiNN(rep.features, len(rep.messages), rep.cutoff, rep.rbf.freq.numel())
    pot_a.representation.load_state_dict(rep.state_dict())
    pot_a.representation = current(pot_a.representation)
    if args.tree:
        pot_b.representation = module_at(args.tree, "painn").PaiNN(
            rep.features, len(rep.messages), rep.cutoff, rep.rbf.freq.numel()
        )
        pot_b.representation.load_state_dict(rep.state_dict())
        pot_b.representation = current(pot_b.representation)

    if args.mode == "calc":
        pot_a.requires_grad_(False)
        pot_b.requires_grad_(False)

    def step(pot, g):
        if args.mode == "calc":
            return pot(g, forces=True)["forces"]
        if args.mode == "infer":
            with torch.no_grad():
                return pot(g)["energy"]
        if args.mode == "forces":
            out = pot(g, forces=True, create_graph=True)
            loss = ((out["energy"] - g.energy) / g.n_atoms).pow(2).mean().float() + out["forces"].pow(2).mean()
        else:
            out = pot(g)
            loss, _ = loss_fn(out, g)
        pot.zero_grad(set_to_none=True)
        loss.backward()
        return out["energy"].detach()

    if args.compile_b:
        pot_b.use_compile = True
        t = time.perf_counter()
        step(pot_b, collate(batches(1)[0]))
        step(pot_b, collate(batches(1)[0]))
        print(f"compile (first two B steps): {time.perf_counter() - t:.1f} s")
    graphs = [collate(p) for p in batches(args.steps + 3)]
    ta, tb, diff = [], [], 0.0
    ca, cb = [], []  # thread CPU times (not inflated by other processes taking the core)
    onednn = lin.ONEDNN
    for k, g in enumerate(graphs):
        order = [(pot_a, ta, ca), (pot_b, tb, cb)] if k % 2 == 0 else [(pot_b, tb, cb), (pot_a, ta, ca)]
        res = {}
        for pot, times, cpu in order:
            lin.ONEDNN = onednn and not (pot is pot_a and args.a_no_onednn)
            c, t = time.thread_time(), time.perf_counter()
            res[id(pot)] = step(pot, g)
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        lin.ONEDNN = onednn
        diff = max(diff, float((res[id(pot_a)] - res[id(pot_b)]).abs().max()))  # energy (forces in calc mode)
    ta, tb, ca, cb = ta[3:], tb[3:], ca[3:], cb[3:]
    ratios = [a / b for a, b in zip(ta, tb)]
    cratios = [a / b for a, b in zip(ca, cb)]
    print(f"mode={args.mode} threads={args.threads} steps={len(ta)} A={args.base} B={args.tree or 'work tree'}")
    nb = 1 if args.mode == "calc" else 32
    print(
        f"A (base)   median {1000 * statistics.median(ta):8.2f} ms/step  {nb / statistics.median(ta):7.1f} structures/s"
    )
    print(
        f"B (tree)   median {1000 * statistics.median(tb):8.2f} ms/step  {nb / statistics.median(tb):7.1f} structures/s"
    )
    print(
        f"speed-up B vs A: median of per-step ratios {statistics.median(ratios):.3f} "
        f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}..{statistics.quantiles(ratios, n=4)[2]:.3f}); "
        f"max |Δ| = {diff:.2e} ({'forces eV/Å' if args.mode == 'calc' else 'energy eV'})"
    )
    print(
        f"thread CPU time: A {1000 * statistics.median(ca):.2f} ms, B {1000 * statistics.median(cb):.2f} ms, "
        f"median of per-step ratios {statistics.median(cratios):.3f} (quartiles "
        f"{statistics.quantiles(cratios, n=4)[0]:.3f}..{statistics.quantiles(cratios, n=4)[2]:.3f}); "
        f"load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
