// Fused gather-multiply-scatter for message passing on the CPU (multifi/nn/fused.py builds and wraps it).
//
// segment_sum: out = base + S, where, over the edges e of row d (order[ptr[d] .. ptr[d+1]), or the edges
//   ptr[d] .. ptr[d+1] themselves when order is empty, i.e. edges already sorted by row),
//     u empty:                       S[d, c, f] = sum_e x[src[e], c, f] * w[e, f]
//     u [E, 3], x [N, 1, F] ("spread"):   S[d, a, f] = sum_e x[src[e], 0, f] * w[e, f] * u[e, a]
//     u [E, 3], x [N, 3, F] ("contract"): S[d, 0, f] = sum_e w[e, f] * sum_a x[src[e], a, f] * u[e, a]
//   One pass over the edges, no edge-sized tensor; rows are independent, so they run in parallel, and each
//   row sums its edges in the given order (deterministic for any thread count).
// edge_dot: out[e, f] = sum_c g[dst[e], c, f] * x[src[e], c, f], or with u [E, 3] and x [N, 1, F]
//   sum_a g[dst[e], a, f] * u[e, a] * x[src[e], 0, f]: the gradient of segment_sum with respect to w.
// edge_dot_unit: out[e, a] = sum_f g[dst[e], a, f] * x[src[e], 0, f] * w[e, f], the gradient of the spread
//   mode with respect to u.
// silu_grad: g * silu'(x) from x and s = sigmoid(x); silu_grad2: its two partials, gg * g * silu''(x) (x) and
//   gg * silu'(x) (g), with silu'(x) = s (1 + x (1 - s)) and silu''(x) = s (1 - s) (2 + x (1 - 2 s)): one
//   arithmetic pass each where torch's double backward of SiLU takes about ten. silu_grad_merged: the gradient
//   of x from both derivatives, ge * silu'(x) + gg * g * silu''(x), one pass where silu_grad2, silu_backward and
//   autograd's sum take three.
// gate_value, gate_grad, gate_grad2: silu(a) sigmoid(g) f (M3GNet's gates times their radial filter), its first
//   derivatives and their derivatives, one arithmetic pass each (see the gate namespace below);
//   gate_grad2_dgo and gate_grad_merged: gate_grad2 split so that one pass also adds gate_grad's part.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>  // on glibc this brings <features.h>, which defines __GLIBC__ for the test below

// The loops are compiled three times, for AVX-512, AVX2 and baseline x86-64, and the CPU picks one when the library
// loads (GCC's function multiversioning, through glibc's ifunc): one build runs the widest vectors each CPU has
// (baseline alone ran segment_sum 1.6-1.9x and gate_grad2 1.9x slower on an AVX-512 CPU). Elsewhere (clang, which
// does not multiversion templates; musl, which has no ifunc; other CPUs) the compiler's default target.
// The loops are written so that results do not depend on the vector width (no reordered sums; fused.py builds them
// with -ffp-contract=off, and with -fno-trapping-math, without which conditional selects kept loops scalar).
// MULTIFI_KERNEL_ISA=avx2 or baseline in the environment (nn/fused.py) leaves out the wider versions, e.g. to measure
// on an AVX-512 CPU how a CPU without it runs.
#if defined(MULTIFI_ISA_BASELINE)
#define MULTIFI_TARGETS "default"
#elif defined(MULTIFI_ISA_AVX2)
#define MULTIFI_TARGETS "default", "avx2"
#else
#define MULTIFI_TARGETS "default", "avx2", "avx512f"
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define MULTIFI_CLONES __attribute__((target_clones(MULTIFI_TARGETS)))
#else
#define MULTIFI_CLONES
#endif

namespace {

enum Mode { PLAIN, SPREAD, CONTRACT };

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous 1-d int64 tensor");
}

// every index in [0, n): an out-of-range index would read or write outside a tensor. A plain loop, not
// aminmax + item: on a small molecule those ATen calls cost more than the kernel itself.
void check_range(const at::Tensor& t, int64_t n, const char* name) {
  const int64_t* v = t.data_ptr<int64_t>();
  bool inside = true;
  for (int64_t i = 0, m = t.numel(); i < m; ++i) inside &= (v[i] >= 0) & (v[i] < n);
  TORCH_CHECK(inside, name, " holds an index outside [0, ", n, ")");
}

