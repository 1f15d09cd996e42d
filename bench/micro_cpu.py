"""Kernel-level measurements behind the PaiNN changes for AMD CPUs (bench/RESULTS.md, AMD EPYC section).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/micro_cpu.py

On one batch of 32 of the benchmark's QM9 molecules (PaiNN 64 features: E ≈ 9,000 edges, N ≈ 580
atoms), alternating the variants of each group, median thread CPU time of 40 repetitions:
  1. index_add of [E,F] edge messages from a strided view (a slice of [E,3F]) vs from a contiguous tensor
  2. the vector message dvs⊗û + dvv⊙v_j: two products and a sum vs one product and an in-place addcmul_
  3. the filter product [E,21]@[21,F]: torch (MKL) vs oneDNN, with a fixed and with a varying row count
     (oneDNN compiles a kernel per new shape), and oneDNN with rows padded to few sizes
  4. the filter weight gradient: g.t() @ x vs (x.t() @ g).t()
  5. Σ_j dvs_ij ⊗ û_ij and its gradient: dense (product, index_add / gather, product, sum) vs sparse (nn/sparse.py)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def bench(title, fns, reps=40):
    ts = {k: [] for k in fns}
    for r in range(reps):
        for k, f in fns.items() if r % 2 == 0 else reversed(list(fns.items())):
            t = time.thread_time()
            f()
            ts[k].append(time.thread_time() - t)
    print(title)
    for k, v in ts.items():
        print(f"  {k:52s} {1e3 * statistics.median(v[3:]):8.3f} ms")


def main() -> None:
    import torch
    import torch.nn.functional as F
    from profile_painn import setup

    from multifi.nn.onednn import _rows
    from multifi.nn.sparse import DirectionSum

    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, collate, batches, _ = setup(features=64)
    g = collate(batches(1)[0])
    i, j = g.edge_index
    E, N, Fe = i.numel(), g.numbers.numel(), 64
    print(f"E = {E} edges, N = {N} atoms, F = {Fe}; load {os.getloadavg()[0]:.1f}")
    s = torch.randn(N, Fe)
    x3 = torch.randn(E, 3 * Fe)
    strided, contiguous = x3[:, :Fe], x3[:, :Fe].contiguous()
    bench(
        "1. index_add [E,F] → [N,F]",
        {
            "strided source (slice of [E,3F])": lambda: s.index_add(0, i, strided),
            "contiguous source": lambda: s.index_add(0, i, contiguous),
        },
    )
    dvs, dvv = torch.randn(E, Fe), torch.randn(E, Fe)
    unit = F.normalize(torch.randn(E, 3), dim=-1)
    vj = torch.randn(E, 3, Fe)
    bench(
        "2. dv = dvs⊗û + dvv⊙v_j [E,3,F]",
        {
            "mul, mul, add": lambda: dvs.unsqueeze(1) * unit.unsqueeze(-1) + dvv.unsqueeze(1) * vj,
            "mul, addcmul_ (in place)": lambda: (dvv.unsqueeze(1) * vj).addcmul_(dvs.unsqueeze(1), unit.unsqueeze(-1)),
        },
    )
    lp = torch.ops.mkldnn._linear_pointwise
    W = torch.randn(Fe, 21)
    sizes = [E - 500 + 37 * k for k in range(30)]
    basis = {m: torch.rand(m, 21) for m in sizes}
    it = {"k": 0}

    def nxt():
        it["k"] = (it["k"] + 1) % len(sizes)
        return basis[sizes[it["k"]]]

    xb = basis[sizes[0]]
    bench(
        "3. filter [E,21] @ [21,F]",
        {
            "torch (MKL), fixed E": lambda: xb @ W.t(),
            "oneDNN, fixed E": lambda: lp(xb, W, None, "none", [], ""),
            "torch (MKL), E varying per call": lambda: nxt() @ W.t(),
            "oneDNN, E varying per call": lambda: lp(nxt(), W, None, "none", [], ""),
            "oneDNN, E varying, rows padded (nn/onednn.py)": lambda: (
                lambda x: lp(F.pad(x, (0, 0, 0, _rows(len(x)) - len(x))), W, None, "none", [], "")[: len(x)]
            )(nxt()),
        },
    )
    gr = torch.randn(E, Fe)
    bench(
        "4. filter weight gradient [F,E]@[E,21]",
        {
            "g.t() @ x": lambda: gr.t() @ xb[:E] if len(xb) >= E else gr[: len(xb)].t() @ xb,
            "(x.t() @ g).t()": lambda: (xb.t() @ gr[: len(xb)]).t(),
        },
    )
    gv = torch.randn(N, 3, Fe)
    d = DirectionSum(i, unit, N)
    bench(
        "5. Σ_j dvs_ij ⊗ û_ij [N,3,F] and its gradient",
        {
            "dense forward: product + index_add": lambda: torch.zeros(N, 3, Fe).index_add_(
                0, i, dvs.unsqueeze(1) * unit.unsqueeze(-1)
            ),
            "sparse forward: U @ dvs": lambda: d.u @ dvs,
            "dense gradient: gather + product + sum": lambda: (gv.index_select(0, i) * unit.unsqueeze(-1)).sum(1),
            "sparse gradient: Uᵀ @ g": lambda: d.ut @ gv.view(3 * N, Fe),
            "building U and Uᵀ (once per forward)": lambda: DirectionSum(i, unit, N),
        },
    )


if __name__ == "__main__":
    main()
