"""A linear map whose float32 CPU product runs on oneDNN instead of the BLAS behind torch.mm.

torch sends float32 matrix products on the CPU to MKL. On AMD CPUs MKL takes its AVX2 code path even
where the CPU has AVX-512 (1024² sgemm on one Zen 5 core: 92 GFLOP/s through torch.mm, ~200 through
oneDNN; bench/flops.py), while oneDNN, also inside every x86 torch build, picks its kernels by the
instruction set alone. PaiNN's edge filters use it (bench/RESULTS.md: their products' CPU time fell
~17 %); the atom-sized layers stay on torch.mm, where padding and the Python wrapper cost what oneDNN
saves. The choice is per call site and training state (weights that require grad), never by batch
size, so the kernel for a structure does not change with its batch companions. Only the forward product and the input gradient go to
oneDNN; the weight gradient stays with torch.mm. float64, other devices, torch.compile tracing and
MULTIFI_ONEDNN=0 use torch's own F.linear. The backward is built from the same differentiable
functions, so double backward (force training) works.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _onednn_available() -> bool:
    if os.environ.get("MULTIFI_ONEDNN", "1").lower() in ("0", "false", "no", ""):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn_available()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Only while training the weight (it requires grad, grad mode on): frozen models (the ASE calculator,
    evaluation, EMA weights) evaluate one small structure at a time, where oneDNN's per-call cost made
    forces 1.4× slower (bench/RESULTS.md). Never by batch size, so outputs do not depend on the batch."""
    return (
        ONEDNN
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dim() >= 1
        and x.numel() > 0
        and weight.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _rows(m: int) -> int:
    """m rounded up to a multiple of 64 or of 1/16 of its power of two (≤ 6.25 % more rows)."""
    step = max(64, 1 << max(m.bit_length() - 5, 0))
    return -(-m // step) * step


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ weight.T (+ bias) for 2-D float32 CPU x [M, K], weight [N, K], bias [N] or None.

    oneDNN compiles a kernel for every new shape (~0.5 ms); batches of graphs have a new row count M
    almost every step, so rows are padded with zeros to one of few sizes (`_rows`) and cut off again.
    """

    @staticmethod
    def forward(x, weight, bias):
        m = x.shape[0]
        xp = F.pad(x, (0, 0, 0, _rows(m) - m)) if _rows(m) != m else x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(xp, weight.contiguous(), bias, "none", [], "")[:m]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = linear(g, weight.t())  # g @ W
        if ctx.needs_input_grad[1]:
            gw = torch.mm(x.t(), g).t()  # = g.t() @ x; this order was ~1.4× faster for tall, thin x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (x [..., K], weight [N, K] → [..., N]); float32 CPU products on oneDNN."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*lead, weight.shape[0])