// ptr rises from 0 to n_edges (D + 1 entries)
bool rises_to(const at::Tensor& ptr, int64_t n_edges) {
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t m = ptr.numel();
  bool rising = p[0] == 0 && p[m - 1] == n_edges;
  for (int64_t i = 1; i < m; ++i) rising &= p[i] >= p[i - 1];
  return rising;
}

Mode mode_of(const at::Tensor& base, const at::Tensor& x, const at::Tensor& u) {
  if (u.dim() != 2) {  // no unit vectors: an empty 1-d tensor
    TORCH_CHECK(x.size(1) == base.size(1), "segment_sum: x and base differ in channels");
    return PLAIN;
  }
  TORCH_CHECK(u.dim() == 2 && u.size(1) == 3 && u.is_contiguous() && u.scalar_type() == x.scalar_type(),
              "segment_sum: u must be a contiguous [E, 3] tensor of x's dtype");
  if (x.size(1) == 1 && base.size(1) == 3) return SPREAD;
  TORCH_CHECK(x.size(1) == 3 && base.size(1) == 1, "segment_sum with u: x [N,1,F] -> [D,3,F] or x [N,3,F] -> [D,1,F]");
  return CONTRACT;
}

// rows begin .. end of segment_sum (a function of its own, not a lambda, so that it is compiled per target)
template <typename T, Mode M>
MULTIFI_CLONES void segment_range(const T* X, const T* W, const T* U, const int64_t* S, const int64_t* P,
                                  const int64_t* O, T* Y, int64_t C, int64_t F, int64_t begin, int64_t end) {
  const int64_t CX = (M == PLAIN ? C : (M == SPREAD ? 1 : 3)) * F;  // row length of x
  const int64_t CY = (M == PLAIN ? C : (M == SPREAD ? 3 : 1)) * F;  // row length of out
  for (int64_t d = begin; d < end; ++d) {
    T* y = Y + d * CY;
    for (int64_t k = P[d]; k < P[d + 1]; ++k) {
      const int64_t e = O ? O[k] : k;
      const T* we = W + e * F;
      const T* xe = X + S[e] * CX;
      if (M == PLAIN) {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t f = 0; f < F; ++f) y[c * F + f] += xe[c * F + f] * we[f];
      } else if (M == SPREAD) {
        const T* ue = U + 3 * e;
        for (int64_t a = 0; a < 3; ++a) {
          const T ua = ue[a];
          for (int64_t f = 0; f < F; ++f) y[a * F + f] += xe[f] * we[f] * ua;
        }
      } else {
        const T u0 = U[3 * e], u1 = U[3 * e + 1], u2 = U[3 * e + 2];
        for (int64_t f = 0; f < F; ++f) y[f] += we[f] * (xe[f] * u0 + xe[F + f] * u1 + xe[2 * F + f] * u2);
      }
    }
  }
}

template <typename T, Mode M>
void segment_rows(const T* X, const T* W, const T* U, const int64_t* S, const int64_t* P, const int64_t* O, T* Y,
                  int64_t D, int64_t C, int64_t F) {
  at::parallel_for(0, D, 16, [&](int64_t begin, int64_t end) {
    segment_range<T, M>(X, W, U, S, P, O, Y, C, F, begin, end);
  });
}

