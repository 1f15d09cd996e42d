"""Prototype (not in the library): SiLU whose first and second derivatives run as one C++ pass each
(bench/variants/silu/silu.cpp; the forward keeps σ(x), so the kernels are arithmetic only), against torch's SiLU,
on an M3GNet-sized edge tensor [3 500, 64] float32: forward + first derivative (create_graph) and the double
backward, median of 200, 1 thread; then gradcheck/gradgradcheck in float64.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/variants/silu/bench.py
"""

import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

torch.set_num_threads(1)
load(
    name="silu_proto",
    sources=[str(Path(__file__).with_name("silu.cpp"))],
    extra_cflags=["-O3", "-ffp-contract=off"],
    is_python_module=False,
    verbose=False,
)
ops = torch.ops.silu_proto


class SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return SiLUGrad.apply(x, s, g)


class SiLUGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, g):
        ctx.save_for_backward(x, s, g)
        return ops.silu_grad(x, s, g)

    @staticmethod
    def backward(ctx, gg):
        x, s, g = ctx.saved_tensors
        dx, dg = ops.silu_grad2(x, s, g, gg)
        return dx, None, dg


x = torch.randn(3500, 64, requires_grad=True)
gy = torch.randn(3500, 64, requires_grad=True)
w = torch.randn(3500, 64)


def run(act):
    t0 = time.perf_counter()
    y = act(x)
    (g,) = torch.autograd.grad(y, x, gy, create_graph=True)
    t1 = time.perf_counter()
    (g * w).sum().backward()
    return t1 - t0, time.perf_counter() - t1


for name, act in (("torch", torch.nn.functional.silu), ("fused", SiLU.apply)):
    for _ in range(20):
        run(act)
    r = [run(act) for _ in range(200)]
    f = sorted(a for a, b in r)[100]
    b = sorted(b for a, b in r)[100]
    print(name, f"forward+grad {f * 1e6:.0f} us, double backward {b * 1e6:.0f} us")
x2 = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
print(
    "gradcheck",
    torch.autograd.gradcheck(SiLU.apply, (x2,)),
    "gradgradcheck",
    torch.autograd.gradgradcheck(SiLU.apply, (x2,)),
)
