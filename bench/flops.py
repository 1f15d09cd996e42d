"""FLOPs of one PaiNN or M3GNet training step (torch.utils.flop_counter) against this CPU's measured sgemm rate.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/flops.py [--features 64] [--interactions 3]
        [--steps 20] [--forces]
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/flops.py --model m3gnet [--steps 20] [--compile]
        [--gemm-share] [--thin]

PaiNN: batches of 32 of the benchmark's QM9 molecules, energy loss (or energy + forces). M3GNet: 64 features,
3 blocks (the harness's model), batches of 32 PBE solids, energy + forces + stress loss (forces and stress by
autograd with create_graph, so backward is a double backward) — the training step of the solids experiments.

Counts the matrix-product FLOPs (mm/addmm/bmm; flop_counter ignores elementwise work) of forward + loss +
backward on batches of 32 of the benchmark's QM9 molecules, with the plain dense path (oneDNN and the
sparse direction sum off: the same arithmetic; their kernels are not counted by flop_counter). Then
times the step as training runs it (median thread CPU time over --steps) and a 1024² float32 sgemm
(torch.mm = MKL, and oneDNN), and prints FLOPs per step / step time as a fraction of the sgemm rate.

--gemm-share (M3GNet): the share of the step's CPU time spent in matrix products (torch.profiler self CPU time
of aten::mm/addmm/bmm over all operators and compiled graphs) and their rate (counted FLOPs / that time).
--thin: rates of the products that dominate M3GNet's step, [M, 64] × [64, 64] and its weight gradient
[64, M] × [M, 64] (M = edges of a batch), through torch.mm (MKL), oneDNN and inductor's max-autotune
(its C++ GEMM template or ATen, whichever it picks), thread CPU time, median of 200 calls.
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


def sgemm_rate(n: int = 1024, reps: int = 30) -> dict:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {}
    for name, fn in (
        ("torch.mm (MKL)", lambda: a @ b),
        ("oneDNN", lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")),
    ):
        ts = []
        for _ in range(reps):
            t = time.thread_time()
            fn()
            ts.append(time.thread_time() - t)
        out[name] = 2 * n**3 / min(ts) / 1e9  # best of reps: the machine is shared
    return out


def counted_flops(fn) -> int:
    """Matrix-product FLOPs of fn() by torch's flop formulas (torch.utils.flop_counter.flop_registry).

    FlopCounterMode itself also tracks modules with backward hooks on their inputs, which torch rejects
    when autograd.grad differentiates by a leaf passed to a module (the edge vectors, for forces)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count() as count:
        fn()
    return count.total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--interactions", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--forces", action="store_true")
    ap.add_argument("--model", choices=["painn", "m3gnet"], default="painn")
    ap.add_argument("--compile", action="store_true", help="M3GNet: time the compiled step (model.compile)")
    ap.add_argument("--gemm-share", action="store_true", help="M3GNet: share of the step in matrix products")
    ap.add_argument("--thin", action="store_true", help="rates of M3GNet's [M,64]x[64,64] products by backend")
    args = ap.parse_args()
    if args.thin:
        return thin_gemms()
    if args.model == "m3gnet" and args.gemm_share:
        return gemm_share(args.steps, args.compile)
    if args.model == "m3gnet":
        what = f"M3GNet 64x3 energy+force+stress training step, batch 32{', compiled' if args.compile else ''}"
        return report(what, *m3gnet_step(args.steps, args.compile))
    import torch
    from profile_painn import setup, train_step

    import multifi.nn.onednn as dnn
    from multifi.models.painn import PaiNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pot, collate, batches, loss_fn = setup(features=args.features, interactions=args.interactions)
    opt = torch.optim.AdamW(pot.parameters(), lr=5e-4, fused=True)

    step = train_step(pot, opt, loss_fn, args.forces)

    graphs = [collate(p) for p in batches(args.steps + 3)]
    fast = dnn.ONEDNN, PaiNN.sparse_direction
    dnn.ONEDNN, PaiNN.sparse_direction = False, False
    flops = []
    for g in graphs[:5]:
        flops.append(counted_flops(lambda g=g: step(g)))
    dnn.ONEDNN, PaiNN.sparse_direction = fast
    cpu = thread_times(step, graphs)
    what = f"PaiNN {args.features}x{args.interactions} {'force' if args.forces else 'energy'} training step, batch 32"
    report(what, flops, cpu)


def thread_times(step, graphs) -> list[float]:
    """Thread CPU seconds of step(g) for graphs[3:], after three untimed steps (where a compiled model compiles)."""
    for g in graphs[:3]:
        step(g)
    cpu = []
    for g in graphs[3:]:
        t = time.thread_time()
        step(g)
        cpu.append(time.thread_time() - t)
    return cpu