at::Tensor segment_sum(const at::Tensor& base, const at::Tensor& x, const at::Tensor& w, const at::Tensor& u,
                       const at::Tensor& src, const at::Tensor& ptr, const at::Tensor& order) {
  TORCH_CHECK(x.dim() == 3 && base.dim() == 3 && w.dim() == 2, "segment_sum: base [D,C,F], x [N,C,F], w [E,F]");
  TORCH_CHECK(x.size(2) == base.size(2) && w.size(1) == x.size(2), "segment_sum: feature sizes differ");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.scalar_type() == base.scalar_type(),
              "segment_sum: dtypes differ");
  check_index(src, "src");
  check_index(ptr, "ptr");
  check_index(order, "order");
  TORCH_CHECK(ptr.numel() == base.size(0) + 1, "segment_sum: ptr must have D + 1 entries");
  TORCH_CHECK(src.numel() == w.size(0), "segment_sum: src and w differ in edges");
  const Mode mode = mode_of(base, x, u);
  TORCH_CHECK(mode == PLAIN || u.size(0) == w.size(0), "segment_sum: u and w differ in edges");
  const int64_t n_edges = w.size(0);
  TORCH_CHECK(order.numel() == 0 || order.numel() == n_edges, "segment_sum: order must list every edge");
  TORCH_CHECK(rises_to(ptr, n_edges), "segment_sum: ptr must rise from 0 to the number of edges");
  check_range(src, x.size(0), "segment_sum: src");
  check_range(order, n_edges, "segment_sum: order");
  at::Tensor out = base.contiguous().clone();
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t D = base.size(0), C = x.size(1), F = x.size(2);
  const int64_t* S = src.data_ptr<int64_t>();
  const int64_t* P = ptr.data_ptr<int64_t>();
  const int64_t* O = order.numel() ? order.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "segment_sum", [&] {
    const scalar_t* X = xc.data_ptr<scalar_t>();
    const scalar_t* W = wc.data_ptr<scalar_t>();
    const scalar_t* U = mode == PLAIN ? nullptr : u.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    if (mode == PLAIN)
      segment_rows<scalar_t, PLAIN>(X, W, U, S, P, O, Y, D, C, F);
    else if (mode == SPREAD)
      segment_rows<scalar_t, SPREAD>(X, W, U, S, P, O, Y, D, C, F);
    else
      segment_rows<scalar_t, CONTRACT>(X, W, U, S, P, O, Y, D, C, F);
  });
  return out;
}

// edges begin .. end of edge_dot (compiled per target, as segment_range)
template <typename T>
MULTIFI_CLONES void edge_dot_range(const T* G, const T* X, const T* U, const int64_t* Dd, const int64_t* S, T* Y,
                                   bool spread, int64_t C, int64_t F, int64_t CG, int64_t CX, int64_t begin,
                                   int64_t end) {
  for (int64_t e = begin; e < end; ++e) {
    const T* ge = G + Dd[e] * CG;
    const T* xe = X + S[e] * CX;
    T* y = Y + e * F;
    if (spread) {
      const T u0 = U[3 * e], u1 = U[3 * e + 1], u2 = U[3 * e + 2];
      for (int64_t f = 0; f < F; ++f) y[f] = (ge[f] * u0 + ge[F + f] * u1 + ge[2 * F + f] * u2) * xe[f];
    } else {
      for (int64_t f = 0; f < F; ++f) y[f] = ge[f] * xe[f];
      for (int64_t c = 1; c < C; ++c)
        for (int64_t f = 0; f < F; ++f) y[f] += ge[c * F + f] * xe[c * F + f];
    }
  }
}

at::Tensor edge_dot(const at::Tensor& g, const at::Tensor& x, const at::Tensor& u, const at::Tensor& dst,
                    const at::Tensor& src) {
  TORCH_CHECK(g.dim() == 3 && x.dim() == 3 && g.size(2) == x.size(2), "edge_dot: g [D,C,F], x [N,C,F]");
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "edge_dot: dtypes differ");
  check_index(dst, "dst");
  check_index(src, "src");
  const bool spread = u.dim() == 2;
  if (spread) {
    TORCH_CHECK(g.size(1) == 3 && x.size(1) == 1 && u.dim() == 2 && u.size(0) == dst.numel() && u.size(1) == 3 &&
                    u.is_contiguous() && u.scalar_type() == x.scalar_type(),
                "edge_dot with u: g [D,3,F], x [N,1,F], u [E,3]");
  } else {
    TORCH_CHECK(g.size(1) == x.size(1), "edge_dot: g and x differ in channels");
  }
  TORCH_CHECK(src.numel() == dst.numel(), "edge_dot: src and dst differ in edges");
  check_range(dst, g.size(0), "edge_dot: dst");
  check_range(src, x.size(0), "edge_dot: src");
  const int64_t E = dst.numel(), C = g.size(1), F = x.size(2), CG = C * F, CX = x.size(1) * F;
  at::Tensor gc = g.contiguous(), xc = x.contiguous();
  at::Tensor out = at::empty({E, F}, x.options());
  const int64_t* Dd = dst.data_ptr<int64_t>();
  const int64_t* S = src.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "edge_dot", [&] {
    const scalar_t* G = gc.data_ptr<scalar_t>();
    const scalar_t* X = xc.data_ptr<scalar_t>();
    const scalar_t* U = spread ? u.data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = out.data_ptr<scalar_t>();
    at::parallel_for(0, E, 256, [&](int64_t begin, int64_t end) {
      edge_dot_range<scalar_t>(G, X, U, Dd, S, Y, spread, C, F, CG, CX, begin, end);
    });
  });
  return out;
}

