// Fused CPU forward and backward of sigmoid and ReLU attention (attnswap::attention, impl="cpu").
//
// Flash-style: a query block of one head meets one key block at a time; its score tile stays
// in the core's L2 (128 x 256 fp32 = 128 KiB) from the S = Q Kᵀ matmul, through the pointwise
// activation (and the mask), into the P V matmul. The tiled torch kernel (cpu.py) issues each
// of those steps as a separate torch op over a 16 MiB tile of every head at once, which made
// its pointwise passes memory-bound (~35 % of a T=512 forward); here they cost about what the
// cache allows. Sigmoid and ReLU need no running max or row sum: each key block's weights are
// final when computed, so the forward is 2 matmuls and one pass per tile, the backward
// 5 matmuls (S is recomputed: storing P would cost T² memory per head) and one pass.
//
// Plain C ABI over raw pointers and element strides (loaded with ctypes; no torch headers, so
// it builds in about two seconds). The matmuls are BLAS sgemm_ from the libtorch_cpu that torch
// already loaded (MKL on x86-64); threads come from the same libgomp torch uses (one OpenMP
// runtime in the process). Inside a parallel region of more than one thread, MKL runs each call
// single-threaded by itself (it checks omp_in_parallel).
//
// Semantics are those of kernels/reference.py, restricted to what `unsupported()` in
// __init__.py admits: fp32 compute, no dropout, length = Tk or a constant, no mask gradient.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
}

namespace {

// Row-major C[M x N] = alpha op(A) op(B) + beta C through column-major BLAS (C^T = op(B)^T op(A)^T).
inline void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // nothing summed: C = beta C (BLAS would do the same; be explicit)
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) C[(int64_t)r * ldc + c] = beta == 0.f ? 0.f : beta * C[(int64_t)r * ldc + c];
    return;
  }
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  sgemm_(&tB, &tA, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// exp(x) for the sigmoid, branch-free so the loops vectorize (Cephes' expf: 2^n · poly(r),
// r = x - n ln 2 in two parts; ~1 ulp on the clamped range, which covers every float whose
// sigmoid is not exactly 0 or 1 in fp32).
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.33654f), 88.37626f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return p * s;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

// Activations (kernels/reference.py ACTIVATIONS order) and which state the backward needs.
enum Act { RELU = 0, RELU2 = 1, GELU = 2, SOFTPLUS = 3, IDENTITY = 4, RELU6 = 5, SIGMOID = 6 };
// Derivative readable from P = h(S)·vis alone (0 where P is masked) vs needing S itself.
inline bool grad_from_p(int act) { return act == RELU || act == RELU2 || act == RELU6 || act == SIGMOID; }

inline float activate(int act, float x) {
  switch (act) {
    case RELU: return x > 0.f ? x : 0.f;
    case RELU2: { float r = x > 0.f ? x : 0.f; return r * r; }
    case GELU: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case SOFTPLUS: return x > 20.f ? x : std::log1p(std::exp(x));
    case IDENTITY: return x;
    case RELU6: return std::min(std::max(x, 0.f), 6.f);
    default: return sigmoid(x);
  }
}

// dh/dS given S (for GELU, softplus, identity).
inline float activation_grad_from_s(int act, float x) {
  switch (act) {
    case GELU: {
      float cdf = 0.5f * (1.0f + std::erf(x * 0.70710678118654752f));
      float pdf = 0.39894228040143268f * std::exp(-0.5f * x * x);
      return cdf + x * pdf;
    }
    case SOFTPLUS: { if (x > 20.f) return 1.f; float z = std::exp(x); return z / (z + 1.f); }
    default: return 1.f;  // identity
  }
}

// Mask tile classes (computed by classify_mask, cached per mask object in Python).
enum TileClass : uint8_t { HIDDEN = 0, FREE = 1, VISIBILITY = 2, BIASED = 3 };

