"""Fused gather-multiply-scatter on the CPU: out = base + Σ_{e: i_e = d} x[j_e] ⊙ w_e, without [E, C, F] tensors.

Eager PyTorch computes a filtered message sum as index_select, a product and index_add, three passes
over an edge-sized [E, C, F] tensor (and as many again in the backward). The C++ kernels in
`csrc/gather_scatter.cpp` do each in one pass over the edges (bench/RESULTS.md). They are compiled with
torch.utils.cpp_extension on first use (a C++ compiler and ninja; ~20 s once per machine and torch
version, cached in torch's extension folder, `TORCH_EXTENSIONS_DIR`). Without a compiler, or with
MULTIFI_FUSED=0, `available()` is False and callers keep torch's own ops (one warning says why).

Both sums (without and with unit vectors) are differentiable to any order: their derivatives are the same
kernels, so energy training, inference, forces and force training (a second derivative) all run on them.
Each destination row sums its edges in edge order, as index_add does.
`silu` and `gate` (M3GNet's gated MLPs: their SiLUs, and silu(a) σ(g) times the radial filter) run their first and
second derivatives as one pass each on five more kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger("multifi")
_SOURCE = Path(__file__).with_name("csrc") / "gather_scatter.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once a build was attempted, "error": why not


def _enabled_by_env() -> bool:
    return os.environ.get("MULTIFI_FUSED", "1").lower() not in ("0", "false", "no", "")


_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
#: MULTIFI_KERNEL_ISA: the widest CPU version the loops are built for ("avx2", "baseline"; default every one the
#: compiler has): to measure how a CPU without AVX-512 (or AVX2) runs them
_ISA_FLAGS = {"": [], "avx2": ["-DMULTIFI_ISA_AVX2"], "baseline": ["-DMULTIFI_ISA_BASELINE"]}


def _flags() -> list[str]:
    """The compiler flags; an unknown MULTIFI_KERNEL_ISA is an error (a measurement would quietly run torch's
    operators instead)."""
    isa = os.environ.get("MULTIFI_KERNEL_ISA", "").lower()
    if isa not in _ISA_FLAGS:
        from multifi.errors import MultifiError

        raise MultifiError(f"MULTIFI_KERNEL_ISA={isa!r}: not one of avx2, baseline (or unset, for every version)")
    return _FLAGS + _ISA_FLAGS[isa]


def _build() -> None:
    """Compile and load the kernels, then check them on a small case against torch's own operators."""
    from torch.utils.cpp_extension import _get_build_directory, load

    # source, flags and torch version in the name: a build of other source (an older multifi) or for another
    # torch (another environment sharing the cache folder) is never loaded instead
    flags = _flags()
    key = _SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode()
    base = "multifi_fused_" + hashlib.sha256(key).hexdigest()[:12]
    for name in (base, *(f"{base}_{k}" for k in range(1, 4))):  # a folder whose build lock a killed build left
        folder = Path(_get_build_directory(name, False))  # behind makes every later build wait forever: next one
        if (folder / f"{name}.so").exists() or not _stale(folder / "lock"):
            break
        log.warning("%s: a build lock left by a killed build; building in another folder", folder / "lock")
    else:  # every folder's lock is stale: waiting on one would never end (the caller falls back to torch's ops)
        raise RuntimeError(f"{folder.parent}: build locks left by killed builds in {base}*; remove them to build")
    if not (folder / f"{name}.so").exists():
        log.info("compiling the fused message kernels (once per machine and torch version, ~20 s)")
    # -ffp-contract=off: no fused multiply-adds, so sums round exactly as torch's separate product and index_add
    load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False)
    try:
        _register_fakes()
        _state["fakes"] = True
    except Exception as err:  # only tracing with the kernels (multifi.scripted) is lost: eager calls keep them
        log.info("the fused kernels cannot be traced (%s); traced graphs use torch's operators", _reason(err))
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the first forward runs in
        _self_test()