at::Tensor edge_dot_unit(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& dst,
                         const at::Tensor& src) {
  TORCH_CHECK(g.dim() == 3 && g.size(1) == 3 && x.dim() == 3 && x.size(1) == 1 && w.dim() == 2 &&
                  g.size(2) == x.size(2) && w.size(1) == x.size(2),
              "edge_dot_unit: g [D,3,F], x [N,1,F], w [E,F]");
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && w.scalar_type() == x.scalar_type(), "edge_dot_unit: dtypes differ");
  check_index(dst, "dst");
  check_index(src, "src");
  TORCH_CHECK(dst.numel() == w.size(0) && src.numel() == w.size(0), "edge_dot_unit: edges differ");
  check_range(dst, g.size(0), "edge_dot_unit: dst");
  check_range(src, x.size(0), "edge_dot_unit: src");
  const int64_t E = dst.numel(), F = x.size(2);
  at::Tensor gc = g.contiguous(), xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty({E, 3}, x.options());
  const int64_t* Dd = dst.data_ptr<int64_t>();
  const int64_t* S = src.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "edge_dot_unit", [&] {
    const scalar_t* G = gc.data_ptr<scalar_t>();
    const scalar_t* X = xc.data_ptr<scalar_t>();
    const scalar_t* W = wc.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    at::parallel_for(0, E, 256, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const scalar_t* ge = G + Dd[e] * 3 * F;
        const scalar_t* xe = X + S[e] * F;
        const scalar_t* we = W + e * F;
        for (int64_t a = 0; a < 3; ++a) {
          scalar_t acc = 0;
          for (int64_t f = 0; f < F; ++f) acc += ge[a * F + f] * (xe[f] * we[f]);
          Y[3 * e + a] = acc;
        }
      }
    });
  });
  return out;
}

void check_alike(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), name, ": tensors of one shape and dtype");
}

#define R __restrict__
template <typename T>
MULTIFI_CLONES void silu_grad_loop(const T* R x, const T* R s, const T* R g, T* R out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = g[k] * (s[k] * (T(1) + x[k] * (T(1) - s[k])));
}

template <typename T>
MULTIFI_CLONES void silu_grad2_loop(const T* R x, const T* R s, const T* R g, const T* R gg, T* R dx, T* R dg,
                                    int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T sk = s[k], xk = x[k];
    dg[k] = gg[k] * (sk * (T(1) + xk * (T(1) - sk)));
    dx[k] = gg[k] * g[k] * (sk * (T(1) - sk) * (T(2) + xk * (T(1) - T(2) * sk)));
  }
}
// silu_grad_merged: ge * silu'(x) + gg * g * silu''(x), the gradient of x from both of SiLU's derivatives
template <typename T>
MULTIFI_CLONES void silu_grad_merged_loop(const T* R x, const T* R s, const T* R ge, const T* R gg, const T* R g,
                                          T* R dx, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T sk = s[k], xk = x[k];
    const T d1 = sk * (T(1) + xk * (T(1) - sk));
    const T d2 = sk * (T(1) - sk) * (T(2) + xk * (T(1) - T(2) * sk));
    dx[k] = ge[k] * d1 + gg[k] * g[k] * d2;
  }
}
#undef R

at::Tensor silu_grad(const at::Tensor& x, const at::Tensor& s, const at::Tensor& g) {
  check_alike(x, s, "silu_grad");
  check_alike(x, g, "silu_grad");
  auto xc = x.contiguous(), sc = s.contiguous(), gc = g.contiguous();
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "silu_grad", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *sp = sc.data_ptr<scalar_t>(), *gp = gc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), 4096,
                     [=](int64_t b, int64_t e) { silu_grad_loop(xp + b, sp + b, gp + b, op + b, e - b); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_grad2(const at::Tensor& x, const at::Tensor& s, const at::Tensor& g,
                                              const at::Tensor& gg) {
  check_alike(x, s, "silu_grad2");
  check_alike(x, g, "silu_grad2");
  check_alike(x, gg, "silu_grad2");
  auto xc = x.contiguous(), sc = s.contiguous(), gc = g.contiguous(), ggc = gg.contiguous();
  auto dx = at::empty_like(xc), dg = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "silu_grad2", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *sp = sc.data_ptr<scalar_t>(), *gp = gc.data_ptr<scalar_t>();
    const scalar_t* ggp = ggc.data_ptr<scalar_t>();
    scalar_t *dxp = dx.data_ptr<scalar_t>(), *dgp = dg.data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), 4096, [=](int64_t b, int64_t e) {
      silu_grad2_loop(xp + b, sp + b, gp + b, ggp + b, dxp + b, dgp + b, e - b);
    });
  });
  return {dx, dg};
}

