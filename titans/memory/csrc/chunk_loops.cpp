// The neural memory's chunk loops on the CPU, one (batch, head) memory per task.
//
// The same computation as `_forward_stretch` / `_backward_stretch` in chunked.py (read that file
// for the equations; names here follow it), restructured for a CPU with few cores. The B x H
// memories of a stretch are independent, so each runs its chunks on one thread from start to end,
// on 2-D tensors that stay in the core's cache. Matrix products go to ATen (MKL, single-threaded
// inside the parallel region); everything between them is a handful of fused loops over raw
// arrays, with no per-operation dispatch. Eager PyTorch instead runs each of about 770 small
// operations per chunk over all memories at once, with a Python call and a thread barrier each.
//
// Covered: any depth L, shared or per-layer gates, with or without the read, the second_order
// scale, q and k L2-normalised per chunk (the layer's path); float32 and float64. Not covered
// (chunked.py runs those): the inner-gradient clamp and forgetting towards W0.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using TensorList = std::vector<Tensor>;

constexpr double kLnEps = 1e-5;  // functional.LN_EPS
constexpr double kInvSqrt2Pi = 0.3989422804014327;

template <typename T>
T* ptr(const Tensor& t) {
  return t.data_ptr<T>();
}

// GELU of z (exact, erf) and what its derivatives need: Phi(z) and phi(z), from ATen's vectorized
// erf and exp. gelu = z Phi, gelu' = Phi + z phi, gelu'' = phi (2 - z^2).
struct GeluParts {
  Tensor Phi, phi;
};

template <typename T>
GeluParts gelu_parts(const Tensor& z) {
  Tensor Phi = at::empty_like(z), phi = at::empty_like(z);
  const int64_t N = z.numel();
  const T* Z = ptr<T>(z);
  T *P = ptr<T>(Phi), *p = ptr<T>(phi);
  for (int64_t i = 0; i < N; ++i) P[i] = Z[i] * T(M_SQRT1_2), p[i] = T(-0.5) * Z[i] * Z[i];
  at::erf_(Phi);
  at::exp_(phi);
  for (int64_t i = 0; i < N; ++i) P[i] = T(0.5) * (T(1) + P[i]), p[i] *= T(kInvSqrt2Pi);
  return {Phi, phi};
}

// out = gelu(z), gp = gelu'(z) (gp may be undefined: not computed).
template <typename T>
Tensor gelu_and_grad(const Tensor& z, const GeluParts& g, Tensor* gp) {
  Tensor out = at::empty_like(z);
  const int64_t N = z.numel();
  const T *Z = ptr<T>(z), *P = ptr<T>(g.Phi), *p = ptr<T>(g.phi);
  T* O = ptr<T>(out);
  for (int64_t i = 0; i < N; ++i) O[i] = Z[i] * P[i];
  if (gp) {
    *gp = at::empty_like(z);
    T* G = ptr<T>(*gp);
    for (int64_t i = 0; i < N; ++i) G[i] = P[i] + Z[i] * p[i];
  }
  return out;
}

constexpr double kL2Eps = 1e-12;  // chunked.L2_EPS (F.normalize's default)

// x / max(|x|, eps) per row of a (b, D) tensor: the layer's q and k, normalised per chunk.
template <typename T>
Tensor l2_normalized(const Tensor& x) {
  const int64_t rows = x.size(0), D = x.size(1);
  Tensor out = at::empty_like(x);
  const T* X = ptr<T>(x);
  T* O = ptr<T>(out);
  for (int64_t i = 0; i < rows; ++i) {
    T ss = T(0);
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < D; ++j) ss += X[i * D + j] * X[i * D + j];
    const T inv = T(1) / std::max(std::sqrt(ss), T(kL2Eps));
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) O[i * D + j] = X[i * D + j] * inv;
  }
  return out;
}

// chunked._l2_normalize_backward in place: dy -> (dy - y (y . dy)) / |x| (dy / eps where |x| <= eps),
// y = x / max(|x|, eps), per row of the (b, D) tensors x and dy.
template <typename T>
void l2_normalize_backward_(const Tensor& x, const Tensor& dy) {
  const int64_t rows = x.size(0), D = x.size(1);
  const T* X = ptr<T>(x);
  T* G = ptr<T>(dy);
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = X + i * D;
    T* gi = G + i * D;
    T ss = T(0), dot = T(0);
#pragma omp simd reduction(+ : ss, dot)
    for (int64_t j = 0; j < D; ++j) ss += xi[j] * xi[j], dot += xi[j] * gi[j];
    const T n = std::sqrt(ss), inv = T(1) / std::max(n, T(kL2Eps));
    const T proj = n > T(kL2Eps) ? dot * inv : T(0);  // y . dy
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) gi[j] = (gi[j] - xi[j] * inv * proj) * inv;
  }
}

// One chunk of one memory: 2-D views. Gates: a, m (Lg, b); C (Lg, b, b); cS (Lg, b); e (Lg).
struct Chunk {
  Tensor q, k, v, a, m, C, cS, e;
};

