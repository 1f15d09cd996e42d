"""Time of the C++ kernels (nn/csrc/gather_scatter.cpp): the elementwise ones of M3GNet force training against
torch's own operators on an edge-sized [3 400, 64] float32 tensor, and the gather-multiply-scatter modes of PaiNN's
messages on its profile's batch shape (580 atoms, 9 200 edges sorted by centre, 128 features): wall time per call,
median of 300 after 20 warm-up calls, 1 thread. Kernels that the multifi on PYTHONPATH lacks are skipped, so an older
revision can be timed the same way:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/fused_elementwise.py
    git worktree add /tmp/wt_old REV && PYTHONPATH=/tmp/wt_old/src OMP_NUM_THREADS=1 .venv/bin/python bench/fused_elementwise.py
"""

import statistics
import time

import torch

from multifi.nn import fused


def median_us(fn, reps: int = 300, warm: int = 20) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1e3


def main() -> None:
    torch.set_num_threads(1)
    assert fused.available(), "the kernels could not be built"
    g = torch.Generator().manual_seed(0)
    x, go, f, ga, gg, gf = (torch.randn(3400, 64, generator=g) for _ in range(6))
    s, sg = torch.sigmoid(x), torch.sigmoid(go)
    ops = torch.ops.multifi_fused
    rows = {
        "torch mul (reference: one product)": lambda: x * go,
        "torch silu_backward": lambda: torch.ops.aten.silu_backward(go, x),
        "torch sigmoid": lambda: torch.sigmoid(x),
    }
    if hasattr(ops, "silu_grad"):
        rows["silu_grad"] = lambda: ops.silu_grad(x, s, go)
        rows["silu_grad2"] = lambda: ops.silu_grad2(x, s, go, gg)
    if hasattr(ops, "gate_value"):
        try:  # the filter's presence as an argument (since 4923533) or taken from its size (before)
            ops.gate_value(x, s, sg, f, True)
            flag = (True,)
        except RuntimeError:
            flag = ()
        rows["gate_value"] = lambda: ops.gate_value(x, s, sg, f, *flag)
        rows["gate_grad"] = lambda: ops.gate_grad(go, x, s, sg, f, *flag)
        rows["gate_grad2"] = lambda: ops.gate_grad2(go, x, s, sg, f, ga, gg, gf, *flag)
    rows.update(message_kernels(ops))
    for name, fn in rows.items():
        print(f"{name:40s} {median_us(fn):8.1f} µs")


def message_kernels(ops) -> dict:
    """segment_sum's modes and edge_dot on PaiNN's batch shape (float32)."""
    g = torch.Generator().manual_seed(1)
    N, E, F = 580, 9200, 128
    i, j = torch.sort(torch.randint(0, N, (E,), generator=g)).values, torch.randint(0, N, (E,), generator=g)
    rows = fused.EdgePlan(i, j, N).by_center
    x1, x3 = torch.randn(N, 1, F, generator=g), torch.randn(N, 3, F, generator=g)
    w, u, none = torch.randn(E, F, generator=g), torch.randn(E, 3, generator=g), torch.empty(0)
    return {
        "segment_sum plain [N,3,F]": lambda: ops.segment_sum(
            torch.zeros(N, 3, F), x3, w, none, j, rows.ptr, rows.order
        ),
        "segment_sum spread": lambda: ops.segment_sum(torch.zeros(N, 3, F), x1, w, u, j, rows.ptr, rows.order),
        "segment_sum contract": lambda: ops.segment_sum(torch.zeros(N, 1, F), x3, w, u, j, rows.ptr, rows.order),
        "edge_dot [N,3,F]": lambda: ops.edge_dot(x3, x3, none, i, j),
        "edge_dot spread": lambda: ops.edge_dot(x3, x1, u, i, j),
    }


if __name__ == "__main__":
    main()