at::Tensor silu_grad_merged(const at::Tensor& x, const at::Tensor& s, const at::Tensor& ge, const at::Tensor& gg,
                            const at::Tensor& g) {
  for (const auto* t : {&s, &ge, &gg, &g}) check_alike(x, *t, "silu_grad_merged");
  auto xc = x.contiguous(), sc = s.contiguous(), gec = ge.contiguous(), ggc = gg.contiguous(), gc = g.contiguous();
  auto dx = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "silu_grad_merged", [&] {
    using T = scalar_t;
    const T *xp = xc.data_ptr<T>(), *sp = sc.data_ptr<T>(), *gep = gec.data_ptr<T>(), *ggp = ggc.data_ptr<T>();
    const T* gp = gc.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    at::parallel_for(0, xc.numel(), 4096, [=](int64_t b, int64_t e) {
      silu_grad_merged_loop(xp + b, sp + b, gep + b, ggp + b, gp + b, dxp + b, e - b);
    });
  });
  return dx;
}

// The gate of M3GNet's gated MLPs, y = silu(a) sigmoid(g) f (f, a filter, optional: an empty tensor), from a, its
// sigmoid sa and the sigmoid sg of g; its first derivatives given go = dL/dy, and their derivatives given Ga, Gg,
// Gf = dL/d(da, dg, df). With A = silu(a): A' = sa (1 + a (1 - sa)), A'' = sa (1 - sa) (2 + a (1 - 2 sa));
// B = sg: B' = sg (1 - sg), B'' = B' (1 - 2 sg).
namespace gate {
template <typename T>
struct Terms {
  T A, dA, ddA, B, dB, ddB;
  Terms(T a, T sa, T sg) {
    const T one(1), two(2);
    A = a * sa;
    dA = sa * (one + a * (one - sa));
    ddA = sa * (one - sa) * (two + a * (one - two * sa));
    B = sg;
    dB = sg * (one - sg);
    ddB = dB * (one - two * sg);
  }
};

// The kernels' tensors in the order (go, a, sa, sg, f[, Ga, Gg, Gf]), each of go's shape and dtype, contiguous;
// f and Gf (positions 4 and 7) are not looked at without a filter
std::vector<at::Tensor> inputs(std::vector<at::Tensor> ts, bool has_f, const char* name) {
  for (size_t k = 1; k < ts.size(); ++k) {
    if (!has_f && (k == 4 || k == 7)) continue;  // f and Gf absent
    check_alike(ts[0], ts[k], name);
  }
  for (auto& t : ts) t = t.contiguous();
  return ts;
}
}  // namespace gate

// The loops take restrict pointers and a compile-time HAS_F: with captured references, a run-time branch inside
// or pointers that may overlap (too many pairs to check) the compiler did not vectorise them (3-7x slower)
#define R __restrict__
template <typename T, bool HAS_F>
MULTIFI_CLONES void gate_value_loop(const T* R a, const T* R sa, const T* R sg, const T* R f, T* R out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T y = a[k] * sa[k] * sg[k];
    out[k] = HAS_F ? y * f[k] : y;
  }
}

template <typename T, bool HAS_F>
MULTIFI_CLONES void gate_grad_loop(const T* R go, const T* R a, const T* R sa, const T* R sg, const T* R f, T* R da, T* R dg,
                    T* R df, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const gate::Terms<T> q(a[k], sa[k], sg[k]);
    const T fk = HAS_F ? f[k] : T(1), g = go[k];
    da[k] = g * q.dA * q.B * fk;
    dg[k] = g * q.A * q.dB * fk;
    if (HAS_F) df[k] = g * q.A * q.B;
  }
}

