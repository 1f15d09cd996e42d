"""Do the C++ kernels give the same bits whichever CPU version runs? Builds nn/csrc/gather_scatter.cpp with every loop
compiled for one target only (`default` = baseline x86-64, `avx2`, `avx512f`; no run-time dispatch), runs every kernel
(segment_sum's three modes, edge_dot, edge_dot_unit, SiLU's and the gates' derivatives and merged gradients) in float32 and float64 on
fixed random inputs and saves the outputs; `--compare` checks saved outputs bit for bit. Each target in its own
process (the builds register the same operators):

    for t in dispatch default avx2; do OMP_NUM_THREADS=1 .venv/bin/python bench/kernel_targets.py $t; done
    .venv/bin/python bench/kernel_targets.py --compare dispatch default avx2

`dispatch` is the library's own build (each loop's CPU version chosen at load time). A target the CPU lacks cannot run.
Outputs go to MULTIFI_KERNEL_TARGETS_DIR (default /tmp/multifi_kernel_targets).
"""

import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("MULTIFI_KERNEL_TARGETS_DIR", "/tmp/multifi_kernel_targets"))


def build(target: str) -> None:
    from torch.utils.cpp_extension import load

    from multifi.nn import fused

    if target == "dispatch":
        assert fused.available(), "the kernels could not be built"
        return
    src = (ROOT / "src/multifi/nn/csrc/gather_scatter.cpp").read_text()
    attr = "" if target == "default" else f'__attribute__((target("{target}")))'
    src, n = re.subn(
        r"#define MULTIFI_CLONES __attribute__\(\(target_clones\([^)]*\)\)\)", f"#define MULTIFI_CLONES {attr}", src
    )
    assert n == 1, "no MULTIFI_CLONES definition to replace"
    OUT.mkdir(exist_ok=True)
    path = OUT / f"gather_scatter_{target}.cpp"
    path.write_text(src)
    flags = list(fused._FLAGS)
    load(
        name=f"multifi_targets_{target}",
        sources=[str(path)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    fused._state["ok"] = True  # the operators are registered: do not build the library's copy as well


def outputs() -> dict:
    from multifi.nn import fused

    ops, g = torch.ops.multifi_fused, torch.Generator().manual_seed(0)
    N, E, F = 580, 9200, 128
    i, j = torch.sort(torch.randint(0, N, (E,), generator=g)).values, torch.randint(0, N, (E,), generator=g)
    rows = fused.EdgePlan(i, j, N).by_center
    out = {}
    for dt in (torch.float32, torch.float64):
        x1, x3 = (torch.randn(N, c, F, generator=g).to(dt) for c in (1, 3))
        w, u = torch.randn(E, F, generator=g).to(dt), torch.randn(E, 3, generator=g).to(dt)
        s, none = torch.sigmoid(w), torch.empty(0, dtype=dt)
        out[str(dt)] = [
            ops.segment_sum(torch.zeros(N, 3, F, dtype=dt), x3, w, none, j, rows.ptr, rows.order),
            ops.segment_sum(torch.zeros(N, 3, F, dtype=dt), x1, w, u, j, rows.ptr, rows.order),
            ops.segment_sum(torch.zeros(N, 1, F, dtype=dt), x3, w, u, j, rows.ptr, rows.order),
            ops.edge_dot(x3, x3, none, i, j),
            ops.edge_dot(x3, x1, u, i, j),
            ops.edge_dot_unit(x3, x1, w, i, j),
            ops.silu_grad(w, s, w),
            *ops.silu_grad2(w, s, w, w),
            ops.gate_value(w, s, s, w, True),
            *ops.gate_grad(w, w, s, s, w, True),
            *ops.gate_grad2(w, w, s, s, w, w, w, w, True),
            *ops.gate_grad2(w, w, s, s, none, w, w, none, False),
            ops.silu_grad_merged(w, s, u.sum(1).repeat_interleave(F).view(E, F), w, s),
            ops.gate_grad2_dgo(w, s, s, w, w, s, w, True),
            *ops.gate_grad_merged(s, w, w, s, s, w, w, s, w, True),
            *ops.gate_grad_merged(s, w, w, s, s, none, w, s, none, False),
        ]
    return out


def main() -> None:
    if sys.argv[1] == "--compare":
        first, *rest = sys.argv[2:]
        ref = torch.load(OUT / f"{first}.pt")
        for target in rest:
            got = torch.load(OUT / f"{target}.pt")
            same = [torch.equal(a, b) for k in ref for a, b in zip(ref[k], got[k])]
            print(f"{target} vs {first}: {sum(same)} of {len(same)} outputs bit-identical")
        return
    torch.set_num_threads(1)
    build(sys.argv[1])
    OUT.mkdir(exist_ok=True)
    torch.save(outputs(), OUT / f"{sys.argv[1]}.pt")


if __name__ == "__main__":
    main()
