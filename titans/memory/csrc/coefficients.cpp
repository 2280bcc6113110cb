// The chunk coefficients on the CPU: chunked.chunk_coefficients and chunk_coefficients_backward,
// one gate row (a chunk of one memory and gate layer: b gates) per task step, in fused loops over
// b x b scratch matrices that stay in cache (the eager versions run a dozen passes over all rows).
// Same equations, same order of the products that build the decay matrices; the matrix products
// sum in another order than BLAS, so results agree to rounding. chunked.py holds the derivation.
//
// Layouts (contiguous): alpha, eta, theta, a, m, cS (R, b); C (R, b, b); e (R); valid (N, b), where
// the R = N * rows_per_chunk gate rows come chunk by chunk (row rho belongs to chunk rho / per).

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

// D[t, u] = prod_{u < r <= t} x_r for t >= u, 0 above the diagonal (row-major b x b): a cumulative
// product down each column, in the order torch.cumprod takes it in chunked._decay_matrix.
template <typename T>
void decay(const T* x, int64_t b, T* D) {
  for (int64_t t = 0; t < b; ++t) {
    T* row = D + t * b;
    const T* up = row - b;
    for (int64_t u = 0; u < t; ++u) row[u] = up[u] * x[t];
    row[t] = T(1);
    for (int64_t u = t + 1; u < b; ++u) row[u] = T(0);
  }
}

template <typename T>
void cumprod(const T* x, int64_t b, T* out) {
  T acc = T(1);
  for (int64_t t = 0; t < b; ++t) out[t] = acc *= x[t];
}

// chunked._flush_subnormal: entries below sqrt(finfo.tiny) in magnitude, but not 0, become 0.
template <typename T>
T flush_floor() {
  return T(std::sqrt(double(std::numeric_limits<T>::min())));
}

template <typename T>
T flush(T v, T floor) {
  return std::abs(v) < floor ? T(0) : v;
}

// PQ[t, :] = sum_{u <= t} P[t, u] Q[u, :]  (P and Q lower triangular)
template <typename T>
void lower_product(const T* P, const T* Q, int64_t b, T* PQ) {
  for (int64_t t = 0; t < b; ++t) {
    T* o = PQ + t * b;
    for (int64_t s = 0; s < b; ++s) o[s] = T(0);
    for (int64_t u = 0; u <= t; ++u) {
      const T p = P[t * b + u];
      const T* q = Q + u * b;
#pragma omp simd
      for (int64_t s = 0; s <= u; ++s) o[s] += p * q[s];
    }
  }
}

// The strictly-lower part (s < u) of dQ = P^T X for lower-triangular P: dQ[u, s] = sum_{t >= u} P[t, u] X[t, s].
template <typename T>
void lower_t_product(const T* P, const T* X, int64_t b, T* dQ) {
  for (int64_t u = 0; u < b; ++u) {
    T* o = dQ + u * b;
    for (int64_t s = 0; s < b; ++s) o[s] = T(0);
    for (int64_t t = u; t < b; ++t) {
      const T p = P[t * b + u];
      const T* x = X + t * b;
#pragma omp simd
      for (int64_t s = 0; s < u; ++s) o[s] += p * x[s];
    }
  }
}

// The gradient of x for D = decay(x) (chunked._decay_matrix_grad), added into out:
//     d x_r = sum_{u < r} D[r-1, u] M[r, u],   M = D^T dD below the diagonal (lower_t_product; M is scratch).
template <typename T>
void add_decay_grad(const T* D, const T* dD, int64_t b, T* M, T* out) {
  lower_t_product(D, dD, b, M);
  for (int64_t r = 1; r < b; ++r) {
    const T *prev = D + (r - 1) * b, *m = M + r * b;
    T acc = T(0);
    for (int64_t u = 0; u < r; ++u) acc += prev[u] * m[u];
    out[r] += acc;
  }
}

// The strictly-lower part (u < t) of dP = (X Q^T + dm E^T) * v (columns), Q lower triangular, from
// QT = Q^T: dP[t, u] = (sum_{w <= u} X[t, w] QT[w, u] + dm[t] E[u]) v[u].
template <typename T>
void lower_product_t_plus(const T* X, const T* QT, const T* dm, const T* E, const T* v, int64_t b, T* dP) {
  for (int64_t t = 0; t < b; ++t) {
    T* o = dP + t * b;
    for (int64_t u = 0; u < b; ++u) o[u] = T(0);
    for (int64_t w = 0; w < t; ++w) {
      const T x = X[t * b + w];
      const T* q = QT + w * b;
#pragma omp simd
      for (int64_t u = w; u < t; ++u) o[u] += x * q[u];
    }
    for (int64_t u = 0; u < t; ++u) o[u] = (o[u] + dm[t] * E[u]) * v[u];
  }
}

