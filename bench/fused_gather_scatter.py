"""What a fused gather-multiply-scatter kernel would save in PaiNN's v_j message (issue: speed on every CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fused_gather_scatter.py [--features 128] [--repeats 30]

out[i_e] += w_e ⊙ x[j_e] over [E, 3, F] (edges sorted by centre i), as PaiNN's `_vj` + index_add computes it:
torch's index_select, product and index_add (three passes over an [E, 3, F] tensor) against one C++ loop
compiled here with torch.utils.cpp_extension (needs a C++ compiler; forward only, no autograd). Batch shape of
the profile in bench/RESULTS.md: 580 atoms, 9 200 edges. Prints median thread CPU time per call of each (called in turn).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>
torch::Tensor gather_mul_scatter(torch::Tensor x, torch::Tensor w, torch::Tensor i, torch::Tensor j, int64_t n) {
  auto out = torch::zeros({n, x.size(1), x.size(2)}, x.options());
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  const int64_t *I = i.data_ptr<int64_t>(), *J = j.data_ptr<int64_t>();
  float *O = out.data_ptr<float>();
  const int64_t E = i.size(0), C = x.size(1), F = x.size(2);
  for (int64_t e = 0; e < E; ++e) {
    const float *we = W + e * F, *xj = X + J[e] * C * F;
    float *oi = O + I[e] * C * F;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t f = 0; f < F; ++f) oi[c * F + f] += we[f] * xj[c * F + f];
  }
  return out;
}
"""


def medians_ms(fns, repeats: int) -> list[float]:
    """Median thread CPU time (ms) per call of each function, called in turn (A B A B …: load changes hit both)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.thread_time()
            fn()
            times[k].append(time.thread_time() - t)
    return [1000 * sorted(ts)[len(ts) // 2] for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--atoms", type=int, default=580)
    ap.add_argument("--edges", type=int, default=9200)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ext = load_inline("multifi_bench_gms", cpp_sources=SOURCE, functions=["gather_mul_scatter"], extra_cflags=["-O3"])
    n, e, f = args.atoms, args.edges, args.features
    torch.manual_seed(0)
    x, w = torch.randn(n, 3, f), torch.randn(e, f)
    i, j = torch.sort(torch.randint(0, n, (e,)))[0], torch.randint(0, n, (e,))

    def eager():
        return torch.zeros(n, 3, f).index_add_(0, i, w.unsqueeze(1) * x.index_select(0, j))

    def fused():
        return ext.gather_mul_scatter(x, w, i, j, n)

    assert torch.allclose(eager(), fused(), atol=1e-4)
    for _ in range(5):  # first touches of the allocator's pages are not what a training step pays
        eager(), fused()
    a, b = medians_ms([eager, fused], args.repeats)
    print(f"[{n} atoms, {e} edges, F = {f}] eager {a:.2f} ms, fused {b:.2f} ms per call: {a / b:.1f}x")


if __name__ == "__main__":
    main()