// Intermediates of one chunk (chunked._Cache). gps: gelu'(z_l); pdfs: phi(z_l); n, r, err, gn, J:
// the LayerNorm block of the inner loss; read: us, ps, Ps, As, aus, gpps (gelu'(p_l)), nq, rq.
struct Cache {
  TensorList xs, zs, deltas, ts, gps, pdfs, xcs;
  Tensor n, r, err, gn, J;
  TensorList us, ps, Ps, As, aus, gpps;
  Tensor nq, rq;
};

// The inputs of a stretch call, shared by all memories; `chunk` picks one memory's views.
struct Stretch {
  TensorList G, WS;  // (B, H, D_in, D_out), (B, H, 2 D_in, D_out)
  Tensor q, k, v, a, m, C, cS, e;  // (n B H, ...): the (n, B, H, ...) tensors, flattened (one select per view)
  Tensor gamma, beta;  // (H, D) or undefined
  int64_t B = 0, H = 0, n = 0, L = 0, Lg = 0, b = 0;
  bool norm_qk = false;  // q and k come before their L2 normalisation: normalised per chunk here

  // The index of memory (bi, hi)'s chunk c in a flattened (n B H, ...) tensor.
  int64_t at(int64_t c, int64_t bi, int64_t hi) const { return (c * B + bi) * H + hi; }
  // One memory's chunk c, q and k as given.
  Chunk raw(int64_t c, int64_t bi, int64_t hi) const {
    const int64_t i = at(c, bi, hi);
    return {q[i], k[i], v[i], a[i], m[i], C[i], cS[i], e[i]};
  }
  // ... with q and k normalised when norm_qk (and want_q: q is only read by the read)
  template <typename T>
  Chunk chunk(int64_t c, int64_t bi, int64_t hi, bool want_q = true) const {
    Chunk ch = raw(c, bi, hi);
    if (norm_qk) {
      if (want_q) ch.q = l2_normalized<T>(ch.q);
      ch.k = l2_normalized<T>(ch.k);
    }
    return ch;
  }
  Tensor head(const Tensor& t, int64_t hi) const { return t.defined() ? t[hi] : Tensor(); }
};

int64_t gate(int64_t i, int64_t Lg) { return Lg > 1 ? i : 0; }

// LayerNorm rows of h (b x D): n and r = 1/std (b x 1).
template <typename T>
void layer_norm_rows(const T* h, T* n, T* r, int64_t rows, int64_t D) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* x = h + i * D;
    T mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
    for (int64_t j = 0; j < D; ++j) mean += x[j];
    mean /= T(D);
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < D; ++j) var += (x[j] - mean) * (x[j] - mean);
    const T rs = T(1) / std::sqrt(var / T(D) + T(kLnEps));
    r[i] = rs;
    for (int64_t j = 0; j < D; ++j) n[i * D + j] = (x[j] - mean) * rs;
  }
}

// The inner gradients of one chunk at its base G: every layer's input x_l on k and
// output-gradient delta_l, with what their backward needs.
template <typename T>
Cache inner_gradients(const TensorList& G, const Chunk& ch, const Tensor& gamma, const Tensor& beta) {
  const auto L = static_cast<int64_t>(G.size());
  const int64_t b = ch.k.size(0), D = ch.k.size(1);
  Cache c;
  c.gps.assign(L, Tensor()), c.pdfs.assign(L, Tensor()), c.ts.assign(L, Tensor()), c.deltas.assign(L, Tensor());
  Tensor h = ch.k;
  for (int64_t i = 0; i < L; ++i) {
    c.xs.push_back(h);
    Tensor z = at::mm(h, G[i]);
    c.zs.push_back(z);
    if (i < L - 1) {
      GeluParts g = gelu_parts<T>(z);
      h = gelu_and_grad<T>(z, g, &c.gps[i]);
      c.pdfs[i] = g.phi;
    } else {
      h = z;
    }
  }
  Tensor delta = at::empty_like(h);
  if (L == 1) {
    at::sub_out(delta, h, ch.v);
  } else {  // n, r = LN(h); err = k + gamma n + beta - v; gn = gamma err; J = LN-backward of gn; delta = r J
    c.n = at::empty_like(h), c.r = at::empty({b, 1}, h.options());
    c.err = at::empty_like(h), c.gn = at::empty_like(h), c.J = at::empty_like(h);
    T *n = ptr<T>(c.n), *r = ptr<T>(c.r), *err = ptr<T>(c.err), *gn = ptr<T>(c.gn), *J = ptr<T>(c.J);
    T* dl = ptr<T>(delta);
    const T *k = ptr<T>(ch.k), *v = ptr<T>(ch.v), *gm = ptr<T>(gamma), *bt = ptr<T>(beta);
    layer_norm_rows<T>(ptr<T>(h), n, r, b, D);
    for (int64_t i = 0; i < b; ++i) {
      T mg = 0, mgn = 0;
#pragma omp simd reduction(+ : mg, mgn)
      for (int64_t j = 0; j < D; ++j) {
        const int64_t o = i * D + j;
        err[o] = k[o] + gm[j] * n[o] + bt[j] - v[o];
        gn[o] = gm[j] * err[o];
        mg += gn[o], mgn += gn[o] * n[o];
      }
      mg /= T(D), mgn /= T(D);
      for (int64_t j = 0; j < D; ++j) {
        const int64_t o = i * D + j;
        J[o] = gn[o] - mg - n[o] * mgn;
        dl[o] = r[i] * J[o];
      }
    }
  }
  c.deltas[L - 1] = delta;
  for (int64_t i = L - 2; i >= 0; --i) {
    c.ts[i] = at::mm(delta, G[i + 1].t());
    delta = c.ts[i] * c.gps[i];
    c.deltas[i] = delta;
  }
  return c;
}