// chunked._cumprod_grad: d x_r = c[r-1] sum_{t >= r} dc_t D[t, r] (c[-1] = 1), added into out.
template <typename T>
void add_cumprod_grad(const T* c, const T* D, const T* dc, int64_t b, T* out) {
  for (int64_t r = 0; r < b; ++r) {
    T acc = T(0);
    for (int64_t t = r; t < b; ++t) acc += dc[t] * D[t * b + r];
    out[r] += (r == 0 ? T(1) : c[r - 1]) * acc;
  }
}

// The scratch of one thread: b x b matrices and b-vectors.
template <typename T>
struct Scratch {
  std::vector<T> buf;
  int64_t b;
  explicit Scratch(int64_t b_, int64_t mats) : buf(mats * b_ * b_ + 8 * b_), b(b_) {}
  T* mat(int64_t i) { return buf.data() + i * b * b; }
  T* vec(int64_t mats, int64_t i) { return buf.data() + mats * b * b + i * b; }
};

// The decay matrices and cumulative products of one gate row: keep = 1 - alpha, Pk = decay(keep),
// P = Pk * valid (columns), Q = decay(eta), E = cumprod(eta), a = cumprod(keep).
template <typename T>
void row_parts(const T* alpha, const T* eta, const T* valid, int64_t b, T* keep, T* Pk, T* P, T* Q, T* E, T* a) {
  for (int64_t t = 0; t < b; ++t) keep[t] = T(1) - alpha[t];
  decay(keep, b, Pk);
  for (int64_t t = 0; t < b; ++t)
    for (int64_t u = 0; u < b; ++u) P[t * b + u] = Pk[t * b + u] * valid[u];
  decay(eta, b, Q);
  cumprod(eta, b, E);
  cumprod(keep, b, a);
}

void check(const Tensor& t, const char* name, const Tensor& like, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() && t.dim() == dims,
              "chunk coefficients: ", name, " must be a contiguous ", dims, "-D CPU tensor of dtype ",
              like.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
}

int64_t rows_per_chunk(const Tensor& gates, const Tensor& valid) {
  const int64_t R = gates.size(0), N = valid.size(0);
  TORCH_CHECK(N > 0 && R % N == 0 && valid.size(1) == gates.size(1),
              "chunk coefficients: valid must be (N, b) with N dividing the gate rows, got ", valid.sizes(),
              " for gates ", gates.sizes());
  return R / N;
}

}  // namespace

// chunked.chunk_coefficients for gates (R, b): returns a, m (R, b), C (R, b, b), cS (R, b), e (R).
std::vector<Tensor> chunk_coefficients(const Tensor& alpha, const Tensor& eta, const Tensor& theta,
                                       const Tensor& valid) {
  for (const auto& [t, name] : {std::pair{&alpha, "alpha"}, {&eta, "eta"}, {&theta, "theta"}, {&valid, "valid"}})
    check(*t, name, alpha, 2);
  TORCH_CHECK(eta.sizes() == alpha.sizes() && theta.sizes() == alpha.sizes(),
              "chunk coefficients: alpha, eta and theta must have one shape");
  const int64_t R = alpha.size(0), b = alpha.size(1), per = rows_per_chunk(alpha, valid);
  Tensor a = at::empty_like(alpha), m = at::empty_like(alpha), C = at::empty({R, b, b}, alpha.options());
  Tensor cS = at::empty_like(alpha), e = at::empty({R}, alpha.options());
  AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "chunk_coefficients", [&] {
    using T = scalar_t;
    at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
      Scratch<T> s(b, 4);
      const T floor = flush_floor<T>();
      T *Pk = s.mat(0), *P = s.mat(1), *Q = s.mat(2), *PQ = s.mat(3);
      T *keep = s.vec(4, 0), *E = s.vec(4, 1);
      for (int64_t r = r0; r < r1; ++r) {
        const T* th = theta.data_ptr<T>() + r * b;
        T *ar = a.data_ptr<T>() + r * b, *mr = m.data_ptr<T>() + r * b, *Cr = C.data_ptr<T>() + r * b * b;
        T* cSr = cS.data_ptr<T>() + r * b;
        row_parts(alpha.data_ptr<T>() + r * b, eta.data_ptr<T>() + r * b, valid.data_ptr<T>() + (r / per) * b, b,
                  keep, Pk, P, Q, E, ar);
        lower_product(P, Q, b, PQ);
        for (int64_t t = 0; t < b; ++t) {
          T acc = T(0);
          for (int64_t u = 0; u <= t; ++u) acc += P[t * b + u] * E[u];
          mr[t] = flush(acc, floor);
          ar[t] = flush(ar[t], floor);
          for (int64_t u = 0; u < b; ++u) Cr[t * b + u] = flush(PQ[t * b + u] * th[u], floor);
        }
        for (int64_t u = 0; u < b; ++u) cSr[u] = flush(th[u] * Q[(b - 1) * b + u], floor);
        e.data_ptr<T>()[r] = flush(E[b - 1], floor);
      }
    });
  });
  return {a, m, C, cS, e};
}

