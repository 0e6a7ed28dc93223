"""Optional fast CPU kernels, compiled on first use with torch's C++ extension loader (the compiler inductor needs
anyway) and kept behind the pure-PyTorch path, which stays the reference and is always tested against them.

`latent_decode_attention`: absorbed-MLA decode attention over the latent cache in one pass (flash-decoding on a
CPU core). The PyTorch path is three library matrix products per layer (scores against c_KV, scores against k_pe,
probabilities times c_KV) with a softmax between them: at batch 1 those are 8-row products that read the cache
twice, the first time cold (the step's 25 MB of weights have pushed it out of cache), and at a 2,048-token context
they took ~190 us a layer of a ~3.6 ms compiled step. This kernel walks the cache once in blocks of 32 slots:
scores for every query of the row, an online softmax, and the weighted sum into the output while the block is in
L1 (dev/LOG.md, session 6). Built with -march=native: on AVX-512 machines a 16-lane variant holds two channels
of each query per register (dev/LOG.md, session 7).

`few_rows_mm`: x [M, K] @ W^T for the 2-16 rows of a small decode step (a speculative verify has two tokens a row),
reading each weight row once for all of them; `few_rows_pass` puts it into compiled decode graphs.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Eight fp32 lanes (GCC / clang vector extensions: AVX2 registers, or SSE pairs, whatever -march gives). The lanes
// are eight queries of one cache row: scores, running max, softmax sums and output accumulators are all per query,
// so nothing in the kernel ever reduces across a vector.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;
constexpr int64_t kBlock = 32;  // cache slots per block
constexpr int kKeys = 8;        // slots scored at once: eight independent FMA chains

inline vf8 splat(float x) { return vf8{x, x, x, x, x, x, x, x}; }

// e^x for x <= 0 (a score minus its running max): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to
// r^6 (relative error < 2e-7), 2^n through the exponent bits. Below -87 it gives ~1e-38 instead of 0: against the
// max's own term of 1, nothing.
inline vf8 exp_nonpos(vf8 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const vi8 ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi8);  // round half away, x <= 0
  const vf8 n = __builtin_convertvector(ni, vf8);
  const vf8 r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vf8 p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi8 bits = (ni + 127) << 23;
  vf8 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// The online softmax of one block: scores e[0..n) of slots s0.. become probabilities against the updated running
// max; returns the factor that rescales what was accumulated before. Slots below `all_see` are visible to every
// lane (decode: all of them), so only the block holding a lane's limit pays for the mask.
inline vf8 softmax_block(vf8* e, int64_t s0, int64_t n, const vf8& lim, int64_t all_see, vf8& run_max, vf8& den) {
  const bool masked = s0 + n > all_see;
  vf8 block_max = splat(-FLT_MAX);
  for (int64_t j = 0; j < n; ++j) {
    if (masked) e[j] = (splat(static_cast<float>(s0 + j)) <= lim) ? e[j] : splat(-FLT_MAX);
    block_max = block_max > e[j] ? block_max : e[j];
  }
  const vf8 new_max = run_max > block_max ? run_max : block_max;
  const vf8 correction = exp_nonpos(run_max - new_max);
  run_max = new_max;
  vf8 sum = vf8{};
  for (int64_t j = 0; j < n; ++j) {
    vf8 p = exp_nonpos(e[j] - new_max);
    if (masked) p = (splat(static_cast<float>(s0 + j)) <= lim) ? p : vf8{};
    e[j] = p;
    sum += p;
  }
  den = den * correction + sum;
  return correction;
}

// One group of up to eight queries of one row against that row's cache, one pass over slots 0..last.
// qT [C][8] and qpT [R][8]: the queries transposed, lane = query; lim [8]: each lane's last visible slot (-1 for
// padding lanes). accT [C][8] receives softmax(scores) . kv, den [8] the softmax denominators.
void attend_group(const vf8* qT, const vf8* qpT, const vf8& lim, int64_t all_see, const float* kv, int64_t kv_s,
                  const float* pe, int64_t pe_s, int64_t C, int64_t R, int64_t last, float scale, vf8* accT,
                  vf8& den) {
  vf8 run_max = splat(-FLT_MAX);
  den = vf8{};
  for (int64_t c = 0; c < C; ++c) accT[c] = vf8{};
  vf8 e[kBlock];
  for (int64_t s0 = 0; s0 <= last; s0 += kBlock) {
    const int64_t n = std::min(kBlock, last + 1 - s0);
    // scores, kKeys slots at a time: s[k] += kv[slot k][c] (broadcast) * q[c] (eight queries)
    for (int64_t j = 0; j < n; j += kKeys) {
      const int64_t w = std::min<int64_t>(kKeys, n - j);
      const float* kr[kKeys];
      const float* pr[kKeys];
      for (int k = 0; k < kKeys; ++k) {
        const int64_t slot = s0 + j + std::min<int64_t>(k, w - 1);  // past the end: repeat the last slot
        kr[k] = kv + slot * kv_s;
        pr[k] = pe + slot * pe_s;
      }
      vf8 s[kKeys] = {};
      for (int64_t c = 0; c < C; ++c) {
        const vf8 q = qT[c];
        for (int k = 0; k < kKeys; ++k) s[k] += kr[k][c] * q;
      }
      for (int64_t r = 0; r < R; ++r) {
        const vf8 q = qpT[r];
        for (int k = 0; k < kKeys; ++k) s[k] += pr[k][r] * q;
      }
      for (int k = 0; k < kKeys; ++k) e[j + k] = s[k] * scale;  // j + k < kBlock; slots past n unused
    }
    // online softmax: mask, block max, rescale what came before
    const vf8 correction = softmax_block(e, s0, n, lim, all_see, run_max, den);
    // accT[c] = accT[c] * correction + sum_j p_j * kv[slot j][c], eight c at a time in registers
    int64_t c0 = 0;
    for (; c0 + 8 <= C; c0 += 8) {
      vf8 a[8];
      for (int i = 0; i < 8; ++i) a[i] = accT[c0 + i] * correction;
      for (int64_t j = 0; j < n; ++j) {
        const float* k = kv + (s0 + j) * kv_s + c0;
        const vf8 p = e[j];
        for (int i = 0; i < 8; ++i) a[i] += k[i] * p;
      }
      for (int i = 0; i < 8; ++i) accT[c0 + i] = a[i];
    }
    for (int64_t c = c0; c < C; ++c) {
      vf8 a = accT[c] * correction;
      for (int64_t j = 0; j < n; ++j) a += kv[(s0 + j) * kv_s + c] * e[j];
      accT[c] = a;
    }
  }
}

#if defined(__AVX512F__)
// The same pass with 16-lane registers. Eight queries fill only half of one, so a vector holds two channels of
// each query side by side (lane 2l: query l at channel c, lane 2l + 1: at channel c + 1) and the cache side is
// a 64-bit broadcast of the two neighbouring values kv[slot][c], kv[slot][c + 1]: every FMA does 16 useful
// products, half the FMAs of the 8-lane loop. The two lanes of a query are summed once per slot (scores) and
// once per call (output).
typedef float vf16 __attribute__((vector_size(64)));
typedef double vd8 __attribute__((vector_size(64)));

inline vf16 pair_splat(const float* p) {  // [p0, p1] x 8
  double d;
  std::memcpy(&d, p, sizeof(d));
  return reinterpret_cast<vf16>(vd8{d, d, d, d, d, d, d, d});  // (not vd8{} + d: 0 + d is an add, then a shuffle)
}
inline vf16 splat16(float x) { return vf16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline vf16 interleave(const vf8& a, const vf8& b) {
  return __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
}
inline vf16 dup(const vf8& a) { return __builtin_shufflevector(a, a, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7); }
inline vf8 even(const vf16& a) { return __builtin_shufflevector(a, a, 0, 2, 4, 6, 8, 10, 12, 14); }
inline vf8 odd(const vf16& a) { return __builtin_shufflevector(a, a, 1, 3, 5, 7, 9, 11, 13, 15); }

// Scores of kKeys slots' rows (n channels each) against the paired queries q2: s[k] += rows[k] . q, two channels
// a lane pair.
inline void paired_scores(vf16* s, const vf16* q2, const float* const* rows, int64_t n) {
  for (int64_t i = 0; i < n / 2; ++i) {
    const vf16 q = q2[i];
    for (int k = 0; k < kKeys; ++k) s[k] += pair_splat(rows[k] + 2 * i) * q;
  }
  if (n & 1) {  // the last channel alone: its pair's odd lanes hold zero queries
    const vf16 q = q2[n / 2];
    for (int k = 0; k < kKeys; ++k) s[k] += splat16(rows[k][n - 1]) * q;
  }
}

void attend_group_paired(const vf8* qT, const vf8* qpT, const vf8& lim, int64_t all_see, const float* kv,
                         int64_t kv_s, const float* pe, int64_t pe_s, int64_t C, int64_t R, int64_t last,
                         float scale, vf8* accT, vf8& den) {
  const int64_t P = C / 2;  // channel pairs of the output; an odd last channel goes through the 8-lane loop
  std::vector<vf16> q2((C + 1) / 2), qp2((R + 1) / 2), acc2(P);
  for (int64_t i = 0; i < C / 2; ++i) q2[i] = interleave(qT[2 * i], qT[2 * i + 1]);
  if (C & 1) q2[C / 2] = interleave(qT[C - 1], vf8{});
  for (int64_t i = 0; i < R / 2; ++i) qp2[i] = interleave(qpT[2 * i], qpT[2 * i + 1]);
  if (R & 1) qp2[R / 2] = interleave(qpT[R - 1], vf8{});
  vf8 run_max = splat(-FLT_MAX);
  den = vf8{};
  if (C & 1) accT[C - 1] = vf8{};
  vf8 e[kBlock];
  for (int64_t s0 = 0; s0 <= last; s0 += kBlock) {
    const int64_t n = std::min(kBlock, last + 1 - s0);
    for (int64_t j = 0; j < n; j += kKeys) {
      const int64_t w = std::min<int64_t>(kKeys, n - j);
      const float* kr[kKeys];
      const float* pr[kKeys];
      for (int k = 0; k < kKeys; ++k) {
        const int64_t slot = s0 + j + std::min<int64_t>(k, w - 1);
        kr[k] = kv + slot * kv_s;
        pr[k] = pe + slot * pe_s;
      }
      vf16 s[kKeys] = {};
      paired_scores(s, q2.data(), kr, C);
      paired_scores(s, qp2.data(), pr, R);
      for (int k = 0; k < kKeys; ++k) e[j + k] = (even(s[k]) + odd(s[k])) * scale;
    }
    // online softmax: mask, block max, rescale what came before
    const vf8 correction = softmax_block(e, s0, n, lim, all_see, run_max, den);
    const vf16 corr2 = dup(correction);
    int64_t i0 = 0;
    for (; i0 + 8 <= P; i0 += 8) {  // eight channel pairs (16 channels) in registers over the block's slots
      vf16 a[8];
      for (int i = 0; i < 8; ++i) a[i] = acc2[i0 + i] * corr2;
      for (int64_t j = 0; j < n; ++j) {
        const float* k = kv + (s0 + j) * kv_s + 2 * i0;
        const vf16 p = dup(e[j]);
        for (int i = 0; i < 8; ++i) a[i] += pair_splat(k + 2 * i) * p;
      }
      for (int i = 0; i < 8; ++i) acc2[i0 + i] = a[i];
    }
    for (int64_t i = i0; i < P; ++i) {
      vf16 a = acc2[i] * corr2;
      for (int64_t j = 0; j < n; ++j) a += pair_splat(kv + (s0 + j) * kv_s + 2 * i) * dup(e[j]);
      acc2[i] = a;
    }
    if (C & 1) {
      vf8 a = accT[C - 1] * correction;
      for (int64_t j = 0; j < n; ++j) a += kv[(s0 + j) * kv_s + C - 1] * e[j];
      accT[C - 1] = a;
    }
  }
  for (int64_t i = 0; i < P; ++i) {
    accT[2 * i] = even(acc2[i]);
    accT[2 * i + 1] = odd(acc2[i]);
  }
}
#endif

// q_lat [B, M, C], q_pe [B, M, R]: the M = T x H absorbed queries of each row; kv [B, S, C], pe [B, S, R]: the
// row's cache (any row and slot strides); limit [B, T]: the last slot each of the T query positions sees (slots
// 0..limit visible), shared by its M / T heads (query m is position m / (M / T)); any strides.
// Returns softmax(scale * (q_lat kv^T + q_pe pe^T)) kv, [B, M, C], in fp32.
at::Tensor latent_decode_attention(const at::Tensor& q_lat, const at::Tensor& q_pe, const at::Tensor& kv,
                                   const at::Tensor& pe, const at::Tensor& limit, double scale) {
  TORCH_CHECK(q_lat.dim() == 3 && q_pe.dim() == 3 && kv.dim() == 3 && pe.dim() == 3 && limit.dim() == 2,
              "latent_decode_attention: expected q_lat [B, M, C], q_pe [B, M, R], kv [B, S, C], pe [B, S, R], "
              "limit [B, T]");
  for (const at::Tensor* t : {&q_lat, &q_pe, &kv, &pe}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "latent_decode_attention: float32 CPU tensors only, got ", t->scalar_type(), " on ", t->device());
  }
  const int64_t B = q_lat.size(0), M = q_lat.size(1), C = q_lat.size(2), R = q_pe.size(2), S = kv.size(1);
  TORCH_CHECK(q_pe.size(0) == B && q_pe.size(1) == M && kv.size(0) == B && kv.size(2) == C && pe.size(0) == B &&
              pe.size(1) == S && pe.size(2) == R && limit.size(0) == B && limit.size(1) > 0 &&
              M % limit.size(1) == 0,
              "latent_decode_attention: inconsistent shapes");
  TORCH_CHECK(kv.stride(2) == 1 && pe.stride(2) == 1,
              "latent_decode_attention: the cache's last dimension must be contiguous");
  const at::Tensor q = q_lat.contiguous(), qp = q_pe.contiguous(), lim = limit.to(at::kLong);
  const int64_t heads = M / limit.size(1), lim_b = lim.stride(0), lim_t = lim.stride(1);
  at::Tensor out = at::empty({B, M, C}, q.options());
  const float* q_ptr = q.data_ptr<float>();
  const float* qp_ptr = qp.data_ptr<float>();
  const float* kv_ptr = kv.data_ptr<float>();
  const float* pe_ptr = pe.data_ptr<float>();
  const int64_t* lim_ptr = lim.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t kv_b = kv.stride(0), kv_s = kv.stride(1), pe_b = pe.stride(0), pe_s = pe.stride(1);
  const int64_t groups = (M + kLanes - 1) / kLanes;

  at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<vf8> qT(C), qpT(R), accT(C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, m0 = (item % groups) * kLanes;
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, M - m0));
      vf8 lim_v = splat(-1.0f);
      int64_t last = -1, all_see = lanes < kLanes ? 0 : S;  // padding lanes see nothing
      for (int l = 0; l < lanes; ++l) {
        const int64_t lm = std::min(lim_ptr[b * lim_b + (m0 + l) / heads * lim_t], S - 1);
        lim_v[l] = static_cast<float>(lm);  // exact: slots < 2^24
        last = std::max(last, lm);
        all_see = std::min(all_see, lm + 1);
      }
      for (int64_t c = 0; c < C; ++c) {
        vf8 v = vf8{};
        for (int l = 0; l < lanes; ++l) v[l] = q_ptr[(b * M + m0 + l) * C + c];
        qT[c] = v;
      }
      for (int64_t r = 0; r < R; ++r) {
        vf8 v = vf8{};
        for (int l = 0; l < lanes; ++l) v[l] = qp_ptr[(b * M + m0 + l) * R + r];
        qpT[r] = v;
      }
      vf8 den;
#if defined(__AVX512F__)
      attend_group_paired(qT.data(), qpT.data(), lim_v, all_see, kv_ptr + b * kv_b, kv_s, pe_ptr + b * pe_b, pe_s,
                          C, R, last, static_cast<float>(scale), accT.data(), den);
#else
      attend_group(qT.data(), qpT.data(), lim_v, all_see, kv_ptr + b * kv_b, kv_s, pe_ptr + b * pe_b, pe_s, C, R,
                   last, static_cast<float>(scale), accT.data(), den);
#endif
      for (int l = 0; l < lanes; ++l) {
        const float inv = 1.0f / den[l];  // no visible slot: 0 * inf, NaN, as a softmax over all -inf gives
        float* o = out_ptr + (b * M + m0 + l) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = accT[c][l] * inv;
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------- few-row GEMM
// y [M, N] = x [M, K] . w [N, K]^T for the few rows of a decode step (speculative verify: 2 tokens a row; small
// batches). MKL's GEMM at 2-4 rows costs 1.5-3x its one-row time here, and its one-row GEMV streams a cold weight
// at a third of the bandwidth this loop gets: one weight row at a time, front to back, dotted with up to 4 input
// rows held in L1. A single forward stream is what the hardware prefetcher follows best; four rows in flight at
// once, or software prefetch, ran at less than half the bandwidth (dev/LOG.md, session 8).
#if defined(__AVX512F__)
typedef vf16 vfw;
#else
typedef vf8 vfw;
#endif
constexpr int kW = sizeof(vfw) / sizeof(float);
typedef float vfw_u __attribute__((vector_size(sizeof(vfw)), aligned(4)));  // unaligned loads

inline vfw loadu(const float* p) { return *reinterpret_cast<const vfw_u*>(p); }
typedef float vf4 __attribute__((vector_size(16)));
inline float hsum(const vf8& v) {  // a tree of shuffles: a chain of dependent scalar adds was the kernel's cost
  vf4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  a += __builtin_shufflevector(a, a, 2, 3, 0, 1);
  a += __builtin_shufflevector(a, a, 1, 0, 3, 2);
  return a[0];
}
#if defined(__AVX512F__)
inline float hsum(const vf16& v) {
  return hsum(vf8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)) +
              vf8(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
}
#endif

// Rows n0..n1 of the output for MC input rows x (row stride x_s), against weight rows of stride w_s.
template <int MC>
void few_rows_span(const float* x, int64_t x_s, const float* w, int64_t w_s, int64_t K, int64_t n0, int64_t n1,
                   float* y, int64_t y_s) {
  const int64_t Kv = K / kW * kW;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * w_s;
    vfw acc[MC] = {};
    for (int64_t k = 0; k < Kv; k += kW) {
      const vfw wv = loadu(wr + k);
      for (int m = 0; m < MC; ++m) acc[m] += wv * loadu(x + m * x_s + k);
    }
    for (int m = 0; m < MC; ++m) {
      float s = hsum(acc[m]);
      for (int64_t k = Kv; k < K; ++k) s += wr[k] * x[m * x_s + k];
      y[m * y_s + n] = s;
    }
  }
}

constexpr int64_t kFewRowsMax = 16;  // cold weights: 1.6x faster than MKL at 16 rows; warm ones (L2) even (session 8)

// x [M, K] (unit last stride), w_KN [K, N]: the transposed view of a contiguous weight [N, K], as a linear layer
// hands it to mm. Any other layout or row count goes to at::mm.
at::Tensor few_rows_mm(const at::Tensor& x, const at::Tensor& w_KN) {
  TORCH_CHECK(x.dim() == 2 && w_KN.dim() == 2 && x.size(1) == w_KN.size(0),
              "few_rows_mm: expected x [M, K] and w [K, N], got ", x.sizes(), " and ", w_KN.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w_KN.size(1);
  if (x.scalar_type() != at::kFloat || w_KN.scalar_type() != at::kFloat || !x.device().is_cpu() ||
      !w_KN.device().is_cpu() || M > kFewRowsMax || w_KN.stride(0) != 1 ||
      (N > 1 && w_KN.stride(1) < K)) {
    return at::mm(x, w_KN);
  }
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w_KN.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t x_s = xc.stride(0), w_s = w_KN.stride(1);
  // Serial in this build (no -fopenmp; dev/LOG.md, session 7), split over output columns where it is not.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {  // 8 rows at once: half the bandwidth of two passes of 4
      const float* xm = xp + m0 * x_s;
      float* ym = yp + m0 * N;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: few_rows_span<1>(xm, x_s, wp, w_s, K, n0, n1, ym, N); break;
        case 2: few_rows_span<2>(xm, x_s, wp, w_s, K, n0, n1, ym, N); break;
        case 3: few_rows_span<3>(xm, x_s, wp, w_s, K, n0, n1, ym, N); break;
        default: few_rows_span<4>(xm, x_s, wp, w_s, K, n0, n1, ym, N); break;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(nanoseek, m) {
  m.def("latent_decode_attention(Tensor q_lat, Tensor q_pe, Tensor kv, Tensor pe, Tensor limit, float scale) "
        "-> Tensor");
  m.def("few_rows_mm(Tensor x, Tensor w_KN) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("latent_decode_attention", &latent_decode_attention);
  m.impl("few_rows_mm", &few_rows_mm);
}
"""

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def load() -> bool:
    """Build (first time on a machine, ~30-60 s; cached under torch's extension dir after) and load the kernels;
    False, with a warning, where that fails (no C++ compiler), in which case callers keep the PyTorch path. Set
    NANOSEEK_KERNELS=0 to never try."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if os.environ.get("NANOSEEK_KERNELS", "1") == "0":
            _loaded = False
            return False
        try:
            from torch.utils.cpp_extension import load_inline

            log.info("building nanoseek's CPU kernels (once per machine)")
            # -march=native code: the name carries the ISA, so a shared home directory does not hand an AVX-512
            # build to an AVX2 machine.
            isa = torch.backends.cpu.get_cpu_capability().lower()
            load_inline(name=f"nanoseek_cpu_kernels_{isa}", cpp_sources=[_SOURCE], is_python_module=False,
                        extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: no kernel, PyTorch path
            log.warning("nanoseek's CPU kernels did not build (%s: %s); using the PyTorch path",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _loaded = False
            return False

        @torch.library.register_fake("nanoseek::latent_decode_attention")
        def _(q_lat, q_pe, kv, pe, limit, scale):
            return q_lat.new_empty(q_lat.shape)

        @torch.library.register_fake("nanoseek::few_rows_mm")
        def _(x, w_KN):
            return x.new_empty(x.shape[0], w_KN.shape[1])

        _loaded = True
        return True


def few_rows_pass():
    """An inductor post-grad pass (`post_grad_custom_post_pass`) that sends fp32 CPU matrix products, which in a decode
    graph have the few rows of a step, to `nanoseek::few_rows_mm`: one pass over the weight per 4 rows (up to 16),
    where MKL's GEMM costs 1.5-2.5x its one-row time at 2-4 rows (dev/LOG.md, session 8). The op hands anything else
    (more rows, another layout) to at::mm, so the pass needs no shape guards. `load()` must have returned True."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FewRowsPass(CustomGraphPass):
        def __call__(self, graph) -> None:
            mm = torch.ops.aten.mm.default
            for node in graph.nodes:
                if node.op != "call_function" or node.target is not mm:
                    continue
                vals = [getattr(a, "meta", {}).get("val") for a in node.args]
                if all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.device.type == "cpu"
                       for v in vals):
                    node.target = torch.ops.nanoseek.few_rows_mm.default

        def uuid(self):
            return get_hash_for_files((__file__,))

    return FewRowsPass()


def latent_decode_attention(q_lat_BMC, q_pe_BMR, kv_BSC, pe_BSR, limit_BT, scale: float):
    """The fused absorbed attention (module docstring, and the C++ comment for shapes); `load()` must have
    returned True."""
    return torch.ops.nanoseek.latent_decode_attention(q_lat_BMC, q_pe_BMR, kv_BSC, pe_BSR, limit_BT, scale)