struct Problem {
  int64_t B, Hq, Hkv, Tq, Tk, D, Dv;
  const float* q; int64_t qs[3];   // strides (elements) of batch, head, token; head-dim stride 1
  const float* k; int64_t ks[3];
  const float* v; int64_t vs[3];
  const void* mask; int mask_bool; int64_t ms[4];  // strides of the mask expanded to [B,Hq,Tq,Tk]
  float mask_thr;                 // a float mask entry <= this hides the key
  const uint8_t* tiles; int64_t ts[4];  // tile classes [Bm,Hm,nI,nJ] with broadcast strides 0
  int kind;                       // 0 = sigmoid, 1 = relu family
  int act;
  float scale, bias, factor;      // S = scale·q·k; sigmoid(S + bias); relu: h(S)·factor
  int causal;
  int bq, bk;
  int threads;
};

inline uint8_t tile_class(const Problem& p, int64_t b, int64_t h, int64_t ti, int64_t tj) {
  if (!p.mask) return FREE;
  return p.tiles[b * p.ts[0] + h * p.ts[1] + ti * p.ts[2] + tj * p.ts[3]];
}

// Scores S (n x m, row-major, already scaled) → weights in place, for query rows i0.. and keys
// j0.. of head (b, h). Masked and causally hidden entries become exactly 0. With `xs`, the
// masked-bias-added scores are kept there (NaN where hidden) for activations whose gradient
// needs S.
void weights(const Problem& p, int64_t b, int64_t h, int64_t i0, int n, int64_t j0, int m,
             uint8_t cls, float* S, float* xs) {
  const bool sig = p.kind == 0;
  for (int r = 0; r < n; ++r) {
    float* s = S + (int64_t)r * m;
    float* x = xs ? xs + (int64_t)r * m : nullptr;
    int cend = m;
    if (p.causal) cend = (int)std::min<int64_t>(std::max<int64_t>(i0 + r - j0 + 1, 0), m);
    const int64_t qi = i0 + r;
    if (cls == FREE) {
      if (sig) {
        const float bias = p.bias;
#pragma GCC ivdep
        for (int c = 0; c < cend; ++c) s[c] = sigmoid(s[c] + bias);
      } else if (p.act == RELU) {
#pragma GCC ivdep
        for (int c = 0; c < cend; ++c) s[c] = s[c] > 0.f ? s[c] : 0.f;
      } else if (p.act == RELU2) {
#pragma GCC ivdep
        for (int c = 0; c < cend; ++c) { float t = s[c] > 0.f ? s[c] : 0.f; s[c] = t * t; }
      } else {
        for (int c = 0; c < cend; ++c) {
          if (x) x[c] = s[c];
          s[c] = activate(p.act, s[c]);
        }
      }
    } else if (p.mask_bool) {
      const uint8_t* mr = (const uint8_t*)p.mask + b * p.ms[0] + h * p.ms[1] + qi * p.ms[2] + j0 * p.ms[3];
      if (sig) {
        const float bias = p.bias;
#pragma GCC ivdep
        for (int c = 0; c < cend; ++c) { float w = sigmoid(s[c] + bias); s[c] = mr[c] ? w : 0.f; }
      } else {
        for (int c = 0; c < cend; ++c) {
          bool vis = mr[c];
          if (x) x[c] = vis ? s[c] : NAN;
          s[c] = vis ? activate(p.act, s[c]) : 0.f;
        }
      }
    } else {
      const float* mr = (const float*)p.mask + b * p.ms[0] + h * p.ms[1] + qi * p.ms[2] + j0 * p.ms[3];
      const float thr = p.mask_thr;
      const bool biased = cls == BIASED;
      if (sig) {
        const float bias = p.bias;
        if (biased) {
#pragma GCC ivdep
          for (int c = 0; c < cend; ++c) {
            bool vis = mr[c] > thr;
            float w = sigmoid(s[c] + (vis ? mr[c] : 0.f) + bias);
            s[c] = vis ? w : 0.f;
          }
        } else {
#pragma GCC ivdep
          for (int c = 0; c < cend; ++c) { float w = sigmoid(s[c] + bias); s[c] = mr[c] > thr ? w : 0.f; }
        }
      } else {
        for (int c = 0; c < cend; ++c) {
          bool vis = mr[c] > thr;
          float y = s[c] + ((biased && vis) ? mr[c] : 0.f);
          if (x) x[c] = vis ? y : NAN;
          s[c] = vis ? activate(p.act, y) : 0.f;
        }
      }
    }
    for (int c = cend; c < m; ++c) { s[c] = 0.f; if (x) x[c] = NAN; }
  }
}

