// Sliding-window attention, FlashAttention-2 structure on mma.sync tensor cores.
//
// Forward: one CTA (4 warps) per (64-query tile, batch * head); warp w owns query rows
// 16w..16w+15 of the tile. The CTA visits only the key tiles that intersect its band
// ([lo, hi) from key_phases, the same bounds as the Triton kernel) and applies the band
// mask only on edge tiles ([lo, full_lo) and [full_hi, hi)). Online softmax in base 2
// with fp32 statistics; S = Q K^T stays in registers and is reused as the A operand of
// P V. K/V tiles are double-buffered with cp.async. Rows that see no key write 0 and
// lse = -inf.
//
// Backward (deterministic, no atomics): delta = rowsum(dO * O) (swa_api.cu); dK/dV: one
// CTA per (64-key tile, batch * kv head), warp w owns keys 16w..16w+15, looping over the
// band's query tiles of every query head in the GQA group; dQ: one CTA per (64-query
// tile, batch * head) over the band's key tiles.
//
// Everything here mirrors the Triton kernels (sft_kernels/ops/sliding_window_attention/
// triton_jit.py); the window rule, their helpers one for one, is swa_window.cuh. The C++ tests (tests/cuda/:
// test_kernels.cu on a GPU, test_emulated.cpp on the CPU) check it against a float64 reference.
#pragma once

#include <cmath>

#include "mma.cuh"
#include "sft_kernels.h"
#include "swa_window.cuh"

namespace sftk {
namespace swa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = 8;  // 16 bytes per shared-memory row: ldmatrix rows hit distinct banks
constexpr int kThreads = 128;

// Element (first_row, 0) of head h of sequence b in a (batch, seqlen, heads, head_dim) or
// packed tensor (layouts in sft_kernels.h); 64-bit offsets.
template <typename P>
__device__ __forceinline__ P seq_rows(P base, int64_t sb, int64_t sh, int64_t sm, int b, int h, int first_row) {
  return base + b * sb + h * sh + static_cast<int64_t>(first_row) * sm;
}

// ROWS rows of D features from `g` (row stride g_ld) into shared memory (row stride D + kPad),
// zero past `valid` rows.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_rows(T* s, const T* g, int64_t g_ld, int valid, int tid) {
  load_tile<T, ROWS, D, kThreads>(s, D + kPad, g, g_ld, valid, D, true, tid);
}

// ----------------------------------------------------------------------------- warp tiles
// A warp's 16 x N fp32 tile is float c[N / 8][4], mma.cuh's C fragments: element (nb, e)
// at row g + 8 (e >> 1), column 8 nb + 2 t4 + (e & 1) (g = lane / 4, t4 = lane % 4).

// c0, c1 += a . B^T for B = rows n0..n0+15, columns k0..k0+15 of sB (row-major [N][K]).
template <typename T>
__device__ __forceinline__ void mma_bt(float (&c0)[4], float (&c1)[4], uint32_t a[4], const T* sB, int ld, int n0,
                                       int k0, int lane) {
  uint32_t bb[4];
  load_b_nk(bb, sB, ld, n0, k0, lane);
  Dtype<T>::mma(c0, a, bb[0], bb[1]);
  Dtype<T>::mma(c1, a, bb[2], bb[3]);
}

// c = A B^T: rows r0..r0+15 of sA times the N rows of sB, both [rows][D] in shared memory
// (Q K^T, K Q^T, V dO^T).
template <typename T, int N, int D>
__device__ __forceinline__ void tile_abt(float (&c)[N / 8][4], const T* sA, int r0, const T* sB, int lane) {
  constexpr int LD = D + kPad;
  zero(c);
#pragma unroll 1  // kk only moves addresses; unrolling it hoists ~2 registers per step
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a(a, sA, LD, r0, kk * 16, lane);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) mma_bt(c[2 * j], c[2 * j + 1], a, sB, LD, j * 16, kk * 16, lane);
  }
}

