// The layer's causal depthwise convolution + SiLU on the CPU: the passes of conv.py's
// `_pre_activation` and `_conv_silu_backward` fused into one loop each (the Python versions stay
// the reference and run everything else: CUDA, half precision, a dispatch mode).
//
// Notation as in conv.py: x (B, n, C) a block of inputs, `left` (B, K-1, C) the K-1 inputs before
// it, taps (K, C) the kernel (tap i reads the input K-1-i steps back), and
//     pre[t] = sum_i taps[i] * x[t - (K-1-i)]   (x[-j] = left[K-1-j]),   y = SiLU(pre).
// 3-D tensors may have any strides over their first two dimensions; channels must be contiguous.
// The loops split tiles of rows across the threads and run the channels of a row as the inner loop;
// the elementwise SiLU and sigmoid are ATen's (vectorised), called per tile on the tile's thread.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "rows.h"

#include <algorithm>
#include <mutex>
#include <tuple>

namespace {

using at::Tensor;
using titans::Rows;

constexpr int64_t kTile = 64;  // rows per task: a tile's pre-activation, sigmoid and gradient stay in cache

void check_3d(const Tensor& x, const char* name, int64_t B, int64_t C, c10::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(0) == B && x.size(2) == C && x.stride(2) == 1,
              "conv_silu: ", name, " must be a CPU (", B, ", ., ", C, ") tensor with contiguous channels, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "conv_silu: ", name, " must be ", dtype, ", got ", x.scalar_type());
}

void check_args(const Tensor& x, const Tensor& left, const Tensor& taps) {
  const int64_t B = x.size(0), C = x.size(2), K = taps.size(0);
  check_3d(x, "x", B, C, x.scalar_type());
  check_3d(left, "left", B, C, x.scalar_type());
  TORCH_CHECK(left.size(1) == K - 1, "conv_silu: left must hold K-1 = ", K - 1, " rows, got ", left.size(1));
  TORCH_CHECK(taps.dim() == 2 && taps.size(1) == C && taps.is_contiguous() && taps.scalar_type() == x.scalar_type(),
              "conv_silu: taps must be a contiguous (K, ", C, ") tensor of x's dtype, got ", taps.sizes());
}

// The input K-1-i steps before row t: x's row, or left's when it lies before the block.
template <typename T>
const T* source(const Rows<T>& x, const Rows<T>& left, int64_t K, int64_t b, int64_t t) {
  return t >= 0 ? x.row(b, t) : left.row(b, K - 1 + t);
}

// pre rows t0 .. t1-1 of batch element b, all channels, into o (row stride C).
template <typename T>
void pre_rows(const Rows<T>& x, const Rows<T>& left, const T* taps, int64_t K, int64_t C, int64_t b, int64_t t0,
              int64_t t1, T* o) {
  for (int64_t t = t0; t < t1; ++t, o += C) {
    const T* last = x.row(b, t);
    const T* wl = taps + (K - 1) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = wl[c] * last[c];
    for (int64_t i = 0; i < K - 1; ++i) {
      const T* s = source(x, left, K, b, t - (K - 1 - i));
      const T* w = taps + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] += w[c] * s[c];
    }
  }
}

// One tile of the backward (rows t0 .. t1-1 of batch element b), from pre (rows t0 .. t1e-1,
// t1e = min(t1 + K-1, n): dx[t] reads d pre up to t + K-1) and s = sigmoid(pre), row stride C.
// d pre is built in pre's rows; dx rows go to DX, d left to DL (when t0 = 0), dw accumulates.
template <typename T>
void backward_tile(const Rows<T>& X, const Rows<T>& Lf, const Rows<T>& DY, const Rows<T>& DX, const Rows<T>& DL,
                   const T* w, T* dw, int64_t K, int64_t C, int64_t n, int64_t b, int64_t t0, int64_t t1, int64_t t1e,
                   T* pre, const T* s) {
  for (int64_t t = t0; t < t1e; ++t) {  // d pre = dy SiLU'(pre) = dy s (1 + pre (1 - s))
    T* p = pre + (t - t0) * C;
    const T *sg = s + (t - t0) * C, *g = DY.row(b, t);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) p[c] = g[c] * sg[c] * (T(1) + p[c] * (T(1) - sg[c]));
    if (t >= t1) continue;  // the next tile's row: its dw is that tile's
    for (int64_t i = 0; i < K; ++i) {  // dw[i] += d pre[t] * x[t - (K-1-i)]
      const T* src = source(X, Lf, K, b, t - (K - 1 - i));
      T* dwi = dw + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dwi[c] += p[c] * src[c];
    }
  }
  for (int64_t t = t0; t < t1; ++t) {  // dx[t] = sum_i taps[i] d pre[t + K-1-i]
    T* o = DX.row(b, t);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = 0;
    for (int64_t i = 0; i < K; ++i) {
      const int64_t u = t + K - 1 - i;
      if (u >= n) continue;
      const T *dp = pre + (u - t0) * C, *wi = w + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] += wi[c] * dp[c];
    }
  }
  if (t0 > 0) return;
  for (int64_t j = 0; j < K - 1; ++j) {  // d left[j] (input j - (K-1)) = sum_i taps[i] d pre[j - i]
    T* o = DL.row(b, j);
    for (int64_t i = std::max<int64_t>(0, j - n + 1); i <= j; ++i) {
      const T *dp = pre + (j - i) * C, *wi = w + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] += wi[c] * dp[c];
    }
  }
}

}  // namespace