// dP (n x m) → dS in place: h'(S)·dP, 0 where hidden.
void score_grads(const Problem& p, int n, int m, const float* P, const float* xs, float* dP) {
  const int64_t size = (int64_t)n * m;
  if (p.kind == 0 || p.act == SIGMOID) {
#pragma GCC ivdep
    for (int64_t e = 0; e < size; ++e) dP[e] *= P[e] * (1.f - P[e]);
  } else if (p.act == RELU) {
#pragma GCC ivdep
    for (int64_t e = 0; e < size; ++e) dP[e] = P[e] > 0.f ? dP[e] : 0.f;
  } else if (p.act == RELU2) {  // h' = 2 relu(S) = 2 sqrt(P)
#pragma GCC ivdep
    for (int64_t e = 0; e < size; ++e) dP[e] *= 2.f * std::sqrt(P[e]);
  } else if (p.act == RELU6) {
#pragma GCC ivdep
    for (int64_t e = 0; e < size; ++e) dP[e] = (P[e] > 0.f && P[e] < 6.f) ? dP[e] : 0.f;
  } else {
    for (int64_t e = 0; e < size; ++e)
      dP[e] = std::isnan(xs[e]) ? 0.f : dP[e] * activation_grad_from_s(p.act, xs[e]);
  }
}

inline int64_t n_blocks(int64_t t, int b) { return (t + b - 1) / b; }

// rows x cols floats at row stride ld set to zero (a contiguous block in one memset)
inline void zero_rows(float* x, int64_t rows, int64_t cols, int64_t ld) {
  if (ld == cols) {
    std::memset(x, 0, sizeof(float) * rows * cols);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) std::memset(x + r * ld, 0, sizeof(float) * cols);
}

// The last key block a query block [i0, i0 + n) reaches (exclusive end in keys).
inline int64_t key_end(const Problem& p, int64_t i0, int n) {
  return p.causal ? std::min<int64_t>(p.Tk, i0 + n) : p.Tk;
}

}  // namespace

extern "C" {

// Classify a mask's tiles: out [Bm, Hm, nI, nJ] (the mask's own, unexpanded dims; a broadcast
// query or key dim counts as one tile along it). `kind_softmax` is not supported here.
void attnswap_classify_mask(const void* mask, int mask_bool, int64_t Bm, int64_t Hm, int64_t R,
                            int64_t C, const int64_t* ms, float thr, int bq, int bk,
                            uint8_t* out, int threads) {
  const int64_t tr = R > 1 ? bq : 1, tc = C > 1 ? bk : 1;
  const int64_t nI = n_blocks(R, (int)tr), nJ = n_blocks(C, (int)tc);
  const int64_t total = Bm * Hm * nI * nJ;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t t = 0; t < total; ++t) {
    int64_t tj = t % nJ, ti = (t / nJ) % nI, h = (t / (nJ * nI)) % Hm, b = t / (nJ * nI * Hm);
    bool any_vis = false, any_hid = false, any_bias = false;
    for (int64_t r = ti * tr; r < std::min(R, (ti + 1) * tr); ++r) {
      const int64_t base = b * ms[0] + h * ms[1] + r * ms[2];
      const int64_t c0 = tj * tc, c1 = std::min(C, (tj + 1) * tc);
      if (mask_bool) {
        const uint8_t* row = (const uint8_t*)mask + base;
        for (int64_t c = c0; c < c1; ++c) {
          bool v = row[c * ms[3]];
          any_vis |= v; any_hid |= !v;
        }
      } else {
        const float* row = (const float*)mask + base;
        for (int64_t c = c0; c < c1; ++c) {
          float x = row[c * ms[3]];
          bool v = x > thr;
          any_vis |= v; any_hid |= !v; any_bias |= v && x != 0.f;
        }
      }
    }
    out[t] = !any_vis ? HIDDEN : any_bias ? BIASED : any_hid ? VISIBILITY : FREE;
  }
}