// c (16 x D) += P B: P = a warp's 16 x K fp32 tile, rounded to T (the C fragments of columns
// 16j..16j+15 are the A fragment of k-step j), B = [K][D] in shared memory (P V, P^T dO,
// dS^T Q, dS K).
template <typename T, int K, int D>
__device__ __forceinline__ void mma_pb(float (&c)[D / 8][4], const float (&pt)[K / 8][4], const T* sB, int lane) {
  constexpr int LD = D + kPad;
#pragma unroll
  for (int j = 0; j < K / 16; ++j) {
    uint32_t a[4] = {Dtype<T>::pack(pt[2 * j][0], pt[2 * j][1]), Dtype<T>::pack(pt[2 * j][2], pt[2 * j][3]),
                     Dtype<T>::pack(pt[2 * j + 1][0], pt[2 * j + 1][1]),
                     Dtype<T>::pack(pt[2 * j + 1][2], pt[2 * j + 1][3])};
#pragma unroll
    for (int dn2 = 0; dn2 < D / 16; ++dn2) {
      uint32_t bb[4];
      load_b_kn(bb, sB, LD, dn2 * 16, j * 16, lane);
      Dtype<T>::mma(c[2 * dn2], a, bb[0], bb[1]);
      Dtype<T>::mma(c[2 * dn2 + 1], a, bb[2], bb[3]);
    }
  }
}

// Scores s * scale (the exp2 domain), -inf where the band hides the pair; only a tile on the
// band's edge tests. Rows r0 + g + 8 (e >> 1) are queries and columns c0 + 8 nb + 2 t4 +
// (e & 1) keys, or the other way round for dK/dV's S^T (KEY_ROWS).
template <bool KEY_ROWS, int N>
__device__ __forceinline__ void scale_mask(float (&s)[N / 8][4], float scale, bool edge, const Tile& t, int r0, int c0,
                                           int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[nb][e] * scale;
      if (edge) {
        const int row = r0 + g + 8 * (e >> 1), col = c0 + nb * 8 + 2 * t4 + (e & 1);
        if (!(KEY_ROWS ? t.keep(col, row) : t.keep(row, col))) x = -INFINITY;
      }
      s[nb][e] = x;
    }
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {  // dst 4-byte aligned
  *reinterpret_cast<uint32_t*>(dst) = Dtype<T>::pack(lo, hi);
}

// Rows first_row + g + 8 hr (hr = 0, 1) below `len` of a warp's 16 x D tile, times
// scale[hr], to dst (row 0; row stride `ld`).
template <typename T, int D>
__device__ __forceinline__ void store_tile(T* dst, int64_t ld, const float (&c)[D / 8][4], int first_row, int len,
                                           const float scale[2], int lane) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = first_row + (lane >> 2) + 8 * hr;
    if (row >= len) continue;
    T* out = dst + static_cast<int64_t>(row) * ld + 2 * (lane & 3);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      store_pair(out + dn * 8, c[dn][2 * hr] * scale[hr], c[dn][2 * hr + 1] * scale[hr]);
  }
}

// The key tiles of a query tile's band (key_phases), K and V streamed through two
// shared-memory buffers each (sK, sV: 2 x BN rows): body(start_n, K tile, V tile, edge) for
// each, edge when the tile crosses the band's edge. The forward's and dQ's loop.
template <typename T, int BM, int BN, int D, typename Body>
__device__ __forceinline__ void for_each_key_tile(const SwaParams& p, const QTile& t, T* sK, T* sV, int tid,
                                                  Body&& body) {
  constexpr int LD = D + kPad;
  const T* k = seq_rows(static_cast<const T*>(p.k), p.stride_kb, p.stride_kh, p.stride_kn, t.b, t.hk, t.s.k_start);
  const T* v = seq_rows(static_cast<const T*>(p.v), p.stride_vb, p.stride_vh, p.stride_vn, t.b, t.hk, t.s.k_start);
  const Phases ph = t.key_phases(BM, BN);
  const int n_tiles = ph.hi > ph.lo ? cdiv(ph.hi - ph.lo, BN) : 0;
  auto issue = [&](int it, int buf) {
    const int start_n = ph.lo + it * BN;
    load_rows<T, BN, D>(sK + buf * BN * LD, k + static_cast<int64_t>(start_n) * p.stride_kn, p.stride_kn,
                        t.s.len_k - start_n, tid);
    load_rows<T, BN, D>(sV + buf * BN * LD, v + static_cast<int64_t>(start_n) * p.stride_vn, p.stride_vn,
                        t.s.len_k - start_n, tid);
  };
  pipeline(n_tiles, issue, [&](int it, int buf) {
    const int start_n = ph.lo + it * BN;
    body(start_n, sK + buf * BN * LD, sV + buf * BN * LD, start_n < ph.full_lo || start_n >= ph.full_hi);
  });
}