// [s1 x, s2 x] along the last dim, s1 and s2 row scales (b,).
template <typename T>
Tensor scaled_pair(const T* s1, const T* s2, const Tensor& x) {
  const int64_t rows = x.size(0), d = x.size(1);
  Tensor out = at::empty({rows, 2 * d}, x.options());
  const T* X = ptr<T>(x);
  T* O = ptr<T>(out);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < d; ++j) O[i * 2 * d + j] = s1[i] * X[i * d + j], O[i * 2 * d + d + j] = s2[i] * X[i * d + j];
  return out;
}

// The written keys scaled by their weight in the end state: [cW x, cS x] per layer.
template <typename T>
void written_keys(Cache& c, const Chunk& ch, int64_t Lg) {
  if (!c.xcs.empty()) return;
  const int64_t b = ch.q.size(0);
  for (size_t i = 0; i < c.xs.size(); ++i) {
    const int64_t j = gate(static_cast<int64_t>(i), Lg);
    c.xcs.push_back(scaled_pair<T>(ptr<T>(ch.C) + (j * b + b - 1) * b, ptr<T>(ch.cS) + j * b, c.xs[i]));
  }
}

// y_t = M_{W_t}(q_t), layer by layer: p = [a u, m u] @ [W; S] - (P * C) delta, P = u x^T. Written
// into y when defined; the intermediates kept in c when `keep`.
template <typename T>
void read(Cache& c, const TensorList& WS, const Chunk& ch, const Tensor& gamma, const Tensor& beta, int64_t Lg,
          bool keep, const Tensor& y) {
  const auto L = static_cast<int64_t>(WS.size());
  const int64_t b = ch.q.size(0), D = ch.q.size(1);
  Tensor u = ch.q;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t j = gate(i, Lg);
    Tensor P = at::mm(u, c.xs[i].t());
    Tensor A = at::empty_like(P);
    const T *Pp = ptr<T>(P), *Cj = ptr<T>(ch.C) + j * b * b;
    T* Ap = ptr<T>(A);
    for (int64_t o = 0; o < b * b; ++o) Ap[o] = Pp[o] * Cj[o];
    Tensor au = scaled_pair<T>(ptr<T>(ch.a) + j * b, ptr<T>(ch.m) + j * b, u);
    Tensor p = at::mm(au, WS[i]);
    p.addmm_(A, c.deltas[i], 1, -1);
    if (keep) c.us.push_back(u), c.ps.push_back(p), c.Ps.push_back(P), c.As.push_back(A), c.aus.push_back(au);
    if (i < L - 1) {
      Tensor gp;
      u = gelu_and_grad<T>(p, gelu_parts<T>(p), keep ? &gp : nullptr);
      if (keep) c.gpps.push_back(gp);
    } else {
      u = p;
    }
  }
  if (L == 1) {
    if (y.defined()) y.copy_(u);
    return;
  }
  Tensor nq = at::empty_like(u), rq = at::empty({b, 1}, u.options());
  layer_norm_rows<T>(ptr<T>(u), ptr<T>(nq), ptr<T>(rq), b, D);
  if (keep) c.nq = nq, c.rq = rq;
  if (y.defined()) {  // y = q + gamma nq + beta
    const T *q = ptr<T>(ch.q), *n = ptr<T>(nq), *gm = ptr<T>(gamma), *bt = ptr<T>(beta);
    T* Y = ptr<T>(y);
    for (int64_t i = 0; i < b; ++i)
      for (int64_t jj = 0; jj < D; ++jj) Y[i * D + jj] = q[i * D + jj] + gm[jj] * n[i * D + jj] + bt[jj];
  }
}

// [W; S] <- [a W + m S; e S] - [cW x; cS x]^T delta, written into `out` (not aliasing WS).
template <typename T>
void update(const Cache& c, const TensorList& WS, const Chunk& ch, int64_t Lg, const TensorList& out) {
  const int64_t b = ch.q.size(0);
  for (size_t i = 0; i < WS.size(); ++i) {
    const int64_t j = gate(static_cast<int64_t>(i), Lg);
    const int64_t half = WS[i].numel() / 2;
    const T a_end = ptr<T>(ch.a)[j * b + b - 1], m_end = ptr<T>(ch.m)[j * b + b - 1];
    const T e_j = ch.e[j].item<T>();
    const T *W = ptr<T>(WS[i]), *S = W + half;
    T *Wn = ptr<T>(out[i]), *Sn = Wn + half;
    for (int64_t o = 0; o < half; ++o) Wn[o] = a_end * W[o] + m_end * S[o], Sn[o] = e_j * S[o];
    out[i].addmm_(c.xcs[i].t(), c.deltas[i], 1, -1);
  }
}

TensorList w_part(const TensorList& WS) {
  TensorList out;
  for (const auto& ws : WS) out.push_back(ws.narrow(0, 0, ws.size(0) / 2));
  return out;
}

