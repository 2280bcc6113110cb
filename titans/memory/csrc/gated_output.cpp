// The memory layer's output gate on the CPU: layer._GatedOutput's elementwise passes, fused.
//
//     z = RMSNorm_D(y) * w * SiLU(g)   per head (groups of D channels), then out = z @ w_out^T (Python).
//
// y, g: (B, n, C = H * D) with contiguous rows (y is the memory's read, laid out (B, T, H, D)); w (D).
// The forward writes z; the backward, given dz = d out @ w_out, writes z (for d w_out = d out^T z),
// dg and dy, and returns d w. SiLU and sigmoid are ATen's (vectorised), per tile on the tile's thread;
// everything else is one pass over the tile's rows. Tiles of rows split across the threads.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <mutex>

namespace {

using at::Tensor;
using titans::Rows;

constexpr int64_t kRows = 32;  // rows per task

void check_rows(const Tensor& x, const char* name, const Tensor& like) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.sizes() == like.sizes() && x.stride(2) == 1 &&
                  x.scalar_type() == like.scalar_type(),
              "gated output: ", name, " must be a CPU ", like.sizes(), " tensor of dtype ", like.scalar_type(),
              " with contiguous rows, got ", x.sizes(), " ", x.scalar_type());
}

// 1 / RMS of the D values at x.
template <typename T>
T rms_scale(const T* x, int64_t D, T eps) {
  T ss = T(0);
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
  return T(1) / std::sqrt(ss / T(D) + eps);
}

template <typename T>
void forward_row(const T* y, const T* sg, const T* w, int64_t H, int64_t D, T eps, T* z) {
  for (int64_t h = 0; h < H; ++h) {
    const T *yh = y + h * D, *sh = sg + h * D;
    T* zh = z + h * D;
    const T r = rms_scale(yh, D, eps);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) zh[d] = yh[d] * r * w[d] * sh[d];
  }
}

// One row of the backward; sig = sigmoid(g). Accumulates d w into dw.
template <typename T>
void backward_row(const T* y, const T* g, const T* sig, const T* w, const T* dz, int64_t H, int64_t D, T eps, T* z,
                  T* dg, T* dy, T* dw) {
  for (int64_t h = 0; h < H; ++h) {
    const int64_t o = h * D;
    const T r = rms_scale(y + o, D, eps);
    T proj = T(0);  // mean of d yhat * yhat
#pragma omp simd reduction(+ : proj)
    for (int64_t d = 0; d < D; ++d) {
      const T yhat = y[o + d] * r, s = sig[o + d], x = g[o + d], silu = x * s;
      const T normed = yhat * w[d], dn = dz[o + d] * silu;
      z[o + d] = normed * silu;
      dg[o + d] = dz[o + d] * normed * s * (T(1) + x * (T(1) - s));
      dw[d] += dn * yhat;
      proj += dn * w[d] * yhat;
    }
    proj /= T(D);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T yhat = y[o + d] * r;
      dy[o + d] = r * (dz[o + d] * g[o + d] * sig[o + d] * w[d] - yhat * proj);
    }
  }
}

// Runs body(b, t0, t1) over tiles of kRows rows, the tiles split across the threads.
template <typename F>
void for_each_tile(int64_t B, int64_t n, const F& body) {
  const int64_t per = (n + kRows - 1) / kRows;
  at::parallel_for(0, B * per, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / per, t0 = (p % per) * kRows;
      body(b, t0, std::min(t0 + kRows, n));
    }
  });
}

}  // namespace

// z = RMSNorm_D(y) * w * SiLU(g), into z (B, n, C).
void gated_output_forward(const Tensor& y, const Tensor& g, const Tensor& w, double eps, const Tensor& z) {
  check_rows(g, "g", y);
  check_rows(z, "z", y);
  check_rows(y, "y", y);
  const int64_t B = y.size(0), n = y.size(1), C = y.size(2), D = w.numel();
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == y.scalar_type() && D > 0 && C % D == 0,
              "gated output: w must be a contiguous vector whose length divides ", C);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gated_output_forward", [&] {
    using T = scalar_t;
    const Rows<T> Y(y), G(g), Z(z);
    const T* wp = w.data_ptr<T>();
    for_each_tile(B, n, [&](int64_t b, int64_t t0, int64_t t1) {
      Tensor sg = at::silu(g.select(0, b).narrow(0, t0, t1 - t0)).contiguous();  // (t1 - t0, C)
      const T* sp = sg.data_ptr<T>();
      for (int64_t t = t0; t < t1; ++t) forward_row(Y.row(b, t), sp + (t - t0) * C, wp, C / D, D, T(eps), Z.row(b, t));
    });
  });
}

// Given dz (B, n, C): writes z, dg and dy (B, n, C each), returns d w (D).
Tensor gated_output_backward(const Tensor& y, const Tensor& g, const Tensor& w, double eps, const Tensor& dz,
                             const Tensor& z, const Tensor& dg, const Tensor& dy) {
  for (const auto& [t, name] : {std::pair{&g, "g"}, {&dz, "dz"}, {&z, "z"}, {&dg, "dg"}, {&dy, "dy"}, {&y, "y"}})
    check_rows(*t, name, y);
  const int64_t B = y.size(0), n = y.size(1), C = y.size(2), D = w.numel();
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == y.scalar_type() && D > 0 && C % D == 0,
              "gated output: w must be a contiguous vector whose length divides ", C);
  Tensor dw = at::zeros({D}, w.options());
  std::mutex lock;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gated_output_backward", [&] {
    using T = scalar_t;
    const Rows<T> Y(y), G(g), DZ(dz), Z(z), DG(dg), DY(dy);
    const T* wp = w.data_ptr<T>();
    const int64_t per = (n + kRows - 1) / kRows;
    at::parallel_for(0, B * per, 1, [&](int64_t p0, int64_t p1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<T> dw_local(D, T(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / per, t0 = (p % per) * kRows, t1 = std::min(t0 + kRows, n);
        Tensor sig = at::sigmoid(g.select(0, b).narrow(0, t0, t1 - t0)).contiguous();
        const T* sp = sig.data_ptr<T>();
        for (int64_t t = t0; t < t1; ++t)
          backward_row(Y.row(b, t), G.row(b, t), sp + (t - t0) * C, wp, DZ.row(b, t), C / D, D, T(eps), Z.row(b, t),
                       DG.row(b, t), DY.row(b, t), dw_local.data());
      }
      std::lock_guard<std::mutex> guard(lock);
      T* out = dw.data_ptr<T>();
      for (int64_t d = 0; d < D; ++d) out[d] += dw_local[d];
    });
  });
  return dw;
}