def m3gnet_training(batches: int):
    """(potential, step, graphs): M3GNet 64×3 on the PBE solids, an energy + force + stress training step (AdamW,
    forces and stress by autograd with create_graph) and `batches` random batches of 32 structures."""
    import numpy as np
    import torch

    from multifi.config import ModelConfig
    from multifi.data.batch import GraphCollator
    from multifi.data.neighbors import NeighborCache
    from multifi.data.readers.matpes import read_matpes
    from multifi.data.stats import fit_references
    from multifi.models.registry import build_potential
    from multifi.train.loss import MultiFidelityLoss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shared = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    ds = read_matpes(shared / "solids" / "PBE.jsonl.gz", stress_order="vasp")
    pairs = np.stack([np.arange(len(ds)), np.zeros(len(ds), np.int64)], 1)
    pot = build_potential(ModelConfig(backbone="m3gnet", features=64), list(ds.fidelities.names))
    refs = fit_references(ds, pairs)
    pot.head.set_baseline(refs.ref, refs.scale, refs.fitted)
    opt = torch.optim.AdamW(pot.parameters(), lr=1e-3, fused=True)
    collate, loss_fn = GraphCollator(ds, NeighborCache(ds, 5.0, progress=False)), MultiFidelityLoss()
    rng = np.random.default_rng(0)
    graphs = [collate(pairs[rng.choice(len(pairs), 32, replace=False)]) for _ in range(batches)]

    def step(g):
        loss, _ = loss_fn(pot(g, forces=True, stress=True, create_graph=True), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return pot, step, graphs


def m3gnet_step(steps: int, compiled: bool = False) -> tuple[list[int], list[float]]:
    """Counted FLOPs (5 batches, eager: the same arithmetic) and thread CPU times (`steps` batches after 3 untimed,
    in which the compiled model compiles) of M3GNet training steps."""
    pot, step, graphs = m3gnet_training(steps + 3)
    flops = [counted_flops(lambda g=g: step(g)) for g in graphs[:5]]
    pot.use_compile = compiled
    return flops, thread_times(step, graphs)


def gemm_share(steps: int, compiled: bool) -> None:
    """Print the share of M3GNet training steps' CPU time in aten::mm/addmm/bmm and those products' GFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    pot, step, graphs = m3gnet_training(steps + 3)
    flops = statistics.mean(counted_flops(lambda g=g: step(g)) for g in graphs[:5])
    pot.use_compile = compiled
    for g in graphs[:3]:
        step(g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.thread_time()
        for g in graphs[3:]:
            step(g)
        cpu = (time.thread_time() - t) / steps
    rows = prof.key_averages()
    total = sum(r.self_cpu_time_total for r in rows)
    gemm = sum(r.self_cpu_time_total for r in rows if r.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    share = gemm / total
    print(
        f"M3GNet 64x3 training step{', compiled' if compiled else ''}: {1e3 * cpu:.1f} ms thread CPU per step; "
        f"matrix products {100 * share:.1f} % of the profiled CPU time, i.e. ~{1e3 * share * cpu:.1f} ms per step "
        f"at {flops / (share * cpu) / 1e9:.1f} GFLOP/s ({flops / 1e9:.3f} GFLOP); load {os.getloadavg()[0]:.1f}"
    )


def thin_gemms(reps: int = 200) -> None:
    """Print the rate of M3GNet's thin products by backend (thread CPU time, median of `reps` calls)."""
    import torch
    import torch._inductor.config as inductor
    from timing import median_time

    torch.set_num_threads(1)
    inductor.max_autotune, inductor.max_autotune_gemm_backends = True, "CPP,ATEN"
    autotuned = torch.compile(lambda a, b: a @ b, dynamic=False)

    def rate(fn, flop: int) -> float:
        return flop / median_time(fn, reps, 10, clock=time.thread_time) / 1e9  # GFLOP/s

    for m in (3500, 16000):
        x, w, g = torch.randn(m, 64), torch.randn(64, 64), torch.randn(m, 64)
        xt = x.t()
        flop = 2 * m * 64 * 64
        row = {
            "x@W torch.mm": rate(lambda x=x, w=w: torch.mm(x, w), flop),
            "x@W oneDNN": rate(lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), flop),
            "x@W max-autotune": rate(lambda x=x, w=w: autotuned(x, w), flop),
            "xT@g torch.mm": rate(lambda xt=xt, g=g: torch.mm(xt, g), flop),
            "xT@g max-autotune": rate(lambda xt=xt, g=g: autotuned(xt, g), flop),
        }
        print(
            f"M = {m}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in row.items())
            + f" GFLOP/s; load {os.getloadavg()[0]:.1f}"
        )


def report(what: str, flops: list[int], cpu: list[float]) -> None:
    """Print FLOPs per step, the median step's thread CPU time, and the rate as a share of this CPU's sgemm."""
    f, t = statistics.mean(flops), statistics.median(cpu)
    rates = sgemm_rate()
    print(
        f"{what}: {f / 1e9:.3f} GFLOP (matrix products), {1e3 * t:.1f} ms thread CPU (median of {len(cpu)}), "
        f"{f / t / 1e9:.1f} GFLOP/s; load {os.getloadavg()[0]:.1f}"
    )
    for name, r in rates.items():
        print(f"  sgemm 1024² {name}: {r:.1f} GFLOP/s → step at {100 * f / t / 1e9 / r:.1f} % of it")


if __name__ == "__main__":
    main()
