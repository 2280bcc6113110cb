// A 3-D (B, n, C) tensor read by rows: any strides over its first two dimensions, contiguous channels.
// Shared by the layer's row-wise loops (conv_silu.cpp, gated_output.cpp).
#pragma once

#include <torch/extension.h>

namespace titans {

// Element (b, t, c) at p + b * sb + t * st + c.
template <typename T>
struct Rows {
  T* p;
  int64_t sb, st;
  explicit Rows(const at::Tensor& x) : p(x.data_ptr<T>()), sb(x.stride(0)), st(x.stride(1)) {}
  T* row(int64_t b, int64_t t) const { return p + b * sb + t * st; }
};

}  // namespace titans