template <typename T, bool HAS_F>
MULTIFI_CLONES void gate_grad2_loop(const T* R go, const T* R a, const T* R sa, const T* R sg, const T* R f, const T* R Ga,
                     const T* R Gg, const T* R Gf, T* R dgo, T* R da, T* R dg, T* R df, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const gate::Terms<T> q(a[k], sa[k], sg[k]);
    const T fk = HAS_F ? f[k] : T(1), Gfk = HAS_F ? Gf[k] : T(0);
    const T g = go[k], ga = Ga[k], gg = Gg[k];
    dgo[k] = (ga * q.dA * q.B + gg * q.A * q.dB) * fk + Gfk * q.A * q.B;
    da[k] = g * ((ga * q.ddA * q.B + gg * q.dA * q.dB) * fk + Gfk * q.dA * q.B);
    dg[k] = g * ((ga * q.dA * q.dB + gg * q.A * q.ddB) * fk + Gfk * q.A * q.dB);
    if (HAS_F) df[k] = g * (ga * q.dA * q.B + gg * q.A * q.dB);
  }
}

// gate_grad2's dgo alone, and gate_grad's (da, dg, df) for ge plus gate_grad2's for (go, Ga, Gg, Gf) in one pass:
// the two halves of the loss's gradient of a gate that force training reaches both ways (see nn/fused.py)
template <typename T, bool HAS_F>
MULTIFI_CLONES void gate_grad2_dgo_loop(const T* R a, const T* R sa, const T* R sg, const T* R f, const T* R Ga,
                                        const T* R Gg, const T* R Gf, T* R dgo, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const gate::Terms<T> q(a[k], sa[k], sg[k]);
    const T fk = HAS_F ? f[k] : T(1), Gfk = HAS_F ? Gf[k] : T(0);
    dgo[k] = (Ga[k] * q.dA * q.B + Gg[k] * q.A * q.dB) * fk + Gfk * q.A * q.B;
  }
}

template <typename T, bool HAS_F>
MULTIFI_CLONES void gate_grad_merged_loop(const T* R ge, const T* R go, const T* R a, const T* R sa, const T* R sg,
                                          const T* R f, const T* R Ga, const T* R Gg, const T* R Gf, T* R da,
                                          T* R dg, T* R df, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const gate::Terms<T> q(a[k], sa[k], sg[k]);
    const T fk = HAS_F ? f[k] : T(1), Gfk = HAS_F ? Gf[k] : T(0);
    const T e = ge[k], g = go[k], ga = Ga[k], gg = Gg[k];
    da[k] = e * q.dA * q.B * fk + g * ((ga * q.ddA * q.B + gg * q.dA * q.dB) * fk + Gfk * q.dA * q.B);
    dg[k] = e * q.A * q.dB * fk + g * ((ga * q.dA * q.dB + gg * q.A * q.ddB) * fk + Gfk * q.A * q.dB);
    if (HAS_F) df[k] = e * q.A * q.B + g * (ga * q.dA * q.B + gg * q.A * q.dB);
  }
}