// ============================================================================== forward
constexpr int kFwdBM = 64;
constexpr int kFwdBN = 64;

template <int D>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(kFwdBM + 4 * kFwdBN) * (D + kPad) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_fwd_kernel(const SwaParams p) {
  constexpr int BM = kFwdBM, BN = kFwdBN, LD = D + kPad;
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  SFTK_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LD;      // two buffers
  T* sV = sK + 2 * BN * LD;  // two buffers

  const QTile t = q_tile_prologue(p, BM);
  if (t.start >= t.s.len_q) return;
  const int tid = threadIdx.x, lane = tid & 31, r0 = (tid >> 5) * 16;  // the warp's first row in the tile
  load_rows<T, BM, D>(sQ, seq_rows(static_cast<const T*>(p.q), p.stride_qb, p.stride_qh, p.stride_qm, t.b, t.h,
                                   t.s.q_start + t.start),
                      p.stride_qm, t.s.len_q - t.start, tid);

  float acc[D / 8][4];
  zero(acc);
  float m_i[2] = {-INFINITY, -INFINITY};
  float l_i[2] = {0.f, 0.f};  // this thread's partial row sums (reduced over the quad at the end)
  const float qk_scale = p.sm_scale * kLog2e;
  for_each_key_tile<T, BM, BN, D>(p, t, sK, sV, tid, [&](int start_n, const T* cK, const T* cV, bool edge) {
    float sc[BN / 8][4];
    tile_abt<T, BN, D>(sc, sQ, r0, cK, lane);
    scale_mask<false, BN>(sc, qk_scale, edge, t, t.start + r0, start_n, lane);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(sc[nb][2 * hr], sc[nb][2 * hr + 1]));
      mx = warp_max4(mx);
      const float m_new = fmaxf(m_i[hr], mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // rows that saw no key yet
      const float alpha = exp2f(m_i[hr] - m_safe);
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
        sc[nb][2 * hr] = exp2f(sc[nb][2 * hr] - m_safe);
        sc[nb][2 * hr + 1] = exp2f(sc[nb][2 * hr + 1] - m_safe);
        sum += sc[nb][2 * hr] + sc[nb][2 * hr + 1];
      }
      l_i[hr] = l_i[hr] * alpha + sum;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn][2 * hr] *= alpha;
        acc[dn][2 * hr + 1] *= alpha;
      }
      m_i[hr] = m_new;
    }
    mma_pb<T, BN, D>(acc, sc, cV, lane);  // O += P V
  });

  float l[2], inv[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l[hr] = warp_sum4(l_i[hr]);
    inv[hr] = l[hr] == 0.f ? 0.f : 1.f / l[hr];  // no visible key: output 0, lse -inf
  }
  store_tile<T, D>(seq_rows(static_cast<T*>(p.out), p.stride_ob, p.stride_oh, p.stride_om, t.b, t.h, t.s.q_start),
                   p.stride_om, acc, t.start + r0, t.s.len_q, inv, lane);
  float* lse = p.lse + t.b * p.stride_lb + t.h * p.stride_lh + t.s.q_start;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = t.start + r0 + (lane >> 2) + 8 * hr;
    if (row < t.s.len_q && (lane & 3) == 0) lse[row] = l[hr] == 0.f ? -INFINITY : (m_i[hr] + log2f(l[hr])) * kLn2;
  }
}

