"""One compiled graph for every edge count: inductor's CPU code generation without its float32-sum length guard.

For a float32 sum reduction, inductor's C++ code generator (torch/_inductor/codegen/cpp.py,
`CppKernel.need_use_acc_helper`) accumulates in chunks of 4 096 (a cascade sum) only when the reduction
is longer than 4 096, and decides that with a guard on the symbolic length. With dynamic shapes the edge
count is such a length (bias gradients of edge MLPs are sums over edges), so a function first compiled on
a batch of ≤ 4 096 edges is compiled again at the first batch with more: a stall mid-run and two graphs.
Inside `unguarded_float_sums()` the same choice is made from the length's hint instead (the batch the graph
is compiled on), without a guard: the graph then serves every length, with the chunked sum when it was
compiled on a batch of > 4 096 (as before) and plain vectorised accumulation otherwise (the sums it concerns
are weight gradients, not energies, forces or stress, which are summed in float64 or scattered). The patch is
active only during the calls of multifi's compiled functions, and their code carries its own inductor cache
tag (CACHE_TAG), so other compiled code in the process and cache entries made without it are unaffected.
"""

from __future__ import annotations

import contextlib
import threading

CACHE_TAG = "multifi-unguarded-float-sums-2"
CHUNK = 4096  # inductor's chunk length of the cascade sum
_LOCK = threading.RLock()


@contextlib.contextmanager
def unguarded_float_sums():
    """Inductor code generated inside makes float32 sums without a length guard (see the module doc) and
    is cached under CACHE_TAG. A no-op when this torch has no CppKernel.need_use_acc_helper."""
    try:
        import sympy
        import torch
        import torch.compiler.config as compiler_config
        from torch._inductor.codegen.cpp import CppKernel
        from torch._inductor.virtualized import V
    except ImportError:
        yield
        return
    original = CppKernel.__dict__.get("need_use_acc_helper")
    if original is None:
        yield
        return

    def need_use_acc_helper(self, reduction_type, dtype, use_scalar):
        if reduction_type == "sum" and dtype == torch.float and self.call_ranges is not None:
            size = sympy.Mul(*self.call_ranges[self.reduction_depth :])
            return V.graph.sizevars.optimization_hint(size, fallback=CHUNK + 1) > CHUNK
        return original(self, reduction_type, dtype, use_scalar)

    with _LOCK, compiler_config.patch(cache_key_tag=CACHE_TAG):
        CppKernel.need_use_acc_helper = need_use_acc_helper
        try:
            yield
        finally:
            CppKernel.need_use_acc_helper = original