// chunked.chunk_coefficients_backward: d alpha, d eta, d theta (R, b) from the gradients of
// a, m (R, b), C (R, b, b), cS (R, b) and e (R).
std::vector<Tensor> chunk_coefficients_backward(const Tensor& alpha, const Tensor& eta, const Tensor& theta,
                                                const Tensor& valid, const Tensor& da, const Tensor& dm,
                                                const Tensor& dC, const Tensor& dcS, const Tensor& de) {
  for (const auto& [t, name] : {std::pair{&alpha, "alpha"}, {&eta, "eta"}, {&theta, "theta"}, {&valid, "valid"},
                                {&da, "da"}, {&dm, "dm"}, {&dcS, "dcS"}})
    check(*t, name, alpha, 2);
  check(dC, "dC", alpha, 3);
  check(de, "de", alpha, 1);
  const int64_t R = alpha.size(0), b = alpha.size(1), per = rows_per_chunk(alpha, valid);
  for (const Tensor* t : {&eta, &theta, &da, &dm, &dcS})
    TORCH_CHECK(t->sizes() == alpha.sizes(), "chunk coefficients: gradients must match the gates' shape");
  TORCH_CHECK(dC.size(0) == R && dC.size(1) == b && dC.size(2) == b && de.size(0) == R,
              "chunk coefficients: dC must be (R, b, b) and de (R)");
  Tensor d_alpha = at::empty_like(alpha), d_eta = at::empty_like(alpha), d_theta = at::empty_like(alpha);
  AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "chunk_coefficients_backward", [&] {
    using T = scalar_t;
    at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
      Scratch<T> s(b, 9);
      T *Pk = s.mat(0), *P = s.mat(1), *Q = s.mat(2), *PQ = s.mat(3), *dPQ = s.mat(4), *dP = s.mat(5);
      T *dQ = s.mat(6), *M = s.mat(7), *QT = s.mat(8);
      T *keep = s.vec(9, 0), *E = s.vec(9, 1), *a = s.vec(9, 2), *dE = s.vec(9, 3);
      for (int64_t r = r0; r < r1; ++r) {
        const T *th = theta.data_ptr<T>() + r * b, *v = valid.data_ptr<T>() + (r / per) * b;
        const T *dar = da.data_ptr<T>() + r * b, *dmr = dm.data_ptr<T>() + r * b;
        const T *dCr = dC.data_ptr<T>() + r * b * b, *dcSr = dcS.data_ptr<T>() + r * b;
        T *dal = d_alpha.data_ptr<T>() + r * b, *det = d_eta.data_ptr<T>() + r * b;
        T* dth = d_theta.data_ptr<T>() + r * b;
        row_parts(alpha.data_ptr<T>() + r * b, eta.data_ptr<T>() + r * b, v, b, keep, Pk, P, Q, E, a);
        lower_product(P, Q, b, PQ);
        // C = (P Q) * theta (columns); cS = theta * Q[-1]; m = P E; e = E[-1]
        for (int64_t u = 0; u < b; ++u) dth[u] = dcSr[u] * Q[(b - 1) * b + u];
        for (int64_t t = 0; t < b; ++t)
          for (int64_t u = 0; u < b; ++u) {
            dth[u] += dCr[t * b + u] * PQ[t * b + u];
            dPQ[t * b + u] = dCr[t * b + u] * th[u];
          }
        for (int64_t t = 0; t < b; ++t)
          for (int64_t u = 0; u < b; ++u) QT[u * b + t] = Q[t * b + u];
        lower_product_t_plus(dPQ, QT, dmr, E, v, b, dP);
        lower_t_product(P, dPQ, b, dQ);  // dQ = P^T dPQ, below the diagonal
        for (int64_t u = 0; u < b; ++u) dQ[(b - 1) * b + u] += dcSr[u] * th[u];
        for (int64_t u = 0; u < b; ++u) {  // dE = P^T dm, + de at the end
          T acc = T(0);
          for (int64_t t = u; t < b; ++t) acc += P[t * b + u] * dmr[t];
          dE[u] = acc;
        }
        dE[b - 1] += de.data_ptr<T>()[r];
        for (int64_t t = 0; t < b; ++t) dal[t] = T(0), det[t] = T(0);
        add_decay_grad(Pk, dP, b, M, dal);
        add_cumprod_grad(a, Pk, dar, b, dal);
        add_decay_grad(Q, dQ, b, M, det);
        add_cumprod_grad(E, Q, dE, b, det);
        for (int64_t t = 0; t < b; ++t) dal[t] = -dal[t];  // d alpha = -d keep
      }
    });
  });
  return {d_alpha, d_eta, d_theta};
}