// ============================================================================== dK / dV
constexpr int kDkdvBN = 64;
template <int D>
struct DkdvCfg {
  // Queries per step: 64 at D=64; 32 at D=128 keeps dK, dV (2 x 64 fp32 per thread) and
  // the two 16x32 score tiles within 255 registers without spilling.
  static constexpr int BM = D <= 64 ? 64 : 32;
};

template <int D>
constexpr size_t dkdv_smem_bytes() {
  return static_cast<size_t>(2 * kDkdvBN + 4 * DkdvCfg<D>::BM) * (D + kPad) * 2 + 4 * DkdvCfg<D>::BM * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_dkdv_kernel(const SwaParams p) {
  constexpr int BN = kDkdvBN, BM = DkdvCfg<D>::BM, LD = D + kPad;
  SFTK_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;       // two buffers
  T* sdO = sQ + 2 * BM * LD;  // two buffers
  float* sL = reinterpret_cast<float*>(sdO + 2 * BM * LD);  // two buffers: lse * log2(e), +inf for empty rows
  float* sDl = sL + 2 * BM;                                 // two buffers: delta

  const Tile t = tile_prologue(p, BN);
  const int start_n = t.start, hk = blockIdx.y;
  if (start_n >= t.s.len_k) return;
  const int tid = threadIdx.x, lane = tid & 31, kr0 = (tid >> 5) * 16;  // the warp's first key in the tile
  const int t4 = lane & 3;
  const int key0 = t.s.k_start + start_n;
  load_rows<T, BN, D>(sK, seq_rows(static_cast<const T*>(p.k), p.stride_kb, p.stride_kh, p.stride_kn, t.b, hk, key0),
                      p.stride_kn, t.s.len_k - start_n, tid);
  load_rows<T, BN, D>(sV, seq_rows(static_cast<const T*>(p.v), p.stride_vb, p.stride_vh, p.stride_vn, t.b, hk, key0),
                      p.stride_vn, t.s.len_k - start_n, tid);

  const Phases ph = t.query_phases(BM, BN);
  const int n_mt = ph.hi > ph.lo ? cdiv(ph.hi - ph.lo, BM) : 0;
  const int total = n_mt * p.group;  // (query head in the group, query tile) pairs
  static_assert(BM <= kThreads, "one thread per query row of the LSE / delta prefetch");
  // Q and dO tiles go to shared memory by cp.async; the tile's LSE and delta (one float
  // per row) are loaded into registers when the tile is issued and stored to shared
  // memory at the end of the iteration before the one that reads them, so their latency
  // hides behind a whole tile of MMAs instead of stalling the issue.
  float pre_l = -INFINITY, pre_d = 0.f;
  auto stash = [&](int buf) {  // the prefetched LSE / delta of the tile in `buf`
    if (tid < BM) {
      sL[buf * BM + tid] = pre_l == -INFINITY ? INFINITY : pre_l * kLog2e;  // p = 0 on empty / padded rows
      sDl[buf * BM + tid] = pre_d;
    }
  };
  auto issue = [&](int it, int buf) {
    const int h = hk * p.group + it / n_mt;
    const int start_m = ph.lo + (it % n_mt) * BM;
    const int row0 = t.s.q_start + start_m;
    load_rows<T, BM, D>(sQ + buf * BM * LD,
                        seq_rows(static_cast<const T*>(p.q), p.stride_qb, p.stride_qh, p.stride_qm, t.b, h, row0),
                        p.stride_qm, t.s.len_q - start_m, tid);
    load_rows<T, BM, D>(sdO + buf * BM * LD,
                        seq_rows(static_cast<const T*>(p.dout), p.stride_dob, p.stride_doh, p.stride_dom, t.b, h, row0),
                        p.stride_dom, t.s.len_q - start_m, tid);
    if (tid < BM && start_m + tid < t.s.len_q) {
      pre_l = p.lse[t.b * p.stride_lb + h * p.stride_lh + row0 + tid];
      pre_d = p.delta[t.b * p.stride_lb + h * p.stride_lh + row0 + tid];
    } else {
      pre_l = -INFINITY;  // padded rows: p = 0 below
      pre_d = 0.f;
    }
    if (it == 0) stash(0);  // later tiles' after the previous tile's math (below)
  };

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  const float qk_scale = p.sm_scale * kLog2e;
  pipeline(total, issue, [&](int it, int buf) {
    const int start_m = ph.lo + (it % n_mt) * BM;
    const T* cQ = sQ + buf * BM * LD;
    const T* cdO = sdO + buf * BM * LD;
    const float* cL = sL + buf * BM;
    const float* cDl = sDl + buf * BM;

    float st[BM / 8][4];  // S^T = K Q^T (keys x queries), then P^T = exp2(S^T * scale - lse)
    tile_abt<T, BM, D>(st, sK, kr0, cQ, lane);
    scale_mask<true, BM>(st, qk_scale, start_m < ph.full_lo || start_m >= ph.full_hi, t, start_n + kr0, start_m,
                         lane);
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nb][e] = exp2f(st[nb][e] - cL[nb * 8 + 2 * t4 + (e & 1)]);
    mma_pb<T, BM, D>(dv, st, cdO, lane);  // dV += P^T dO
    float ds[BM / 8][4];  // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta)
    tile_abt<T, BM, D>(ds, sV, kr0, cdO, lane);
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = st[nb][e] * (ds[nb][e] - cDl[nb * 8 + 2 * t4 + (e & 1)]);
    mma_pb<T, BM, D>(dk, ds, cQ, lane);  // dK += dS^T Q
    // the other buffer was last read in iteration it - 1, before this iteration's barrier
    if (it + 1 < total) stash(buf ^ 1);
  });

  const float dk_scale[2] = {p.sm_scale, p.sm_scale}, one[2] = {1.f, 1.f};
  store_tile<T, D>(seq_rows(static_cast<T*>(p.dk), p.stride_dkb, p.stride_dkh, p.stride_dkn, t.b, hk, t.s.k_start),
                   p.stride_dkn, dk, start_n + kr0, t.s.len_k, dk_scale, lane);
  store_tile<T, D>(seq_rows(static_cast<T*>(p.dv), p.stride_dvb, p.stride_dvh, p.stride_dvn, t.b, hk, t.s.k_start),
                   p.stride_dvn, dv, start_n + kr0, t.s.len_k, one, lane);
}