#undef R

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mut(at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

at::Tensor gate_value(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& sg, const at::Tensor& f,
                      bool has_f) {
  auto t = gate::inputs({a, a, sa, sg, has_f ? f : a}, has_f, "gate_value");  // no go: a in its place
  auto out = at::empty_like(t[0]);
  AT_DISPATCH_FLOATING_TYPES(t[0].scalar_type(), "gate_value", [&] {
    using T = scalar_t;
    const T *A = ptr<T>(t[1]), *SA = ptr<T>(t[2]), *SG = ptr<T>(t[3]), *Fp = ptr<T>(t[4]);
    T* O = mut<T>(out);
    at::parallel_for(0, t[0].numel(), 4096, [=](int64_t b, int64_t e) {
      if (has_f) gate_value_loop<T, true>(A + b, SA + b, SG + b, Fp + b, O + b, e - b);
      else gate_value_loop<T, false>(A + b, SA + b, SG + b, nullptr, O + b, e - b);
    });
  });
  return out;
}

// (da, dg, df): df empty without f
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_grad(const at::Tensor& go, const at::Tensor& a,
                                                        const at::Tensor& sa, const at::Tensor& sg,
                                                        const at::Tensor& f, bool has_f) {
  auto t = gate::inputs({go, a, sa, sg, has_f ? f : go}, has_f, "gate_grad");
  auto da = at::empty_like(t[0]), dg = at::empty_like(t[0]);
  auto df = has_f ? at::empty_like(t[0]) : at::empty({0}, t[0].options());
  AT_DISPATCH_FLOATING_TYPES(t[0].scalar_type(), "gate_grad", [&] {
    using T = scalar_t;
    const T *G = ptr<T>(t[0]), *A = ptr<T>(t[1]), *SA = ptr<T>(t[2]), *SG = ptr<T>(t[3]), *Fp = ptr<T>(t[4]);
    T *DA = mut<T>(da), *DG = mut<T>(dg), *DF = mut<T>(df);
    at::parallel_for(0, t[0].numel(), 4096, [=](int64_t b, int64_t e) {
      if (has_f) gate_grad_loop<T, true>(G + b, A + b, SA + b, SG + b, Fp + b, DA + b, DG + b, DF + b, e - b);
      else gate_grad_loop<T, false>(G + b, A + b, SA + b, SG + b, nullptr, DA + b, DG + b, nullptr, e - b);
    });
  });
  return {da, dg, df};
}

// (dgo, da, dg, df): the derivatives of gate_grad's outputs contracted with Ga, Gg, Gf (Gf and df empty without f)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_grad2(const at::Tensor& go, const at::Tensor& a,
                                                                      const at::Tensor& sa, const at::Tensor& sg,
                                                                      const at::Tensor& f, const at::Tensor& Ga,
                                                                      const at::Tensor& Gg, const at::Tensor& Gf,
                                                                      bool has_f) {
  auto t = gate::inputs({go, a, sa, sg, has_f ? f : go, Ga, Gg, has_f ? Gf : go}, has_f, "gate_grad2");
  auto dgo = at::empty_like(t[0]), da = at::empty_like(t[0]), dg = at::empty_like(t[0]);
  auto df = has_f ? at::empty_like(t[0]) : at::empty({0}, t[0].options());
  AT_DISPATCH_FLOATING_TYPES(t[0].scalar_type(), "gate_grad2", [&] {
    using T = scalar_t;
    const T *G = ptr<T>(t[0]), *A = ptr<T>(t[1]), *SA = ptr<T>(t[2]), *SG = ptr<T>(t[3]), *Fp = ptr<T>(t[4]);
    const T *GA = ptr<T>(t[5]), *GG = ptr<T>(t[6]), *GF = ptr<T>(t[7]);
    T *DGO = mut<T>(dgo), *DA = mut<T>(da), *DG = mut<T>(dg), *DF = mut<T>(df);
    at::parallel_for(0, t[0].numel(), 4096, [=](int64_t b, int64_t e) {
      if (has_f)
        gate_grad2_loop<T, true>(G + b, A + b, SA + b, SG + b, Fp + b, GA + b, GG + b, GF + b, DGO + b, DA + b,
                                 DG + b, DF + b, e - b);
      else
        gate_grad2_loop<T, false>(G + b, A + b, SA + b, SG + b, nullptr, GA + b, GG + b, nullptr, DGO + b, DA + b,
                                  DG + b, nullptr, e - b);
    });
  });
  return {dgo, da, dg, df};
}

at::Tensor gate_grad2_dgo(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& sg, const at::Tensor& f,
                          const at::Tensor& Ga, const at::Tensor& Gg, const at::Tensor& Gf, bool has_f) {
  auto t = gate::inputs({a, a, sa, sg, has_f ? f : a, Ga, Gg, has_f ? Gf : a}, has_f, "gate_grad2_dgo");
  auto dgo = at::empty_like(t[0]);
  AT_DISPATCH_FLOATING_TYPES(t[0].scalar_type(), "gate_grad2_dgo", [&] {
    using T = scalar_t;
    const T *A = ptr<T>(t[1]), *SA = ptr<T>(t[2]), *SG = ptr<T>(t[3]), *Fp = ptr<T>(t[4]);
    const T *GA = ptr<T>(t[5]), *GG = ptr<T>(t[6]), *GF = ptr<T>(t[7]);
    T* DGO = mut<T>(dgo);
    at::parallel_for(0, t[0].numel(), 4096, [=](int64_t b, int64_t e) {
      if (has_f)
        gate_grad2_dgo_loop<T, true>(A + b, SA + b, SG + b, Fp + b, GA + b, GG + b, GF + b, DGO + b, e - b);
      else
        gate_grad2_dgo_loop<T, false>(A + b, SA + b, SG + b, nullptr, GA + b, GG + b, nullptr, DGO + b, e - b);
    });
  });
  return dgo;
}