TensorList pair_views(const TensorList& ts, int64_t bi, int64_t hi) {
  TensorList out;
  for (const auto& t : ts) out.push_back(t[bi][hi]);
  return out;
}

// Runs body(bi, hi) for every memory of the stretch, the memories split across the threads; the
// operations inside then run single-threaded (ATen and MKL do not nest parallel regions).
template <typename F>
void for_each_memory(int64_t B, int64_t H, const F& body) {
  at::parallel_for(0, B * H, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // no autograd inside: skip its dispatch keys
    for (int64_t p = p0; p < p1; ++p) body(p / H, p % H);
  });
}

Stretch make_stretch(TensorList G, TensorList WS, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& a, const Tensor& m, const Tensor& C, const Tensor& cS, const Tensor& e,
                     const std::optional<Tensor>& gamma, const std::optional<Tensor>& beta, bool norm_qk) {
  TORCH_CHECK(!G.empty() && G.size() == WS.size(), "chunk loops: G and WS must have one tensor per layer");
  TORCH_CHECK(q.dim() == 5 && a.dim() == 5 && C.dim() == 6, "chunk loops: unexpected chunk layout");
  for (const Tensor* t : {&q, &k, &v, &a, &m, &C, &cS, &e})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == q.scalar_type(),
                "chunk loops: chunk tensors must be contiguous and of one dtype");
  for (const auto& ws : WS) TORCH_CHECK(ws.is_contiguous(), "chunk loops: WS must be contiguous");
  auto flat = [](const Tensor& t) { return t.flatten(0, 2); };
  Stretch s{std::move(G), std::move(WS), flat(q), flat(k), flat(v), flat(a), flat(m), flat(C), flat(cS), flat(e)};
  if (gamma) s.gamma = gamma->contiguous(), s.beta = beta->contiguous();
  s.n = q.size(0), s.B = q.size(1), s.H = q.size(2), s.b = q.size(3);  // the arguments, not flattened
  s.L = static_cast<int64_t>(s.G.size()), s.Lg = a.size(3), s.norm_qk = norm_qk;
  TORCH_CHECK(s.L == 1 || s.gamma.defined(), "chunk loops: gamma and beta are required for L >= 2");
  return s;
}

Tensor contiguous_empty(const Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

// chunked._forward_stretch: chunks 0 .. n-1 from base G and state WS. Writes y (n, B, H, b, D) when
// given; returns the state after the last chunk and that chunk's base, per layer (the base as a view
// of the scratch state, or G itself when n == 1, as the eager loop hands it out).
std::vector<Tensor> forward_stretch(TensorList G, TensorList WS, Tensor q, Tensor k, Tensor v, Tensor a,
                                    Tensor m, Tensor C, Tensor cS, Tensor e, std::optional<Tensor> gamma,
                                    std::optional<Tensor> beta, std::optional<Tensor> y, bool norm_qk) {
  const Stretch s = make_stretch(std::move(G), std::move(WS), q, k, v, a, m, C, cS, e, gamma, beta, norm_qk);
  TORCH_CHECK(!y || y->is_contiguous(), "chunk loops: y must be contiguous");
  // the states alternate between WS_end and a scratch state; the last lands in WS_end, so for n >= 2
  // the last chunk started from the scratch state, whose W part is that chunk's base
  TensorList WS_end, scratch;
  for (int64_t i = 0; i < s.L; ++i) WS_end.push_back(contiguous_empty(s.WS[i])), scratch.push_back(contiguous_empty(s.WS[i]));
  const Tensor y_flat = y ? y->flatten(0, 2) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "forward_stretch", [&] {
    for_each_memory(s.B, s.H, [&](int64_t bi, int64_t hi) {
      const Tensor gamma_h = s.head(s.gamma, hi), beta_h = s.head(s.beta, hi);
      TensorList g = pair_views(s.G, bi, hi), ws = pair_views(s.WS, bi, hi);
      const TensorList bufs[2] = {pair_views(WS_end, bi, hi), pair_views(scratch, bi, hi)};
      for (int64_t c = 0; c < s.n; ++c) {
        const Chunk ch = s.chunk<scalar_t>(c, bi, hi, y.has_value());
        Cache cache = inner_gradients<scalar_t>(g, ch, gamma_h, beta_h);
        if (y) read<scalar_t>(cache, ws, ch, gamma_h, beta_h, s.Lg, false, y_flat[s.at(c, bi, hi)]);
        written_keys<scalar_t>(cache, ch, s.Lg);
        const TensorList& out = bufs[(s.n - 1 - c) % 2];
        update<scalar_t>(cache, ws, ch, s.Lg, out);
        ws = out;
        g = w_part(ws);
      }
    });
  });
  for (int64_t i = 0; i < s.L; ++i) WS_end.push_back(s.n == 1 ? s.G[i] : scratch[i].narrow(2, 0, s.G[i].size(2)));
  return WS_end;
}