// out [B, Hq, Tq, Dv] fp32 through strides os (batch, head, token; head-dim stride 1): the
// caller picks the layout ([B, T, H, D] in memory where the site's SDPA would return that).
void attnswap_forward(const Problem* pp, float* out, const int64_t* os) {
  const Problem& p = *pp;
  const int64_t G = p.Hq / p.Hkv, nI = n_blocks(p.Tq, p.bq);
  const int64_t total = p.B * p.Hq * nI;
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<float> sbuf((size_t)p.bq * p.bk);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < total; ++t) {
      // causal: the longest query blocks (last ones) first, for load balance
      const int64_t ti = p.causal ? nI - 1 - t % nI : t % nI, bh = t / nI;
      const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / G;
      const int64_t i0 = ti * p.bq;
      const int n = (int)std::min<int64_t>(p.bq, p.Tq - i0);
      const float* Q = p.q + b * p.qs[0] + h * p.qs[1] + i0 * p.qs[2];
      const float* K = p.k + b * p.ks[0] + hk * p.ks[1];
      const float* V = p.v + b * p.vs[0] + hk * p.vs[1];
      float* O = out + b * os[0] + h * os[1] + i0 * os[2];
      bool first = true;
      const int64_t kend = key_end(p, i0, n);
      for (int64_t j0 = 0; j0 < kend; j0 += p.bk) {
        const uint8_t cls = tile_class(p, b, h, ti, j0 / p.bk);
        if (cls == HIDDEN) continue;
        const int m = (int)std::min<int64_t>(p.bk, kend - j0);
        float* S = sbuf.data();
        gemm(false, true, n, m, (int)p.D, p.scale, Q, (int)p.qs[2], K + j0 * p.ks[2], (int)p.ks[2],
             0.f, S, m);
        weights(p, b, h, i0, n, j0, m, cls, S, nullptr);
        gemm(false, false, n, (int)p.Dv, m, p.factor, S, m, V + j0 * p.vs[2], (int)p.vs[2],
             first ? 0.f : 1.f, O, (int)os[2]);
        first = false;
      }
      if (first) zero_rows(O, n, p.Dv, os[2]);
    }
  }
}