def _register_fakes() -> None:
    """Output shapes of the kernels for tracing (make_fx with symbolic sizes: `traced_kernels`)."""
    lib = "multifi_fused::"
    if getattr(torch.ops.multifi_fused.segment_sum.default, "_multifi_fakes", False):
        return  # registered by an earlier build in this process
    empty = lambda t: t.new_empty(0)  # noqa: E731

    torch.library.register_fake(lib + "segment_sum")(lambda base, x, w, u, src, ptr, order: base.new_empty(base.shape))
    torch.library.register_fake(lib + "edge_dot")(lambda g, x, u, dst, src: x.new_empty((dst.shape[0], x.shape[2])))
    torch.library.register_fake(lib + "edge_dot_unit")(lambda g, x, w, dst, src: x.new_empty((dst.shape[0], 3)))
    torch.library.register_fake(lib + "silu_grad")(lambda x, s, g: torch.empty_like(x))
    torch.library.register_fake(lib + "silu_grad2")(lambda x, s, g, gg: (torch.empty_like(x), torch.empty_like(x)))
    torch.library.register_fake(lib + "silu_grad_merged")(lambda x, s, ge, gg, g: torch.empty_like(x))
    torch.library.register_fake(lib + "gate_grad2_dgo")(lambda a, sa, sg, f, Ga, Gg, Gf, has_f: torch.empty_like(a))
    torch.library.register_fake(lib + "gate_grad_merged")(
        lambda ge, go, a, sa, sg, f, Ga, Gg, Gf, has_f: (
            torch.empty_like(go),
            torch.empty_like(go),
            torch.empty_like(go) if has_f else empty(go),
        )
    )
    torch.library.register_fake(lib + "gate_value")(lambda a, sa, sg, f, has_f: torch.empty_like(a))
    torch.library.register_fake(lib + "gate_grad")(
        lambda go, a, sa, sg, f, has_f: (
            torch.empty_like(go),
            torch.empty_like(go),
            torch.empty_like(go) if has_f else empty(go),
        )
    )
    torch.library.register_fake(lib + "gate_grad2")(
        lambda go, a, sa, sg, f, Ga, Gg, Gf, has_f: (
            torch.empty_like(go),
            torch.empty_like(go),
            torch.empty_like(go),
            torch.empty_like(go) if has_f else empty(go),
        )
    )
    torch.ops.multifi_fused.segment_sum.default._multifi_fakes = True


_tracing = threading.local()


@contextlib.contextmanager
def _thread_flag(flag: threading.local, on: bool):
    """flag.on = on inside (this thread only), restored after."""
    before = getattr(flag, "on", False)
    flag.on = on
    try:
        yield
    finally:
        flag.on = before


def traced_kernels():
    """Inside, make_fx tracing records the kernels (torch.ops.multifi_fused.*) as the eager model calls them: for a
    graph that runs in this process (multifi.scripted), never for a file that must load without multifi (deploy,
    AOTInductor packages). Edge plans are then built without data-dependent steps (`tracing_plans`). Without the
    kernels' shape functions (`_state["fakes"]`), tracing keeps torch's own operators."""
    return _thread_flag(_tracing, True)


def tracing_plans() -> bool:
    """Inside `traced_kernels` with make_fx tracing active."""
    return getattr(_tracing, "on", False) and torch._C._len_torch_dispatch_stack() > 0


#: seconds after which a build lock is taken as left by a killed build (a build takes ~20-60 s)
STALE_LOCK_SECONDS = 600


def _stale(lock: Path) -> bool:
    """torch's build lock stays behind when a build is killed. It is never removed here (a process building
    that moment would lose its lock): an old one sends the build to another folder."""
    try:
        return time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS
    except OSError:
        return False


