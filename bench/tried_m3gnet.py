"""M3GNet training-step ideas measured and not kept (bench/RESULTS.md, sections "Three-body products padded" and "Every target on the Zen 4"):

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/tried_m3gnet.py filters [--edges 3454]
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/tried_m3gnet.py silu [--steps 60]
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/tried_m3gnet.py merged --edges 3948

filters: the six two-body filter products of a 3-block model, 6 × [E, 20] × [20, 64], against one [E, 20] × [20, 384]
product, and their gradients (thread CPU time, median of 200 calls), plus what joining and splitting the parts costs.
silu: in-process A/B of the force+stress training step (bench/profile_m3gnet.py's setup, alternating step by step on the
same batches) of multifi's SiLU (torch's SiLU, σ(x) computed again for the derivatives) against a variant that computes
σ(x) once and x ⊙ σ(x) as a product, keeping σ(x) for the derivatives.
merged: what one SiLU costs in the loss's backward of a force-training step as autograd runs it (the kernel of its second
derivative, torch's silu_backward for the energy path and autograd's sum of the two gradients of x) against a bound for
one merged pass (multifi's gate_grad kernel, of like arithmetic, reading five [E, 64] tensors and writing three where a
merged kernel would read five and write two: an upper bound on its time), operands out of
cache (a new set each call from a pool of 40), thread CPU time, median of 180 calls.
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def filters(edges: int) -> None:
    from thin_products import median_us

    torch.set_num_threads(1)
    rbf, W = torch.randn(edges, 20), [torch.randn(64, 20) for _ in range(6)]
    Wc, dY = torch.cat(W), [torch.randn(edges, 64) for _ in range(6)]
    dYc = torch.cat(dY, 1)
    rows = {
        "forward": (lambda: [torch.mm(rbf, w.t()) for w in W], lambda: torch.mm(rbf, Wc.t()).split(64, 1)),
        "weight gradient": (lambda: [torch.mm(d.t(), rbf) for d in dY], lambda: torch.mm(dYc.t(), rbf)),
        "input gradient": (lambda: sum(torch.mm(d, w) for d, w in zip(dY, W)), lambda: torch.mm(dYc, Wc)),
    }
    for name, (six, one) in rows.items():
        print(f"{name}: 6 products {median_us(six, 200):.1f} us, one {median_us(one, 200):.1f} us")
    join = median_us(lambda: torch.cat(dY, 1), 200)
    split = median_us(lambda: [t.contiguous() for t in dYc.split(64, 1)], 200)
    print(f"joining the six gradients {join:.1f} us, contiguous copies of the six parts {split:.1f} us")


class _SiLUKeepingSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        import multifi.nn.fused as fused

        x, s = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return torch.ops.aten.silu_backward(g, x)
        return fused._SiLUGrad.apply(x, s, g)


def silu(steps: int) -> None:
    from multifi.allocator import retain_freed_memory

    retain_freed_memory()
    sys.argv = [sys.argv[0]]
    setup = runpy.run_path(str(BENCH / "profile_m3gnet.py"))
    import multifi.nn.fused as fused

    kept, step, graphs = fused._SiLU, setup["training_step_seconds"], setup["gs"]
    ratios, ta, tb = [], [], []
    for k in range(steps):
        g = graphs[k % len(graphs)]
        fused._SiLU = kept
        a = step(g)
        fused._SiLU = _SiLUKeepingSigmoid
        b = step(g)
        if k >= 4:
            ratios.append(a / b)
            ta.append(a)
            tb.append(b)
    fused._SiLU = kept
    q = statistics.quantiles(ratios, n=4)
    print(
        f"multifi's SiLU {1e3 * statistics.median(ta):.1f} ms, σ kept {1e3 * statistics.median(tb):.1f} ms per step; "
        f"speed-up of the variant: median of per-step ratios {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})"
    )


def merged(edges: int) -> None:
    import time

    import multifi.nn.fused as fused

    if not fused.available():
        raise SystemExit("the fused kernels are not available here")
    torch.set_num_threads(1)
    pool = []
    for _ in range(40):  # x, σ(x), g (first-backward gradient), gg and ge (the loss's gradients) per set
        x, g, gg, ge = (torch.randn(edges, 64) for _ in range(4))
        pool.append((x, torch.sigmoid(x), g, gg, ge))
    ops = torch.ops.multifi_fused

    def as_now(x, s, g, gg, ge):  # _SiLUGrad's backward, _SiLU's backward (grad mode off), the engine's sum
        dx, dg = ops.silu_grad2(x, s, g, gg)
        return dx + torch.ops.aten.silu_backward(ge, x), dg

    def merged_bound(x, s, g, gg, ge):  # a merged pass reads x, s, g, gg, ge and writes dx, dg: 7 tensors
        return ops.gate_grad(ge, x, s, g, gg, True)  # a kernel of like arithmetic that reads 5 and writes 3: 8

    for name, fn in (("as autograd runs it (12 tensors)", as_now), ("one merged pass (bound, 8)", merged_bound)):
        times = []
        for k in range(200):
            t = time.thread_time()
            fn(*pool[k % len(pool)])
            times.append(time.thread_time() - t)
        print(f"{name}: {1e6 * statistics.median(times[20:]):.0f} µs per SiLU on [{edges}, 64]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["filters", "silu", "merged"])
    ap.add_argument("--edges", type=int, default=3454)
    ap.add_argument("--steps", type=int, default=60)
    opts = ap.parse_args()
    if opts.what == "filters":
        filters(opts.edges)
    elif opts.what == "silu":
        silu(opts.steps)
    else:
        merged(opts.edges)


if __name__ == "__main__":
    main()