// (da, dg, df) of gate_grad for ge plus those of gate_grad2 for (go, Ga, Gg, Gf); df empty without f
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_grad_merged(const at::Tensor& ge, const at::Tensor& go,
                                                               const at::Tensor& a, const at::Tensor& sa,
                                                               const at::Tensor& sg, const at::Tensor& f,
                                                               const at::Tensor& Ga, const at::Tensor& Gg,
                                                               const at::Tensor& Gf, bool has_f) {
  auto t = gate::inputs({go, a, sa, sg, has_f ? f : go, Ga, Gg, has_f ? Gf : go, ge}, has_f, "gate_grad_merged");
  auto da = at::empty_like(t[0]), dg = at::empty_like(t[0]);
  auto df = has_f ? at::empty_like(t[0]) : at::empty({0}, t[0].options());
  AT_DISPATCH_FLOATING_TYPES(t[0].scalar_type(), "gate_grad_merged", [&] {
    using T = scalar_t;
    const T *G = ptr<T>(t[0]), *A = ptr<T>(t[1]), *SA = ptr<T>(t[2]), *SG = ptr<T>(t[3]), *Fp = ptr<T>(t[4]);
    const T *GA = ptr<T>(t[5]), *GG = ptr<T>(t[6]), *GF = ptr<T>(t[7]), *GE = ptr<T>(t[8]);
    T *DA = mut<T>(da), *DG = mut<T>(dg), *DF = mut<T>(df);
    at::parallel_for(0, t[0].numel(), 4096, [=](int64_t b, int64_t e) {
      if (has_f)
        gate_grad_merged_loop<T, true>(GE + b, G + b, A + b, SA + b, SG + b, Fp + b, GA + b, GG + b, GF + b, DA + b,
                                       DG + b, DF + b, e - b);
      else
        gate_grad_merged_loop<T, false>(GE + b, G + b, A + b, SA + b, SG + b, nullptr, GA + b, GG + b, nullptr,
                                        DA + b, DG + b, nullptr, e - b);
    });
  });
  return {da, dg, df};
}

}  // namespace

TORCH_LIBRARY(multifi_fused, m) {
  m.def("segment_sum(Tensor base, Tensor x, Tensor w, Tensor u, Tensor src, Tensor ptr, Tensor order) -> Tensor");
  m.def("edge_dot(Tensor g, Tensor x, Tensor u, Tensor dst, Tensor src) -> Tensor");
  m.def("edge_dot_unit(Tensor g, Tensor x, Tensor w, Tensor dst, Tensor src) -> Tensor");
  m.def("silu_grad(Tensor x, Tensor s, Tensor g) -> Tensor");
  m.def("silu_grad2(Tensor x, Tensor s, Tensor g, Tensor gg) -> (Tensor, Tensor)");
  m.def("silu_grad_merged(Tensor x, Tensor s, Tensor ge, Tensor gg, Tensor g) -> Tensor");
  m.def("gate_value(Tensor a, Tensor sa, Tensor sg, Tensor f, bool has_f) -> Tensor");
  m.def("gate_grad(Tensor go, Tensor a, Tensor sa, Tensor sg, Tensor f, bool has_f) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gate_grad2(Tensor go, Tensor a, Tensor sa, Tensor sg, Tensor f, Tensor Ga, Tensor Gg, Tensor Gf, bool has_f) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gate_grad2_dgo(Tensor a, Tensor sa, Tensor sg, Tensor f, Tensor Ga, Tensor Gg, Tensor Gf, bool has_f) "
      "-> Tensor");
  m.def(
      "gate_grad_merged(Tensor ge, Tensor go, Tensor a, Tensor sa, Tensor sg, Tensor f, Tensor Ga, Tensor Gg, "
      "Tensor Gf, bool has_f) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(multifi_fused, CPU, m) {
  m.impl("segment_sum", &segment_sum);
  m.impl("edge_dot", &edge_dot);
  m.impl("edge_dot_unit", &edge_dot_unit);
  m.impl("silu_grad", &silu_grad);
  m.impl("silu_grad2", &silu_grad2);
  m.impl("silu_grad_merged", &silu_grad_merged);
  m.impl("gate_value", &gate_value);
  m.impl("gate_grad", &gate_grad);
  m.impl("gate_grad2", &gate_grad2);
  m.impl("gate_grad2_dgo", &gate_grad2_dgo);
  m.impl("gate_grad_merged", &gate_grad_merged);
}