def _self_test() -> None:
    """Each mode and its gradients on 7 atoms and 20 unsorted edges, against index_select, products and index_add."""
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(0, 7, (20,), generator=g), torch.randint(0, 7, (20,), generator=g)
    x, w = torch.randn(7, 3, 4, generator=g, requires_grad=True), torch.randn(20, 4, generator=g, requires_grad=True)
    unit = torch.randn(20, 3, generator=g)
    plan = EdgePlan(i, j, 7)
    unit.requires_grad_(True)  # the unit-vector gradient of force calls too
    spread = gather_mul_scatter(torch.zeros(7, 3, 4), x[:, 0], w, plan, unit)
    for fused_out, ref, inputs in (
        (
            gather_mul_scatter(torch.zeros(7, 3, 4), x, w, plan),
            torch.zeros(7, 3, 4).index_add(0, i, x[j] * w[:, None]),
            (x, w),
        ),
        (spread, torch.zeros(7, 3, 4).index_add(0, i, (x[j, 0] * w)[:, None] * unit[:, :, None]), (x, w, unit)),
    ):
        got = torch.autograd.grad(fused_out.square().sum(), inputs)
        want = torch.autograd.grad(ref.square().sum(), inputs)
        for a, b in zip((fused_out, *got), (ref, *want)):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                raise RuntimeError("the built kernels disagree with torch's operators on a test case")
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pairs = []  # SiLU's first and second derivatives, on the kernels and by torch
    for act in (_SiLU.apply, torch.nn.functional.silu):
        (d1,) = torch.autograd.grad(act(z).square().sum(), z, create_graph=True)
        (d2,) = torch.autograd.grad(d1.square().sum(), z)
        pairs.append((d1, d2))
    if not all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(*pairs)):
        raise RuntimeError("the built SiLU kernels disagree with torch's SiLU on a test case")
    inputs = [torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    got = []  # the gate's value, first and second derivatives, on the kernels and by torch
    for act in (_Gate.apply, lambda a, b, c: torch.nn.functional.silu(a) * torch.sigmoid(b) * c):
        y = act(*inputs)
        d1 = torch.autograd.grad(y.square().sum(), inputs, create_graph=True)
        got.append((y, *d1, *torch.autograd.grad(sum(d.square().sum() for d in d1), inputs)))
    if not all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(*got)):
        raise RuntimeError("the built gate kernels disagree with torch's operators on a test case")


def _reason(err: Exception) -> str:
    """The compiler's first error line if there is one, else the exception's last line."""
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    errors = [s for s in lines if "error:" in s]
    return (errors or lines or [type(err).__name__])[0 if errors else -1]