// dq [B,Hq,Tq,D], dk [B,Hkv,Tk,D], dv [B,Hkv,Tk,Dv]: fp32, written (not added to), through
// strides dqs / dks / dvs (the inputs' own layouts, so autograd need not copy them back);
// do_ has q's layout rules (strides dos, head-dim stride 1).
void attnswap_backward(const Problem* pp, const float* do_, const int64_t* dos, float* dq,
                       const int64_t* dqs, float* dk, const int64_t* dks, float* dv,
                       const int64_t* dvs) {
  const Problem& p = *pp;
  const int64_t G = p.Hq / p.Hkv, nI = n_blocks(p.Tq, p.bq);
  // Tasks own one key/value head and a part of its query group; when the (batch, kv head)
  // pairs are fewer than the threads, the group is split and the parts' dK, dV are summed.
  int64_t split = 1;
  while (p.B * p.Hkv * split < p.threads && split < G) ++split;
  while (G % split) --split;
  const int64_t gper = G / split, tasks = p.B * p.Hkv * split;
  const int64_t kv_elems = p.Tk * (p.D + p.Dv);
  std::vector<float> partial(split > 1 ? (size_t)(tasks * kv_elems) : 0);
  const bool keep_s = p.kind == 1 && !grad_from_p(p.act);
#pragma omp parallel num_threads(p.threads)
  {
    const size_t tile = (size_t)p.bq * p.bk;
    std::vector<float> pbuf(tile), dpbuf(tile), xbuf(keep_s ? tile : 0);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t part = t % split, bk_ = t / split;
      const int64_t b = bk_ / p.Hkv, hk = bk_ % p.Hkv;
      // row strides of this task's dK / dV (a split's partials are contiguous)
      float* DK; float* DV;
      int64_t ldk, ldv;
      if (split > 1) {
        DK = partial.data() + t * kv_elems;
        DV = DK + p.Tk * p.D;
        ldk = p.D, ldv = p.Dv;
      } else {
        DK = dk + b * dks[0] + hk * dks[1];
        DV = dv + b * dvs[0] + hk * dvs[1];
        ldk = dks[2], ldv = dvs[2];
      }
      zero_rows(DK, p.Tk, p.D, ldk);
      zero_rows(DV, p.Tk, p.Dv, ldv);
      const float* K = p.k + b * p.ks[0] + hk * p.ks[1];
      const float* V = p.v + b * p.vs[0] + hk * p.vs[1];
      for (int64_t g = part * gper; g < (part + 1) * gper; ++g) {
        const int64_t h = hk * G + g;
        float* DQh = dq + b * dqs[0] + h * dqs[1];
        zero_rows(DQh, p.Tq, p.D, dqs[2]);
        for (int64_t ti = 0; ti < nI; ++ti) {
          const int64_t i0 = ti * p.bq;
          const int n = (int)std::min<int64_t>(p.bq, p.Tq - i0);
          const float* Q = p.q + b * p.qs[0] + h * p.qs[1] + i0 * p.qs[2];
          const float* dO = do_ + b * dos[0] + h * dos[1] + i0 * dos[2];
          float* DQ = DQh + i0 * dqs[2];
          const int64_t kend = key_end(p, i0, n);
          for (int64_t j0 = 0; j0 < kend; j0 += p.bk) {
            const uint8_t cls = tile_class(p, b, h, ti, j0 / p.bk);
            if (cls == HIDDEN) continue;
            const int m = (int)std::min<int64_t>(p.bk, kend - j0);
            const float* Kj = K + j0 * p.ks[2];
            const float* Vj = V + j0 * p.vs[2];
            float* P = pbuf.data();
            float* dP = dpbuf.data();
            gemm(false, true, n, m, (int)p.D, p.scale, Q, (int)p.qs[2], Kj, (int)p.ks[2], 0.f, P, m);
            weights(p, b, h, i0, n, j0, m, cls, P, keep_s ? xbuf.data() : nullptr);
            // dV_j += f Pᵀ dO ; dP = f dO V_jᵀ  (f = L^-α, folded into the matmuls)
            gemm(true, false, m, (int)p.Dv, n, p.factor, P, m, dO, (int)dos[2], 1.f,
                 DV + j0 * ldv, (int)ldv);
            gemm(false, true, n, m, (int)p.Dv, p.factor, dO, (int)dos[2], Vj, (int)p.vs[2], 0.f, dP, m);
            score_grads(p, n, m, P, keep_s ? xbuf.data() : nullptr, dP);
            gemm(false, false, n, (int)p.D, m, p.scale, dP, m, Kj, (int)p.ks[2], 1.f, DQ,
                 (int)dqs[2]);
            gemm(true, false, m, (int)p.D, n, p.scale, dP, m, Q, (int)p.qs[2], 1.f,
                 DK + j0 * ldk, (int)ldk);
          }
        }
      }
    }
  }
  if (split > 1) {
    const int64_t pairs = p.B * p.Hkv;
#pragma omp parallel for num_threads(p.threads)
    for (int64_t bk_ = 0; bk_ < pairs; ++bk_) {
      const int64_t b = bk_ / p.Hkv, hk = bk_ % p.Hkv;
      float* DK = dk + b * dks[0] + hk * dks[1];
      float* DV = dv + b * dvs[0] + hk * dvs[1];
      const float* src0 = partial.data() + bk_ * split * kv_elems;
      // the parts summed in split order, row by row (deterministic)
      for (int64_t r = 0; r < p.Tk; ++r) {
        float* dkr = DK + r * dks[2];
        float* dvr = DV + r * dvs[2];
        const float* sk = src0 + r * p.D;
        const float* sv = src0 + p.Tk * p.D + r * p.Dv;
        for (int64_t e = 0; e < p.D; ++e) dkr[e] = sk[e];
        for (int64_t e = 0; e < p.Dv; ++e) dvr[e] = sv[e];
        for (int64_t s = 1; s < split; ++s) {
          const float* src = src0 + s * kv_elems;
          for (int64_t e = 0; e < p.D; ++e) dkr[e] += src[r * p.D + e];
          for (int64_t e = 0; e < p.Dv; ++e) dvr[e] += src[p.Tk * p.D + r * p.Dv + e];
        }
      }
    }
  }
}

int attnswap_abi_version() { return 2; }

}  // extern "C"