// SiLU(pre) of the block x (B, n, C), written into out (B, n, C; rows of one batch element contiguous).
void conv_silu_forward(const Tensor& x, const Tensor& left, const Tensor& taps, const Tensor& out) {
  check_args(x, left, taps);
  check_3d(out, "out", x.size(0), x.size(2), x.scalar_type());
  const int64_t B = x.size(0), n = x.size(1), C = x.size(2), K = taps.size(0), per = (n + kTile - 1) / kTile;
  TORCH_CHECK(out.size(1) == n && out.stride(1) == C, "conv_silu: out must be (", B, ", ", n, ", ", C,
              ") with contiguous rows, got ", out.sizes(), " strides ", out.strides());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_silu_forward", [&] {
    const Rows<scalar_t> X(x), Lf(left), O(out);
    const scalar_t* w = taps.data_ptr<scalar_t>();
    at::parallel_for(0, B * per, 1, [&](int64_t p0, int64_t p1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / per, t0 = (p % per) * kTile, t1 = std::min(t0 + kTile, n);
        pre_rows(X, Lf, w, K, C, b, t0, t1, O.row(b, t0));
        Tensor tile = out.select(0, b).narrow(0, t0, t1 - t0);
        at::silu_(tile);  // ATen's vectorised SiLU, on this thread
      }
    });
  });
}

// The gradients of y = SiLU(pre) for the block: (dx (B, n, C), d left (B, K-1, C), d taps (K, C)),
// given dy (B, n, C). Each tile recomputes its pre-activation (and K-1 rows past its end) in a
// buffer of its thread, so that pre, sigmoid(pre) and d pre stay in cache.
std::tuple<Tensor, Tensor, Tensor> conv_silu_backward(const Tensor& x, const Tensor& left, const Tensor& taps,
                                                     const Tensor& dy) {
  check_args(x, left, taps);
  check_3d(dy, "dy", x.size(0), x.size(2), x.scalar_type());
  TORCH_CHECK(dy.size(1) == x.size(1), "conv_silu: dy must have x's ", x.size(1), " rows, got ", dy.size(1));
  const int64_t B = x.size(0), n = x.size(1), C = x.size(2), K = taps.size(0), per = (n + kTile - 1) / kTile;
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor dx = at::empty({B, n, C}, opts), dleft = at::zeros({B, K - 1, C}, opts), dtaps = at::zeros({K, C}, opts);
  std::mutex lock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_silu_backward", [&] {
    const Rows<scalar_t> X(x), Lf(left), DY(dy), DX(dx), DL(dleft);
    const scalar_t* w = taps.data_ptr<scalar_t>();
    at::parallel_for(0, B * per, 1, [&](int64_t p0, int64_t p1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor pre = at::empty({kTile + K - 1, C}, opts), s = at::empty_like(pre), dw = at::zeros({K, C}, opts);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / per, t0 = (p % per) * kTile, t1 = std::min(t0 + kTile, n);
        const int64_t t1e = std::min(t1 + K - 1, n);
        pre_rows(X, Lf, w, K, C, b, t0, t1e, pre.data_ptr<scalar_t>());
        Tensor s_tile = s.narrow(0, 0, t1e - t0);
        at::sigmoid_out(s_tile, pre.narrow(0, 0, t1e - t0));
        backward_tile(X, Lf, DY, DX, DL, w, dw.data_ptr<scalar_t>(), K, C, n, b, t0, t1, t1e,
                      pre.data_ptr<scalar_t>(), s.data_ptr<scalar_t>());
      }
      std::lock_guard<std::mutex> guard(lock);
      dtaps.add_(dw);
    });
  });
  return {dx, dleft, dtaps};
}