def _transformed() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp), where an autograd.Function without setup_context fails."""
    return bool(torch._C._are_functorch_transforms_active())


def available() -> bool:
    """True when the kernels are loaded (built on the first call); False, with one warning, when they cannot be."""
    if "ok" not in _state and _transformed():
        return False  # inside torch.func transforms (the kernels' autograd cannot run there): decide later
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                if not _enabled_by_env():
                    _state.update(ok=False, error="MULTIFI_FUSED=0")
                else:
                    _flags()  # a mistyped MULTIFI_KERNEL_ISA: an error, not a fallback
                    try:
                        _build()
                        _state.update(ok=True)
                    except Exception as err:  # no compiler, no ninja, read-only cache: torch's ops do the same work
                        reason = _reason(err)
                        _state.update(ok=False, error=reason)
                        warnings.warn(
                            f"multifi: the fused message kernels could not be built ({reason}); "
                            "using torch's own operators (same results, slower). MULTIFI_FUSED=0 skips the attempt.",
                            RuntimeWarning,
                            stacklevel=2,
                        )
    return bool(_state["ok"])


class Rows:
    """Edges grouped by a destination index (a CSR layout): ptr [D+1], order [E] (empty when already sorted)."""

    def __init__(self, index: torch.Tensor, n_rows: int):
        self.n = n_rows
        if tracing_plans():  # no data-dependent step: always an order (the identity for sorted edges), counts
            self.order = torch.argsort(index, stable=True)  # by scatter_add (bincount's length depends on the data)
            counts = torch.zeros(n_rows, dtype=torch.long).scatter_add_(0, index, torch.ones_like(index))
            self.ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
            return
        sorted_ = index.numel() < 2 or bool((index[1:] >= index[:-1]).all())
        self.order = torch.empty(0, dtype=torch.long) if sorted_ else torch.argsort(index, stable=True)
        self.ptr = torch.zeros(n_rows + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(index, minlength=n_rows), 0, out=self.ptr[1:])


class EdgePlan:
    """Everything the kernels need about one batch's edges, built once per forward and shared by all layers.

    center i [E] and neighbour j [E] (int64, values < n_atoms): messages flow j → i; the backward
    scatters into j, so edges are grouped by both.
    """

    def __init__(self, center: torch.Tensor, neighbor: torch.Tensor, n_atoms: int):
        if center.shape != neighbor.shape or center.dim() != 1:
            raise ValueError(f"centres {tuple(center.shape)} and neighbours {tuple(neighbor.shape)}: two [E] tensors")
        if not tracing_plans():  # symbolic sizes: no checks on values (the kernels check their indices when run)
            if center.numel() and int(torch.minimum(center.min(), neighbor.min())) < 0:
                raise ValueError("negative edge index")
            if center.numel() and int(torch.maximum(center.max(), neighbor.max())) >= n_atoms:
                raise ValueError(f"edge index out of range for {n_atoms} atoms")
        self.center, self.neighbor = center.contiguous(), neighbor.contiguous()
        self.by_center = Rows(self.center, n_atoms)
        self.by_neighbor = Rows(self.neighbor, n_atoms)


_NONE = torch.empty(0)


class _Directions(torch.autograd.Function):
    """A partial derivative of the trilinear form T = Σ_e Σ_{a,f} A[i_e,a,f] B[j_e,f] C[e,f] U[e,a] (A [N,3,F],
    B [N,F], C [E,F], U [E,3]) with respect to one of its four inputs, `slot` 0-3; that input is not used
    (None). Slot 0 is PaiNN's direction message base + Σ_{e: i_e = n} (B[j_e] ⊙ C_e) ⊗ U_e. Every derivative
    of a partial of T is another partial of T (the incoming gradient in the place of the slot derived), so
    this is differentiable to any order (force training) on the four modes of the kernels."""

    @staticmethod
    def forward(ctx, slot: int, plan: EdgePlan, base, A, B, C, U):
        ctx.slot, ctx.plan = slot, plan
        ctx.save_for_backward(A, B, C, U)
        return _partial(slot, plan, base, A, B, C, U)

    @staticmethod
    def backward(ctx, g):
        inputs = list(ctx.saved_tensors)
        slot = ctx.slot
        grads = [None, None, g if ctx.needs_input_grad[2] else None]
        for m in range(4):
            if m == slot or not ctx.needs_input_grad[3 + m]:
                grads.append(None)
                continue
            args = list(inputs)
            args[slot], args[m] = g, None
            grads.append(_Directions.apply(m, ctx.plan, None, *args))
        return tuple(grads)


def _partial(slot: int, plan: EdgePlan, base, A, B, C, U) -> torch.Tensor:
    """∂T/∂(input `slot`) of _Directions (plus `base` for slot 0), by the kernels' spread, contract, edge_dot
    (with u) and edge_dot_unit modes."""
    ops = torch.ops.multifi_fused
    n, center, neighbor = plan.by_center.n, plan.center, plan.neighbor
    known = next(t for t in (A, B, C, U) if t is not None)
    F = (C if C is not None else B if B is not None else A).shape[-1]
    if slot == 0:
        r = plan.by_center
        base = known.new_zeros((n, 3, F)) if base is None else base.contiguous()
        return ops.segment_sum(
            base, B.unsqueeze(1).contiguous(), C.contiguous(), U.contiguous(), neighbor, r.ptr, r.order
        )
    if slot == 1:
        r = plan.by_neighbor
        zero = known.new_zeros((n, 1, F))
        return ops.segment_sum(zero, A.contiguous(), C.contiguous(), U.contiguous(), center, r.ptr, r.order).squeeze(1)
    if slot == 2:
        return ops.edge_dot(A.contiguous(), B.unsqueeze(1).contiguous(), U.contiguous(), center, neighbor)
    return ops.edge_dot_unit(A.contiguous(), B.unsqueeze(1).contiguous(), C.contiguous(), center, neighbor)


class _Messages(torch.autograd.Function):
    """base + Σ_{e: dst_e = d} x[src_e] ⊙ w_e, (dst, src) = (i, j), or (j, i) when `reverse`; differentiable to
    any order: its derivatives are this sum the other way round (x) and _EdgeProducts (w), whose derivatives
    are this sum both ways, so force training (a second derivative) runs on the same kernels."""

    @staticmethod
    def forward(ctx, base, x, w, plan: EdgePlan, reverse: bool):
        ctx.plan, ctx.reverse = plan, reverse
        ctx.save_for_backward(x, w)
        rows, src = (plan.by_neighbor, plan.center) if reverse else (plan.by_center, plan.neighbor)
        base, x, w = base.contiguous(), x.contiguous(), w.contiguous()
        return torch.ops.multifi_fused.segment_sum(base, x, w, _NONE.to(x.dtype), src, rows.ptr, rows.order)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[1]:  # Σ over the edges leaving atom n of g[dst_e] ⊙ w_e
            gx = _Messages.apply(torch.zeros_like(x), g, w, ctx.plan, not ctx.reverse)
        if ctx.needs_input_grad[2]:
            gw = _EdgeProducts.apply(g, x, ctx.plan, ctx.reverse)
        return g if ctx.needs_input_grad[0] else None, gx, gw, None, None


class _EdgeProducts(torch.autograd.Function):
    """[E, F]: Σ_c g[dst_e, c] ⊙ x[src_e, c] (the weight gradient of _Messages), differentiable to any order."""

    @staticmethod
    def forward(ctx, g, x, plan: EdgePlan, reverse: bool):
        ctx.plan, ctx.reverse = plan, reverse
        ctx.save_for_backward(g, x)
        dst, src = (plan.neighbor, plan.center) if reverse else (plan.center, plan.neighbor)
        return torch.ops.multifi_fused.edge_dot(g.contiguous(), x.contiguous(), _NONE.to(x.dtype), dst, src)

    @staticmethod
    def backward(ctx, gg):
        g, x = ctx.saved_tensors
        dg = dx = None
        if ctx.needs_input_grad[0]:  # Σ over the edges into row d of x[src_e] ⊙ gg_e
            dg = _Messages.apply(torch.zeros_like(g), x, gg, ctx.plan, ctx.reverse)
        if ctx.needs_input_grad[1]:  # Σ over the edges out of atom n of g[dst_e] ⊙ gg_e
            dx = _Messages.apply(torch.zeros_like(x), g, gg, ctx.plan, not ctx.reverse)
        return dg, dx, None, None


def gather_mul_scatter(
    base: torch.Tensor, x: torch.Tensor, w: torch.Tensor, plan: EdgePlan, unit: torch.Tensor | None = None
) -> torch.Tensor:
    """base + Σ_{e: i_e = n} x[j_e] ⊙ w_e, differentiable to any order.

    Without unit: base [N, C, F], x [N, C, F], w [E, F] (broadcast over C); the values of
    base.index_add(0, i, x.index_select(0, j) * w.unsqueeze(1)). With unit û [E, 3]: x [N, F] and the
    sum is Σ (x[j_e] ⊙ w_e) ⊗ û_e, base and result [N, 3, F].
    """
    if unit is None:
        return _Messages.apply(base, x, w, plan, False)
    return _Directions.apply(0, plan, base, None, x, w, unit)


def applicable(*tensors: torch.Tensor) -> bool:
    """CPU float32/float64 tensors outside torch.compile and make_fx tracing (deploy, aot: their graphs hold
    torch's own operators; inside `traced_kernels` tracing records the kernels), outside forward-mode AD
    (torch.autograd.forward_ad: the kernels' functions have no jvp), and the kernels available."""
    return (
        all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
        and not torch.compiler.is_compiling()
        and (torch._C._len_torch_dispatch_stack() == 0 or (getattr(_tracing, "on", False) and "fakes" in _state))
        and not _transformed()
        and getattr(torch.autograd.forward_ad, "_current_level", -1) < 0
        and available()
    )


# Force training's loss reaches a SiLU (or gate) node A twice: through A itself (the energy term) and through the
# node B that A's first backward made (forces with create_graph: B computes A's derivative). Both send a gradient
# to A's input, which autograd sums: three passes (B's, A's, the sum) over an edge tensor where one would do. So B,
# when A is still to run in the same backward, hands its part of that gradient's inputs to A (`_hand_over`) and A
# computes the whole in one pass (`_handed`). Either may run first (the engine runs B first in M3GNet's step), a
# loss may reach one of them only, or a graph may be differentiated twice: B hands over only when the engine will
# run A later in this backward and nothing was handed yet, else both compute their parts as before. (A hook on A's
# node itself, `grad_fn.register_hook`, sees the sum: what its input's gradient receives from both.)
def _hand_over(owner, parts: tuple) -> bool:
    """Leave `parts` for `owner` (node A) to use later in this backward; False (nothing left) when A has run in
    it, will not run in it, or holds parts of another node for it (two derivative graphs made from one A), and
    under compiled autograd (which traces the nodes in an order of its own). The parts are kept detached: a part
    with a history (g, made with create_graph) would tie A to its own graph, a cycle through autograd's C++ nodes
    that Python's collector cannot free when A does not run (an error between the two nodes)."""
    task = torch._C._current_graph_task_id()
    if task < 0 or task in owner.ran or task in owner.handed or _compiled_autograd():
        return False
    if not torch._C._will_engine_execute_node(owner):
        return False
    owner.handed[task] = tuple(p.detach() for p in parts)
    return True


def _compiled_autograd() -> bool:
    """Inside torch's compiled autograd (torch._dynamo.compiled_autograd, never imported by multifi itself)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    region = getattr(ca, "in_compiled_autograd_region", False)  # absent from older torch versions
    return ca is not None and bool(getattr(ca, "compiled_autograd_enabled", False) or region)


def _handed(ctx) -> tuple | None:
    """The parts B left for this node in this backward (taken), else None, noting that this node has run in it."""
    task = torch._C._current_graph_task_id()
    parts = ctx.handed.pop(task, None)
    if parts is None and task >= 0:
        ctx.ran.add(task)
    return parts


def _prepare_hand_over(ctx) -> None:
    ctx.handed, ctx.ran = {}, set()  # backward task id → parts B left; backward task ids this node has run in


class _SiLU(torch.autograd.Function):
    """x ⊙ σ(x) as torch computes it; its derivative is torch's fused one when not differentiated again (forces
    for MD), else _SiLUGrad (force training), whose x gradient this node may take over (`_hand_over`)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        _prepare_hand_over(ctx)
        return torch.nn.functional.silu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            parts = _handed(ctx)
            if parts is not None:  # (s, gg, g) from _SiLUGrad: its x gradient and this one in one pass
                return torch.ops.multifi_fused.silu_grad_merged(x, parts[0], g, parts[1], parts[2])
            return torch.ops.aten.silu_backward(g, x)
        with torch.no_grad():
            s = torch.sigmoid(x)
        return _SiLUGrad.apply(x, s, g, ctx)


class _SiLUGrad(torch.autograd.Function):
    """g ⊙ silu′(x) from x and s = σ(x) in one pass; its derivatives, gg ⊙ g ⊙ silu″(x) for x and gg ⊙ silu′(x)
    for g, in one pass too (force training), and with torch's operators beyond (a third derivative). `owner`: the
    _SiLU node whose derivative this is."""

    @staticmethod
    def forward(ctx, x, s, g, owner):
        ctx.save_for_backward(x, s, g)
        ctx.owner = owner
        return torch.ops.multifi_fused.silu_grad(x, s, g)

    @staticmethod
    def backward(ctx, gg):
        x, s, g = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiated again: torch's operators, differentiable to any order
            sx = torch.sigmoid(x)
            d1 = sx * (1 + x * (1 - sx))
            return gg * g * sx * (1 - sx) * (2 + x * (1 - 2 * sx)), None, gg * d1, None
        if _hand_over(ctx.owner, (s, gg, g)):  # the owner adds gg ⊙ g ⊙ silu″(x) to its own x gradient
            return None, None, torch.ops.multifi_fused.silu_grad(x, s, gg), None
        dx, dg = torch.ops.multifi_fused.silu_grad2(x, s, g, gg)
        return dx, None, dg, None


_twice = threading.local()


def differentiated_twice(on: bool = True):
    """Inside, `silu` prepares for a second derivative (force training: forces with create_graph, then the loss's
    gradient); outside it is torch's own SiLU, whose first derivative alone is as fast (forces for MD)."""
    return _thread_flag(_twice, on)


def silu(x: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.silu(x); inside `differentiated_twice`, its first and second derivatives run as one pass
    each on the kernels (M3GNet's 3-block force training step takes 25 SiLUs on edge tensors). Torch's own
    SiLU where the kernels do not apply (see `applicable`). The same values and derivatives either way."""
    if getattr(_twice, "on", False) and x.requires_grad and torch.is_grad_enabled() and applicable(x):
        return _SiLU.apply(x)
    return torch.nn.functional.silu(x)


_NO_FILTER = torch.empty(0)


class _Gate(torch.autograd.Function):
    """silu(a) ⊙ σ(g) ⊙ f (f optional) in one pass given σ(a), σ(g); its first derivatives in one pass (_GateGrad
    when differentiated again)."""

    @staticmethod
    def forward(ctx, a, g, f):
        sa, sg = torch.sigmoid(a), torch.sigmoid(g)
        ff = _NO_FILTER.to(a.dtype) if f is None else f
        ctx.save_for_backward(a, g, sa, sg, ff)
        ctx.has_f = f is not None
        _prepare_hand_over(ctx)
        return torch.ops.multifi_fused.gate_value(a, sa, sg, ff, f is not None)

    @staticmethod
    def backward(ctx, go):
        a, g, sa, sg, ff = ctx.saved_tensors
        if torch.is_grad_enabled():
            da, dg, df = _GateGrad.apply(go, a, g, ff if ctx.has_f else None, sa, sg, ctx)
        elif (parts := _handed(ctx)) is not None:  # from _GateGrad: its gradients of a, g, f added in the pass
            go2, Ga, Gg, Gf = parts
            da, dg, df = torch.ops.multifi_fused.gate_grad_merged(go, go2, a, sa, sg, ff, Ga, Gg, Gf, ctx.has_f)
        else:
            da, dg, df = torch.ops.multifi_fused.gate_grad(go, a, sa, sg, ff, ctx.has_f)
        return da, dg, (df if ctx.has_f else None)


class _GateGrad(torch.autograd.Function):
    """(da, dg, df) of _Gate given go; their derivatives in one pass, and with torch's operators beyond (a third
    derivative). sa, sg: σ(a), σ(g), constants here (the formulas differentiate through them)."""

    @staticmethod
    def forward(ctx, go, a, g, f, sa, sg, owner):
        ff = _NO_FILTER.to(a.dtype) if f is None else f
        ctx.save_for_backward(go, a, g, ff, sa, sg)
        ctx.has_f, ctx.owner = f is not None, owner
        da, dg, df = torch.ops.multifi_fused.gate_grad(go, a, sa, sg, ff, ctx.has_f)
        if f is None:
            ctx.mark_non_differentiable(df)  # empty: there is no filter
        return da, dg, df

    @staticmethod
    def backward(ctx, Ga, Gg, Gf):
        go, a, g, ff, sa, sg = ctx.saved_tensors
        if torch.is_grad_enabled():
            out = _gate_grad2_by_torch(go, a, g, ff if ctx.has_f else None, Ga, Gg, Gf if ctx.has_f else None)
        else:
            Gf = Gf if ctx.has_f and Gf is not None else _NO_FILTER.to(a.dtype)
            if _hand_over(ctx.owner, (go, Ga, Gg, Gf)):  # the owner adds this gradient of a, g, f to its own
                dgo = torch.ops.multifi_fused.gate_grad2_dgo(a, sa, sg, ff, Ga, Gg, Gf, ctx.has_f)
                return dgo, None, None, None, None, None, None
            out = torch.ops.multifi_fused.gate_grad2(go, a, sa, sg, ff, Ga, Gg, Gf, ctx.has_f)
        dgo, da, dg, df = out
        return dgo, da, dg, (df if ctx.has_f else None), None, None, None


def _gate_grad2_by_torch(go, a, g, f, Ga, Gg, Gf):
    """What gate_grad2 computes, with torch's operators (differentiable to any order)."""
    sa, sg = torch.sigmoid(a), torch.sigmoid(g)
    A, dA, ddA = a * sa, sa * (1 + a * (1 - sa)), sa * (1 - sa) * (2 + a * (1 - 2 * sa))
    B, dB = sg, sg * (1 - sg)
    ddB = dB * (1 - 2 * sg)
    fk = 1 if f is None else f
    Gfk = 0 if Gf is None else Gf
    dgo = (Ga * dA * B + Gg * A * dB) * fk + Gfk * A * B
    da = go * ((Ga * ddA * B + Gg * dA * dB) * fk + Gfk * dA * B)
    dg = go * ((Ga * dA * dB + Gg * A * ddB) * fk + Gfk * A * dB)
    df = None if f is None else go * (Ga * dA * B + Gg * A * dB)
    return dgo, da, dg, df


def gate(a: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) ⊙ σ(g) (⊙ f): the output of M3GNet's gated MLPs, times their radial filter f. With a derivative taken
    (forces, force training) on the kernels: one pass for the value, each first and each second derivative, where
    torch's operators take a dozen; torch's own operators where the kernels do not apply (see `applicable`)."""
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or g.requires_grad or (f is not None and f.requires_grad))
    tensors = (a, g) if f is None else (a, g, f)
    alike = all(t.shape == a.shape and t.dtype == a.dtype for t in tensors) and a.numel() > 0
    if needs_grad and alike and applicable(*tensors):
        return _Gate.apply(a, g, f)
    out = torch.nn.functional.silu(a) * torch.sigmoid(g)
    return out if f is None else out * f
