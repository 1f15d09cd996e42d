// Prototype kernels of bench/variants/silu/bench.py: g·silu′(x) and the two partials of g·silu′(x) (dx = gg·g·silu″(x),
// dg = gg·silu′(x)) from x and s = σ(x), one pass each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
namespace {
template <typename T>
void grad1(const T* x, const T* s, const T* g, T* out, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = g[i] * (s[i] * (T(1) + x[i] * (T(1) - s[i])));
  });
}
template <typename T>
void grad2(const T* x, const T* s, const T* g, const T* gg, T* dx, T* dg, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T si = s[i], xi = x[i];
      dg[i] = gg[i] * (si * (T(1) + xi * (T(1) - si)));
      dx[i] = gg[i] * g[i] * (si * (T(1) - si) * (T(2) + xi * (T(1) - T(2) * si)));
    }
  });
}
at::Tensor silu_grad(const at::Tensor& x, const at::Tensor& s, const at::Tensor& g) {
  auto xc = x.contiguous(), sc = s.contiguous(), gc = g.contiguous();
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "silu_grad", [&] {
    grad1<scalar_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), xc.numel());
  });
  return out;
}
std::tuple<at::Tensor, at::Tensor> silu_grad2(const at::Tensor& x, const at::Tensor& s, const at::Tensor& g, const at::Tensor& gg) {
  auto xc = x.contiguous(), sc = s.contiguous(), gc = g.contiguous(), ggc = gg.contiguous();
  auto dx = at::empty_like(xc), dg = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "silu_grad2", [&] {
    grad2<scalar_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), ggc.data_ptr<scalar_t>(),
                    dx.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(), xc.numel());
  });
  return {dx, dg};
}
}
TORCH_LIBRARY(silu_proto, m) {
  m.def("silu_grad(Tensor x, Tensor s, Tensor g) -> Tensor");
  m.def("silu_grad2(Tensor x, Tensor s, Tensor g, Tensor gg) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(silu_proto, CPU, m) {
  m.impl("silu_grad", &silu_grad);
  m.impl("silu_grad2", &silu_grad2);
}