// chunked._chunk_backward for one memory (no clamp, no W0). Accumulates d q, k, v and the
// coefficients' gradients into the slices of `d` (zeroed by the caller), d gamma and d beta into
// theirs; writes the gradient of the chunk's start [W; S] into dWS (buffers not aliasing dWS_end).
// The gradient of the chunk's base G, times dG_scale (0: not computed), is added into dG_into, or,
// when that is empty, into dWS's W part (the base is then the previous chunk's end W).
template <typename T>
void chunk_backward(const TensorList& G, const TensorList& WS, const Chunk& ch, const Tensor& gamma,
                    const Tensor& beta, int64_t Lg, const Tensor& dy, const TensorList& dWS_end, double dG_scale,
                    Cache c, const Chunk& d, const Tensor& dgamma, const Tensor& dbeta, const TensorList& dWS,
                    const TensorList& dG_into) {
  const auto L = static_cast<int64_t>(G.size());
  const int64_t b = ch.q.size(0), D0 = ch.q.size(1);
  const bool with_read = dy.defined();
  written_keys<T>(c, ch, Lg);
  if (with_read) read<T>(c, WS, ch, gamma, beta, Lg, true, Tensor());
  const TensorList& xs = c.xs;
  TensorList dxs, ddt;
  for (int64_t i = 0; i < L; ++i) dxs.push_back(at::zeros_like(xs[i])), ddt.push_back(at::zeros_like(c.deltas[i]));
  T *da = ptr<T>(d.a), *dm = ptr<T>(d.m), *dC = ptr<T>(d.C), *dcS = ptr<T>(d.cS), *de = ptr<T>(d.e);
  T *dq = ptr<T>(d.q), *dk = ptr<T>(d.k), *dv = ptr<T>(d.v);
  T *dgm = dgamma.defined() ? ptr<T>(dgamma) : nullptr, *dbt = dbeta.defined() ? ptr<T>(dbeta) : nullptr;
  const T *gm = gamma.defined() ? ptr<T>(gamma) : nullptr;

  // state update: WS_end = [a W + m S; e S] - xc^T delta
  for (int64_t i = 0; i < L; ++i) {
    const int64_t j = gate(i, Lg), D = xs[i].size(1), half = WS[i].numel() / 2;
    const T a_end = ptr<T>(ch.a)[j * b + b - 1], m_end = ptr<T>(ch.m)[j * b + b - 1];
    const T e_j = ch.e[j].item<T>();
    const T *dWe = ptr<T>(dWS_end[i]), *dSe = dWe + half, *W = ptr<T>(WS[i]), *S = W + half;
    T *dWn = ptr<T>(dWS[i]), *dSn = dWn + half;
    T dot_a = 0, dot_m = 0, dot_e = 0;
#pragma omp simd reduction(+ : dot_a, dot_m, dot_e)
    for (int64_t o = 0; o < half; ++o) {
      dWn[o] = a_end * dWe[o];
      dSn[o] = e_j * dSe[o] + m_end * dWe[o];
      dot_a += dWe[o] * W[o], dot_m += dWe[o] * S[o], dot_e += dSe[o] * S[o];
    }
    da[j * b + b - 1] += dot_a, dm[j * b + b - 1] += dot_m, de[j] += dot_e;
    Tensor dxc = at::mm(c.deltas[i], dWS_end[i].t());  // (b, 2 D); the gradient of xc is -dxc
    const T *X = ptr<T>(xs[i]), *Xc = ptr<T>(dxc), *Cl = ptr<T>(ch.C) + (j * b + b - 1) * b, *cS = ptr<T>(ch.cS) + j * b;
    T *dX = ptr<T>(dxs[i]), *dCl = dC + (j * b + b - 1) * b, *dcs = dcS + j * b;
    for (int64_t r = 0; r < b; ++r) {
      T sw = 0, ss = 0;
#pragma omp simd reduction(+ : sw, ss)
      for (int64_t col = 0; col < D; ++col) {
        const T w = -Xc[r * 2 * D + col], sv = -Xc[r * 2 * D + D + col], x = X[r * D + col];
        dX[r * D + col] += Cl[r] * w + cS[r] * sv;
        sw += w * x, ss += sv * x;
      }
      dCl[r] += sw, dcs[r] += ss;
    }
    ddt[i].addmm_(c.xcs[i], dWS_end[i], 1, -1);
  }

  // read: p_l = [a u, m u] @ [W; S] - (P * C) delta,  P = u x^T,  u_{l+1} = gelu(p_l)
  if (with_read) {
    Tensor dp;
    if (L == 1) {
      dp = dy;
    } else {  // y = q + gamma LN(u) + beta
      dp = at::empty_like(dy);
      const T *Dy = ptr<T>(dy), *nq = ptr<T>(c.nq), *rq = ptr<T>(c.rq);
      T* Dp = ptr<T>(dp);
      for (int64_t r = 0; r < b; ++r) {
        T mdn = 0, mdnn = 0;
#pragma omp simd reduction(+ : mdn, mdnn)
        for (int64_t col = 0; col < D0; ++col) {
          const int64_t o = r * D0 + col;
          dgm[col] += Dy[o] * nq[o], dbt[col] += Dy[o], dq[o] += Dy[o];
          const T dn = Dy[o] * gm[col];
          mdn += dn, mdnn += dn * nq[o];
        }
        mdn /= T(D0), mdnn /= T(D0);
        for (int64_t col = 0; col < D0; ++col) {
          const int64_t o = r * D0 + col;
          Dp[o] = rq[r] * (Dy[o] * gm[col] - mdn - nq[o] * mdnn);
        }
      }
    }
    for (int64_t i = L - 1; i >= 0; --i) {
      const int64_t j = gate(i, Lg), D = xs[i].size(1);
      const Tensor& u = c.us[i];
      Tensor dau = at::mm(dp, WS[i].t());  // (b, 2 D)
      dWS[i].addmm_(c.aus[i].t(), dp);
      Tensor du = at::empty_like(u);
      const T *Da = ptr<T>(dau), *U = ptr<T>(u), *a = ptr<T>(ch.a) + j * b, *m = ptr<T>(ch.m) + j * b;
      T* Du = ptr<T>(du);
      for (int64_t r = 0; r < b; ++r) {
        T sa = 0, sm = 0;
#pragma omp simd reduction(+ : sa, sm)
        for (int64_t col = 0; col < D; ++col) {
          const T ga = Da[r * 2 * D + col], gmm = Da[r * 2 * D + D + col];
          Du[r * D + col] = a[r] * ga + m[r] * gmm;
          sa += ga * U[r * D + col], sm += gmm * U[r * D + col];
        }
        da[j * b + r] += sa, dm[j * b + r] += sm;
      }
      Tensor dA = at::mm(dp, c.deltas[i].t());  // the gradient of A is -dA
      ddt[i].addmm_(c.As[i].t(), dp, 1, -1);
      Tensor dP = at::empty_like(dA);
      const T *dAp = ptr<T>(dA), *Pp = ptr<T>(c.Ps[i]), *Cj = ptr<T>(ch.C) + j * b * b;
      T *dPp = ptr<T>(dP), *dCj = dC + j * b * b;
      for (int64_t o = 0; o < b * b; ++o) dCj[o] -= dAp[o] * Pp[o], dPp[o] = -dAp[o] * Cj[o];
      du.addmm_(dP, xs[i]);
      dxs[i].addmm_(dP.t(), u);
      if (i > 0) {
        dp = du.mul_(c.gpps[i - 1]);
      } else {
        const T* Du0 = ptr<T>(du);
        for (int64_t o = 0; o < b * D; ++o) dq[o] += Du0[o];
      }
    }
  }

  // delta chain: delta_l = (delta_{l+1} G_{l+1}^T) * gelu'(z_l)
  TensorList dzs(L);
  auto add_dG = [&](int64_t i, const Tensor& x, const Tensor& y) {  // dG_i += dG_scale x y
    if (dG_scale == 0.0) return;
    Tensor into = dG_into.empty() ? dWS[i].narrow(0, 0, G[i].size(0)) : dG_into[i];
    into.addmm_(x, y, 1, dG_scale);
  };
  for (int64_t i = 0; i < L - 1; ++i) {
    Tensor dt_i = at::empty_like(ddt[i]);
    dzs[i] = at::empty_like(ddt[i]);
    const int64_t N = ddt[i].numel();
    const T *g = ptr<T>(ddt[i]), *gp = ptr<T>(c.gps[i]), *t = ptr<T>(c.ts[i]), *z = ptr<T>(c.zs[i]), *ph = ptr<T>(c.pdfs[i]);
    T *dt = ptr<T>(dt_i), *dz = ptr<T>(dzs[i]);
    for (int64_t o = 0; o < N; ++o) dt[o] = g[o] * gp[o], dz[o] = g[o] * t[o] * ph[o] * (T(2) - z[o] * z[o]);
    ddt[i + 1].addmm_(dt_i, G[i + 1]);
    add_dG(i + 1, dt_i.t(), c.deltas[i + 1]);
  }
  const Tensor& dd = ddt[L - 1];
  if (L == 1) {  // delta = z - v
    dzs[0] = dd;
    const T* g = ptr<T>(dd);
    for (int64_t o = 0; o < b * D0; ++o) dv[o] -= g[o];
  } else {  // delta = r * J(gn, n),  gn = gamma * err,  err = k + gamma n + beta - v,  (n, r) = LN(z)
    dzs[L - 1] = at::empty_like(dd);
    const T *g = ptr<T>(dd), *n = ptr<T>(c.n), *r = ptr<T>(c.r), *J = ptr<T>(c.J), *gn = ptr<T>(c.gn);
    const T* err = ptr<T>(c.err);
    T* dz = ptr<T>(dzs[L - 1]);
    std::vector<T> dn(D0);
    for (int64_t row = 0; row < b; ++row) {
      const int64_t o0 = row * D0;
      const T rr = r[row];
      T dr = 0, mdJ = 0, dJn = 0, mgnn = 0;
#pragma omp simd reduction(+ : dr, mdJ, dJn, mgnn)
      for (int64_t col = 0; col < D0; ++col) {
        const int64_t o = o0 + col;
        dr += g[o] * J[o];
        const T dJ = rr * g[o];
        mdJ += dJ, dJn += dJ * n[o], mgnn += gn[o] * n[o];
      }
      mdJ /= T(D0), dJn /= T(D0), mgnn /= T(D0);
      T mdn = 0, mdnn = 0;
#pragma omp simd reduction(+ : mdn, mdnn)
      for (int64_t col = 0; col < D0; ++col) {
        const int64_t o = o0 + col;
        const T dJ = rr * g[o];
        const T dgn = dJ - mdJ - n[o] * dJn;
        const T derr = gm[col] * dgn;
        dgm[col] += dgn * err[o] + derr * n[o];
        dbt[col] += derr;
        dk[o] += derr, dv[o] -= derr;
        dn[col] = -dJ * mgnn - gn[o] * dJn + gm[col] * derr;
        mdn += dn[col], mdnn += dn[col] * n[o];
      }
      mdn /= T(D0), mdnn /= T(D0);
      for (int64_t col = 0; col < D0; ++col) {
        const int64_t o = o0 + col;
        dz[o] = rr * (dn[col] - mdn - n[o] * mdnn) - (rr * rr * dr / T(D0)) * n[o];
      }
    }
  }

  // memory MLP on k: z_l = x_l G_l, x_{l+1} = gelu(z_l)
  for (int64_t i = L - 1; i >= 0; --i) {
    Tensor dz = dzs[i];
    if (i < L - 1) dz.addcmul_(dxs[i + 1], c.gps[i]);
    add_dG(i, xs[i].t(), dz);
    dxs[i].addmm_(dz, G[i].t());
  }
  const T* dx0 = ptr<T>(dxs[0]);
  for (int64_t o = 0; o < b * D0; ++o) dk[o] += dx0[o];
}