// ============================================================================== dQ
constexpr int kDqBM = 64;
constexpr int kDqBN = 64;

template <int D>
constexpr size_t dq_smem_bytes() {
  return static_cast<size_t>(2 * kDqBM + 4 * kDqBN) * (D + kPad) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) swa_bwd_dq_kernel(const SwaParams p) {
  constexpr int BM = kDqBM, BN = kDqBN, LD = D + kPad;
  SFTK_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * LD;
  T* sK = sdO + BM * LD;     // two buffers
  T* sV = sK + 2 * BN * LD;  // two buffers

  const QTile t = q_tile_prologue(p, BM);
  if (t.start >= t.s.len_q) return;
  const int tid = threadIdx.x, lane = tid & 31, r0 = (tid >> 5) * 16;  // the warp's first row in the tile
  const int row0 = t.s.q_start + t.start;
  load_rows<T, BM, D>(sQ, seq_rows(static_cast<const T*>(p.q), p.stride_qb, p.stride_qh, p.stride_qm, t.b, t.h, row0),
                      p.stride_qm, t.s.len_q - t.start, tid);
  load_rows<T, BM, D>(sdO,
                      seq_rows(static_cast<const T*>(p.dout), p.stride_dob, p.stride_doh, p.stride_dom, t.b, t.h, row0),
                      p.stride_dom, t.s.len_q - t.start, tid);

  float lse2[2], dlt[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = t.start + r0 + (lane >> 2) + 8 * hr;
    const bool ok = row < t.s.len_q;
    const int64_t l_row = t.b * p.stride_lb + t.h * p.stride_lh + t.s.q_start + row;
    const float l = ok ? p.lse[l_row] : -INFINITY;
    lse2[hr] = l == -INFINITY ? INFINITY : l * kLog2e;
    dlt[hr] = ok ? p.delta[l_row] : 0.f;
  }
  float dq[D / 8][4];
  zero(dq);
  const float qk_scale = p.sm_scale * kLog2e;
  for_each_key_tile<T, BM, BN, D>(p, t, sK, sV, tid, [&](int start_n, const T* cK, const T* cV, bool edge) {
    float sc[BN / 8][4], dp[BN / 8][4];  // S = Q K^T and dP = dO V^T in one pass over D
    zero(sc);
    zero(dp);
#pragma unroll 1  // kk only moves addresses; unrolling it hoists ~2 registers per step
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4], ad[4];
      load_a(a, sQ, LD, r0, kk * 16, lane);
      load_a(ad, sdO, LD, r0, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        mma_bt(sc[2 * j], sc[2 * j + 1], a, cK, LD, j * 16, kk * 16, lane);
        mma_bt(dp[2 * j], dp[2 * j + 1], ad, cV, LD, j * 16, kk * 16, lane);
      }
    }
    scale_mask<false, BN>(sc, qk_scale, edge, t, t.start + r0, start_n, lane);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nb][e] = exp2f(sc[nb][e] - lse2[e >> 1]) * (dp[nb][e] - dlt[e >> 1]);  // dS
    mma_pb<T, BN, D>(dq, dp, cK, lane);  // dQ += dS K
  });

  const float dq_scale[2] = {p.sm_scale, p.sm_scale};
  store_tile<T, D>(seq_rows(static_cast<T*>(p.dq), p.stride_dqb, p.stride_dqh, p.stride_dqm, t.b, t.h, t.s.q_start),
                   p.stride_dqm, dq, t.start + r0, t.s.len_q, dq_scale, lane);
}