// chunked._backward_stretch's loops (the coefficients' gradients go back to the gates in Python):
// recompute the start states of chunks 0 .. n-1 from base G and state WS, then walk back from dWS
// (the gradient of the state after chunk n-1; dG_last: of the last chunk's base, or empty).
// Writes d q, k, v into dqkv (3 tensors like q) and the coefficients' gradients into d_coef
// (5 tensors like a, m, C, cS, e). Returns [d gamma, d beta (B, H, D) or None], then d of the
// state at chunk 0 per layer, preceded by d of the base G per layer when `first`.
std::vector<Tensor> backward_stretch(TensorList G, TensorList WS, Tensor q, Tensor k, Tensor v, Tensor a,
                                     Tensor m, Tensor C, Tensor cS, Tensor e, std::optional<Tensor> gamma,
                                     std::optional<Tensor> beta, std::optional<Tensor> dy, TensorList dWS,
                                     TensorList dG_last, bool first, double so_scale, TensorList dqkv,
                                     TensorList d_coef, bool norm_qk) {
  const Stretch s = make_stretch(std::move(G), std::move(WS), q, k, v, a, m, C, cS, e, gamma, beta, norm_qk);
  TORCH_CHECK(dqkv.size() == 3 && d_coef.size() == 5, "chunk loops: 3 + 5 gradient buffers expected");
  TORCH_CHECK(dWS.size() == static_cast<size_t>(s.L), "chunk loops: dWS must have one tensor per layer");
  for (const auto& t : dqkv) TORCH_CHECK(t.is_contiguous(), "chunk loops: gradient buffers must be contiguous");
  for (const auto& t : d_coef) TORCH_CHECK(t.is_contiguous(), "chunk loops: gradient buffers must be contiguous");
  for (const auto& t : dWS) TORCH_CHECK(t.is_contiguous(), "chunk loops: dWS must be contiguous");
  TORCH_CHECK(!dy || dy->is_contiguous(), "chunk loops: dy must be contiguous");
  for (auto& t : dqkv) t.zero_();
  for (auto& t : d_coef) t.zero_();
  Tensor dgamma, dbeta;
  if (s.L > 1) {
    dgamma = at::zeros({s.B, s.H, q.size(-1)}, q.options());
    dbeta = at::zeros_like(dgamma);
  }
  TensorList dWS_start, d_scratch, dG0;
  for (int64_t i = 0; i < s.L; ++i) {
    dWS_start.push_back(contiguous_empty(s.WS[i]));
    d_scratch.push_back(contiguous_empty(s.WS[i]));
    if (first) dG0.push_back(contiguous_empty(s.G[i]).zero_());
  }
  TensorList d_flat;  // d q, k, v and the coefficients' gradients, (n B H, ...)
  for (const auto& t : dqkv) d_flat.push_back(t.flatten(0, 2));
  for (const auto& t : d_coef) d_flat.push_back(t.flatten(0, 2));
  const Tensor dy_flat = dy ? dy->flatten(0, 2) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "backward_stretch", [&] {
    for_each_memory(s.B, s.H, [&](int64_t bi, int64_t hi) {
      const Tensor gamma_h = s.head(s.gamma, hi), beta_h = s.head(s.beta, hi);
      const Tensor dgamma_p = dgamma.defined() ? dgamma[bi][hi] : Tensor();
      const Tensor dbeta_p = dbeta.defined() ? dbeta[bi][hi] : Tensor();
      const TensorList G0 = pair_views(s.G, bi, hi);
      auto base = [&](int64_t c, const TensorList& ws) { return c == 0 ? G0 : w_part(ws); };
      // start states of the chunks (in one block per layer) and their inner gradients, kept for the walk back
      std::vector<TensorList> starts{pair_views(s.WS, bi, hi)};
      TensorList blocks;
      for (const auto& ws : starts[0])
        blocks.push_back(at::empty({std::max<int64_t>(s.n - 1, 1), ws.size(0), ws.size(1)}, ws.options()));
      std::vector<std::optional<Cache>> caches;
      for (int64_t c = 0; c + 1 < s.n; ++c) {
        const Chunk ch = s.chunk<scalar_t>(c, bi, hi, false);
        Cache cache = inner_gradients<scalar_t>(base(c, starts.back()), ch, gamma_h, beta_h);
        written_keys<scalar_t>(cache, ch, s.Lg);
        TensorList out;
        for (const auto& blk : blocks) out.push_back(blk[c]);
        update<scalar_t>(cache, starts.back(), ch, s.Lg, out);
        starts.push_back(std::move(out));
        caches.emplace_back(std::move(cache));
      }
      caches.emplace_back(std::nullopt);
      // d of the start states alternate between two buffers; chunk 0's lands in dWS_start
      const TensorList bufs[2] = {pair_views(dWS_start, bi, hi), pair_views(d_scratch, bi, hi)};
      TensorList dws = pair_views(dWS, bi, hi);
      const TensorList dG0_p = first ? pair_views(dG0, bi, hi) : TensorList();
      for (int64_t c = s.n - 1; c >= 0; --c) {
        const Chunk ch = s.chunk<scalar_t>(c, bi, hi, dy.has_value());
        const TensorList Gc = base(c, starts[c]);
        Cache cache = caches[c] ? std::move(*caches[c]) : inner_gradients<scalar_t>(Gc, ch, gamma_h, beta_h);
        caches[c].reset();
        const int64_t i = s.at(c, bi, hi);
        const Chunk d{d_flat[0][i], d_flat[1][i], d_flat[2][i], d_flat[3][i],
                      d_flat[4][i], d_flat[5][i], d_flat[6][i], d_flat[7][i]};
        // this chunk's base is the previous chunk's end W, except the stream's first chunk's (dG0)
        const TensorList& dG_into = (c == 0 && first) ? dG0_p : TensorList();
        const TensorList& out = bufs[c % 2];
        chunk_backward<scalar_t>(Gc, starts[c], ch, gamma_h, beta_h, s.Lg, dy ? dy_flat[i] : Tensor(), dws,
                                 so_scale, std::move(cache), d, dgamma_p, dbeta_p, out, dG_into);
        if (s.norm_qk) {  // d of the normalised q, k -> d of q, k as given
          const Chunk raw = s.raw(c, bi, hi);
          if (dy) l2_normalize_backward_<scalar_t>(raw.q, d.q);
          l2_normalize_backward_<scalar_t>(raw.k, d.k);
        }
        if (c == s.n - 1 && !dG_last.empty()) {  // gradient into the open chunk's base (not scaled)
          const TensorList last = pair_views(dG_last, bi, hi);
          for (int64_t i = 0; i < s.L; ++i)
            (dG_into.empty() ? out[i].narrow(0, 0, last[i].size(0)) : dG_into[i]).add_(last[i]);
        }
        dws = out;
      }
    });
  });
  std::vector<Tensor> out{dgamma, dbeta};
  out.insert(out.end(), dG0.begin(), dG0.end());
  out.insert(out.end(), dWS_start.begin(), dWS_start.end());
  return out;
}

}  // namespace

// conv_silu.cpp: the layer's causal convolution + SiLU
void conv_silu_forward(const at::Tensor& x, const at::Tensor& left, const at::Tensor& taps, const at::Tensor& out);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_silu_backward(const at::Tensor& x, const at::Tensor& left,
                                                                 const at::Tensor& taps, const at::Tensor& dy);

// coefficients.cpp: chunked.chunk_coefficients and its backward
std::vector<at::Tensor> chunk_coefficients(const at::Tensor& alpha, const at::Tensor& eta, const at::Tensor& theta,
                                           const at::Tensor& valid);
std::vector<at::Tensor> chunk_coefficients_backward(const at::Tensor& alpha, const at::Tensor& eta,
                                                    const at::Tensor& theta, const at::Tensor& valid,
                                                    const at::Tensor& da, const at::Tensor& dm, const at::Tensor& dC,
                                                    const at::Tensor& dcS, const at::Tensor& de);

// gated_output.cpp: layer._GatedOutput's elementwise passes
void gated_output_forward(const at::Tensor& y, const at::Tensor& g, const at::Tensor& w, double eps,
                          const at::Tensor& z);
at::Tensor gated_output_backward(const at::Tensor& y, const at::Tensor& g, const at::Tensor& w, double eps,
                                 const at::Tensor& dz, const at::Tensor& z, const at::Tensor& dg,
                                 const at::Tensor& dy);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "titans: the neural memory's chunk loops on the CPU, one memory per thread";
  mod.def("forward_stretch", &forward_stretch, py::call_guard<py::gil_scoped_release>());
  mod.def("backward_stretch", &backward_stretch, py::call_guard<py::gil_scoped_release>());
  mod.def("chunk_coefficients", &chunk_coefficients, py::call_guard<py::gil_scoped_release>());
  mod.def("chunk_coefficients_backward", &chunk_coefficients_backward, py::call_guard<py::gil_scoped_release>());
  mod.def("gated_output_forward", &gated_output_forward, py::call_guard<py::gil_scoped_release>());
  mod.def("gated_output_backward", &gated_output_backward, py::call_guard<py::gil_scoped_release>());
  mod.def("conv_silu_forward", &conv_silu_forward, py::call_guard<py::gil_scoped_release>());
  mod.def("conv_silu_backward", &conv_silu_backward, py::call_guard<py::gil_scoped_release>());
}