// ============================================================================== launchers
template <typename Kernel>
inline cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, const SwaParams& p, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaError_t err = set_max_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  SFTK_LAUNCH(kernel, grid, kThreads, smem, stream, p);
  return cudaGetLastError();
}

// One launch per 65,535 sequences (grid.z), heads on grid.y.
template <typename Kernel>
inline cudaError_t launch_batches(Kernel kernel, int tiles, int heads, size_t smem, SwaParams p, cudaStream_t stream) {
  if (heads > kMaxGridYZ) return cudaErrorInvalidValue;
  for (int b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {
    p.batch_start = b0;
    const int nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
    cudaError_t err = launch(kernel, dim3(tiles, heads, nb), smem, p, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The entry points of one head_dim, fp16 or bf16. Each D is instantiated in a translation
// unit of its own per pass (swa_fwd_d64.cu, ...), so that the build compiles them in parallel.
template <int D>
cudaError_t fwd(const SwaParams& p, cudaStream_t stream) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  return launch_batches(bf16 ? swa_fwd_kernel<__nv_bfloat16, D> : swa_fwd_kernel<__half, D>, cdiv(p.seqlen_q, kFwdBM),
                        p.num_heads, fwd_smem_bytes<D>(), p, stream);
}

template <int D>
cudaError_t bwd(const SwaParams& p, cudaStream_t stream) {  // after the delta pre-pass
  const bool bf16 = p.dtype == DType::kBFloat16;
  cudaError_t err = launch_batches(bf16 ? swa_bwd_dkdv_kernel<__nv_bfloat16, D> : swa_bwd_dkdv_kernel<__half, D>,
                                   cdiv(p.seqlen_k, kDkdvBN), p.num_kv_heads, dkdv_smem_bytes<D>(), p, stream);
  if (err != cudaSuccess) return err;
  return launch_batches(bf16 ? swa_bwd_dq_kernel<__nv_bfloat16, D> : swa_bwd_dq_kernel<__half, D>,
                        cdiv(p.seqlen_q, kDqBM), p.num_heads, dq_smem_bytes<D>(), p, stream);
}

extern template cudaError_t fwd<64>(const SwaParams&, cudaStream_t);
extern template cudaError_t fwd<128>(const SwaParams&, cudaStream_t);
extern template cudaError_t bwd<64>(const SwaParams&, cudaStream_t);
extern template cudaError_t bwd<128>(const SwaParams&, cudaStream_t);

}  // namespace swa
}  // namespace sftk
