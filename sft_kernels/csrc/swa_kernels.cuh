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
// Everything here mirrors sft_kernels/ops/sliding_window_attention/triton_kernels.py;
// the C++ test (tests/cuda/test_kernels.cu) checks it against a CPU reference.
#pragma once

#include <cmath>

#include "mma.cuh"
#include "sft_kernels.h"

namespace sftk {
namespace swa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = 8;  // 16 bytes per shared-memory row: ldmatrix rows hit distinct banks
constexpr int kThreads = 128;

__host__ __device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// floor(sqrt(n)), exact for 0 <= n < 2^31 (fp32 estimate, corrected in int64).
__device__ __forceinline__ int isqrt_exact(int n) {
  long long r = static_cast<long long>(sqrtf(static_cast<float>(n)));
  while (r > 0 && r * r > n) --r;
  while ((r + 1) * (r + 1) <= n) ++r;
  return static_cast<int>(r);
}

struct Seq {
  int q_start, k_start, len_q, len_k;
};

__device__ __forceinline__ Seq seq_info(const SwaParams& p, int b) {
  if (p.cu_seqlens_q != nullptr) {
    const int qs = p.cu_seqlens_q[b], qe = p.cu_seqlens_q[b + 1];
    const int ks = p.cu_seqlens_k[b], ke = p.cu_seqlens_k[b + 1];
    return {qs, ks, qe - qs, ke - ks};
  }
  return {0, 0, p.seqlen_q, p.seqlen_k};
}

// (left, right) of one sequence, -1 = unbounded (window.py / _resolve_window).
__device__ __forceinline__ void resolve_window(const SwaParams& p, int len_k, int& left, int& right) {
  if (p.window_mode == kModeExplicit) {
    left = p.left;
    right = p.right;
    return;
  }
  int w = p.window_mode == kModeKeys ? min(p.keys, len_k) : isqrt_exact(len_k);  // else kModeSqrt
  w = max(w, 1);
  if (p.causal) {
    left = w - 1;
    right = 0;
  } else {
    left = w / 2;
    right = (w - 1) / 2;
  }
}

struct Phases {
  int lo, full_lo, full_hi, hi;
};

// Key-tile bounds for query rows [start_m, start_m + BM): tiles in [lo, full_lo) and
// [full_hi, hi) need the mask, [full_lo, full_hi) are inside the band for every row.
// A line-by-line port of _key_phases (every quotient has a non-negative dividend).
__device__ __forceinline__ Phases key_phases(int start_m, int off, int left, int right, int len_k, int BM, int BN) {
  int lo = 0;
  if (left >= 0) lo = max(start_m + off - left, 0);
  int hi = len_k;
  if (right >= 0) hi = min(max(start_m + BM + off + right, 0), len_k);
  lo = (lo / BN) * BN;
  int full_lo = lo;
  if (left >= 0) full_lo = cdiv(max(start_m + BM - 1 + off - left, lo), BN) * BN;
  full_lo = min(full_lo, max(hi, lo));
  int upper = len_k;
  if (right >= 0) upper = min(max(start_m + off + right + 1, 0), len_k);
  const int full_hi = max((upper / BN) * BN, full_lo);
  return {lo, full_lo, full_hi, hi};
}

// Query-tile bounds for key columns [start_n, start_n + BN) (_query_phases).
__device__ __forceinline__ Phases query_phases(int start_n, int off, int left, int right, int len_q, int BM, int BN) {
  int lo = 0;
  if (right >= 0) lo = max(start_n - off - right, 0);
  int hi = len_q;
  if (left >= 0) hi = min(max(start_n + BN - off + left, 0), len_q);
  lo = (lo / BM) * BM;
  int full_lo = lo;
  if (right >= 0) full_lo = cdiv(max(start_n + BN - 1 - off - right, lo), BM) * BM;
  full_lo = min(full_lo, max(hi, lo));
  int upper = hi;
  if (left >= 0) upper = min(max(start_n - off + left + 1, 0), hi);
  const int full_hi = max((upper / BM) * BM, full_lo);
  return {lo, full_lo, full_hi, hi};
}

__device__ __forceinline__ bool band_keep(int row, int col, int off, int left, int right, int len_q, int len_k) {
  const int pos = row + off;
  return col < len_k && row < len_q && col >= 0 && (left < 0 || col >= pos - left) && (right < 0 || col <= pos + right);
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {  // dst 4-byte aligned
  *reinterpret_cast<uint32_t*>(dst) = Dtype<T>::pack(lo, hi);
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

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = p.batch_start + static_cast<int>(blockIdx.z), h = blockIdx.y, hk = h / p.group;
  const Seq s = seq_info(p, b);
  const int start_m = blockIdx.x * BM;
  if (start_m >= s.len_q) return;
  int left, right;
  resolve_window(p, s.len_k, left, right);
  const int off = s.len_k - s.len_q;

  const T* q = static_cast<const T*>(p.q) + b * p.stride_qb + h * p.stride_qh +
               static_cast<int64_t>(s.q_start + start_m) * p.stride_qm;
  const T* k = static_cast<const T*>(p.k) + b * p.stride_kb + hk * p.stride_kh +
               static_cast<int64_t>(s.k_start) * p.stride_kn;
  const T* v = static_cast<const T*>(p.v) + b * p.stride_vb + hk * p.stride_vh +
               static_cast<int64_t>(s.k_start) * p.stride_vn;

  load_tile<T, BM, D, kThreads>(sQ, LD, q, p.stride_qm, s.len_q - start_m, D, true, tid);
  const Phases ph = key_phases(start_m, off, left, right, s.len_k, BM, BN);
  const int n_tiles = ph.hi > ph.lo ? cdiv(ph.hi - ph.lo, BN) : 0;
  auto issue = [&](int it, int buf) {
    const int start_n = ph.lo + it * BN;
    load_tile<T, BN, D, kThreads>(sK + buf * BN * LD, LD, k + static_cast<int64_t>(start_n) * p.stride_kn,
                                  p.stride_kn, s.len_k - start_n, D, true, tid);
    load_tile<T, BN, D, kThreads>(sV + buf * BN * LD, LD, v + static_cast<int64_t>(start_n) * p.stride_vn,
                                  p.stride_vn, s.len_k - start_n, D, true, tid);
  };
  if (n_tiles > 0) issue(0, 0);
  cp_async_commit();

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY};
  float l_i[2] = {0.f, 0.f};  // this thread's partial row sums (reduced over the quad at the end)
  const float qk_scale = p.sm_scale * kLog2e;
  const int r0 = warp * 16;

  for (int it = 0; it < n_tiles; ++it) {
    const int start_n = ph.lo + it * BN;
    const int buf = it & 1;
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed; every warp is done with the other buffer
    if (it + 1 < n_tiles) issue(it + 1, buf ^ 1);
    cp_async_commit();
    const T* cK = sK + buf * BN * LD;
    const T* cV = sV + buf * BN * LD;

    float sc[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll 1  // kk only moves addresses; unrolling it hoists ~2 registers per step
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      load_a(a, sQ, LD, r0, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        uint32_t bb[4];
        load_b_nk(bb, cK, LD, j * 16, kk * 16, lane);
        Dtype<T>::mma(sc[2 * j], a, bb[0], bb[1]);
        Dtype<T>::mma(sc[2 * j + 1], a, bb[2], bb[3]);
      }
    }
    const bool edge = start_n < ph.full_lo || start_n >= ph.full_hi;
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[nb][e] * qk_scale;
        if (edge) {
          const int row = start_m + r0 + g + 8 * (e >> 1);
          const int col = start_n + nb * 8 + 2 * t4 + (e & 1);
          if (!band_keep(row, col, off, left, right, s.len_q, s.len_k)) x = -INFINITY;
        }
        sc[nb][e] = x;
      }
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
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      uint32_t a[4] = {Dtype<T>::pack(sc[2 * j][0], sc[2 * j][1]), Dtype<T>::pack(sc[2 * j][2], sc[2 * j][3]),
                       Dtype<T>::pack(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                       Dtype<T>::pack(sc[2 * j + 1][2], sc[2 * j + 1][3])};
#pragma unroll
      for (int dn2 = 0; dn2 < D / 16; ++dn2) {
        uint32_t bb[4];
        load_b_kn(bb, cV, LD, dn2 * 16, j * 16, lane);
        Dtype<T>::mma(acc[2 * dn2], a, bb[0], bb[1]);
        Dtype<T>::mma(acc[2 * dn2 + 1], a, bb[2], bb[3]);
      }
    }
  }
  cp_async_wait_all();

  T* o = static_cast<T*>(p.out) + b * p.stride_ob + h * p.stride_oh + static_cast<int64_t>(s.q_start) * p.stride_om;
  float* lse = p.lse + b * p.stride_lb + h * p.stride_lh + s.q_start;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float l = warp_sum4(l_i[hr]);
    const bool empty = l == 0.f;  // no visible key: output 0, lse -inf
    const float inv = empty ? 0.f : 1.f / l;
    const int row = start_m + r0 + g + 8 * hr;
    if (row < s.len_q) {
      T* orow = o + static_cast<int64_t>(row) * p.stride_om + 2 * t4;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) store_pair(orow + dn * 8, acc[dn][2 * hr] * inv, acc[dn][2 * hr + 1] * inv);
      if (t4 == 0) lse[row] = empty ? -INFINITY : (m_i[hr] + log2f(l)) * kLn2;
    }
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

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = p.batch_start + static_cast<int>(blockIdx.z), hk = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int start_n = blockIdx.x * BN;
  if (start_n >= s.len_k) return;
  int left, right;
  resolve_window(p, s.len_k, left, right);
  const int off = s.len_k - s.len_q;

  const T* k = static_cast<const T*>(p.k) + b * p.stride_kb + hk * p.stride_kh +
               static_cast<int64_t>(s.k_start + start_n) * p.stride_kn;
  const T* v = static_cast<const T*>(p.v) + b * p.stride_vb + hk * p.stride_vh +
               static_cast<int64_t>(s.k_start + start_n) * p.stride_vn;
  load_tile<T, BN, D, kThreads>(sK, LD, k, p.stride_kn, s.len_k - start_n, D, true, tid);
  load_tile<T, BN, D, kThreads>(sV, LD, v, p.stride_vn, s.len_k - start_n, D, true, tid);

  const Phases ph = query_phases(start_n, off, left, right, s.len_q, BM, BN);
  const int n_mt = ph.hi > ph.lo ? cdiv(ph.hi - ph.lo, BM) : 0;
  const int total = n_mt * p.group;  // (query head in the group, query tile) pairs
  static_assert(BM <= kThreads, "one thread per query row of the LSE / delta prefetch");
  // Q and dO tiles go to shared memory by cp.async; the tile's LSE and delta (one float
  // per row) are loaded into registers when the tile is issued and stored to shared
  // memory at the end of the iteration before the one that reads them, so their latency
  // hides behind a whole tile of MMAs instead of stalling the issue.
  float pre_l = -INFINITY, pre_d = 0.f;
  auto issue = [&](int it, int buf) {
    const int h = hk * p.group + it / n_mt;
    const int start_m = ph.lo + (it % n_mt) * BM;
    const int64_t row0 = s.q_start + start_m;
    load_tile<T, BM, D, kThreads>(sQ + buf * BM * LD, LD,
                                  static_cast<const T*>(p.q) + b * p.stride_qb + h * p.stride_qh + row0 * p.stride_qm,
                                  p.stride_qm, s.len_q - start_m, D, true, tid);
    load_tile<T, BM, D, kThreads>(
        sdO + buf * BM * LD, LD,
        static_cast<const T*>(p.dout) + b * p.stride_dob + h * p.stride_doh + row0 * p.stride_dom, p.stride_dom,
        s.len_q - start_m, D, true, tid);
    if (tid < BM && start_m + tid < s.len_q) {
      pre_l = p.lse[b * p.stride_lb + h * p.stride_lh + row0 + tid];
      pre_d = p.delta[b * p.stride_lb + h * p.stride_lh + row0 + tid];
    } else {
      pre_l = -INFINITY;  // padded rows: p = 0 below
      pre_d = 0.f;
    }
  };
  auto stash = [&](int buf) {  // the prefetched LSE / delta of the tile in `buf`
    if (tid < BM) {
      sL[buf * BM + tid] = pre_l == -INFINITY ? INFINITY : pre_l * kLog2e;  // p = 0 on empty / padded rows
      sDl[buf * BM + tid] = pre_d;
    }
  };
  if (total > 0) {
    issue(0, 0);
    stash(0);
  }
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const float qk_scale = p.sm_scale * kLog2e;
  const int kr0 = warp * 16;

  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    const int start_m = ph.lo + (it % n_mt) * BM;
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < total) issue(it + 1, buf ^ 1);
    cp_async_commit();
    const T* cQ = sQ + buf * BM * LD;
    const T* cdO = sdO + buf * BM * LD;
    const float* cL = sL + buf * BM;
    const float* cDl = sDl + buf * BM;

    // S^T = K Q^T (keys x queries), then P^T = exp2(S^T * scale - lse)
    float st[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
#pragma unroll 1  // kk only moves addresses; unrolling it hoists ~2 registers per step
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      load_a(a, sK, LD, kr0, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < BM / 16; ++j) {
        uint32_t bb[4];
        load_b_nk(bb, cQ, LD, j * 16, kk * 16, lane);
        Dtype<T>::mma(st[2 * j], a, bb[0], bb[1]);
        Dtype<T>::mma(st[2 * j + 1], a, bb[2], bb[3]);
      }
    }
    const bool edge = start_m < ph.full_lo || start_m >= ph.full_hi;
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nb * 8 + 2 * t4 + (e & 1);  // query within the tile
        float x = st[nb][e] * qk_scale;
        if (edge) {
          const int key = start_n + kr0 + g + 8 * (e >> 1);
          if (!band_keep(start_m + qi, key, off, left, right, s.len_q, s.len_k)) x = -INFINITY;
        }
        st[nb][e] = exp2f(x - cL[qi]);
      }
    // dV += P^T dO
#pragma unroll
    for (int j = 0; j < BM / 16; ++j) {
      uint32_t a[4] = {Dtype<T>::pack(st[2 * j][0], st[2 * j][1]), Dtype<T>::pack(st[2 * j][2], st[2 * j][3]),
                       Dtype<T>::pack(st[2 * j + 1][0], st[2 * j + 1][1]),
                       Dtype<T>::pack(st[2 * j + 1][2], st[2 * j + 1][3])};
#pragma unroll
      for (int dn2 = 0; dn2 < D / 16; ++dn2) {
        uint32_t bb[4];
        load_b_kn(bb, cdO, LD, dn2 * 16, j * 16, lane);
        Dtype<T>::mma(dv[2 * dn2], a, bb[0], bb[1]);
        Dtype<T>::mma(dv[2 * dn2 + 1], a, bb[2], bb[3]);
      }
    }
    // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta)
    float ds[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) ds[i][0] = ds[i][1] = ds[i][2] = ds[i][3] = 0.f;
#pragma unroll 1  // kk only moves addresses; unrolling it hoists ~2 registers per step
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      load_a(a, sV, LD, kr0, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < BM / 16; ++j) {
        uint32_t bb[4];
        load_b_nk(bb, cdO, LD, j * 16, kk * 16, lane);
        Dtype<T>::mma(ds[2 * j], a, bb[0], bb[1]);
        Dtype<T>::mma(ds[2 * j + 1], a, bb[2], bb[3]);
      }
    }
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = st[nb][e] * (ds[nb][e] - cDl[nb * 8 + 2 * t4 + (e & 1)]);
    // dK += dS^T Q
#pragma unroll
    for (int j = 0; j < BM / 16; ++j) {
      uint32_t a[4] = {Dtype<T>::pack(ds[2 * j][0], ds[2 * j][1]), Dtype<T>::pack(ds[2 * j][2], ds[2 * j][3]),
                       Dtype<T>::pack(ds[2 * j + 1][0], ds[2 * j + 1][1]),
                       Dtype<T>::pack(ds[2 * j + 1][2], ds[2 * j + 1][3])};
#pragma unroll
      for (int dn2 = 0; dn2 < D / 16; ++dn2) {
        uint32_t bb[4];
        load_b_kn(bb, cQ, LD, dn2 * 16, j * 16, lane);
        Dtype<T>::mma(dk[2 * dn2], a, bb[0], bb[1]);
        Dtype<T>::mma(dk[2 * dn2 + 1], a, bb[2], bb[3]);
      }
    }
    // the other buffer was last read in iteration it - 1, before this iteration's barrier
    if (it + 1 < total) stash(buf ^ 1);
  }
  cp_async_wait_all();

  T* dkp = static_cast<T*>(p.dk) + b * p.stride_dkb + hk * p.stride_dkh + static_cast<int64_t>(s.k_start) * p.stride_dkn;
  T* dvp = static_cast<T*>(p.dv) + b * p.stride_dvb + hk * p.stride_dvh + static_cast<int64_t>(s.k_start) * p.stride_dvn;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int key = start_n + kr0 + g + 8 * hr;
    if (key < s.len_k) {
      T* krow = dkp + static_cast<int64_t>(key) * p.stride_dkn + 2 * t4;
      T* vrow = dvp + static_cast<int64_t>(key) * p.stride_dvn + 2 * t4;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        store_pair(krow + dn * 8, dk[dn][2 * hr] * p.sm_scale, dk[dn][2 * hr + 1] * p.sm_scale);
        store_pair(vrow + dn * 8, dv[dn][2 * hr], dv[dn][2 * hr + 1]);
      }
    }
  }
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

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = p.batch_start + static_cast<int>(blockIdx.z), h = blockIdx.y, hk = h / p.group;
  const Seq s = seq_info(p, b);
  const int start_m = blockIdx.x * BM;
  if (start_m >= s.len_q) return;
  int left, right;
  resolve_window(p, s.len_k, left, right);
  const int off = s.len_k - s.len_q;
  const int64_t row0 = s.q_start + start_m;

  load_tile<T, BM, D, kThreads>(sQ, LD, static_cast<const T*>(p.q) + b * p.stride_qb + h * p.stride_qh + row0 * p.stride_qm,
                                p.stride_qm, s.len_q - start_m, D, true, tid);
  load_tile<T, BM, D, kThreads>(sdO, LD,
                                static_cast<const T*>(p.dout) + b * p.stride_dob + h * p.stride_doh + row0 * p.stride_dom,
                                p.stride_dom, s.len_q - start_m, D, true, tid);
  const T* k = static_cast<const T*>(p.k) + b * p.stride_kb + hk * p.stride_kh +
               static_cast<int64_t>(s.k_start) * p.stride_kn;
  const T* v = static_cast<const T*>(p.v) + b * p.stride_vb + hk * p.stride_vh +
               static_cast<int64_t>(s.k_start) * p.stride_vn;
  const Phases ph = key_phases(start_m, off, left, right, s.len_k, BM, BN);
  const int n_tiles = ph.hi > ph.lo ? cdiv(ph.hi - ph.lo, BN) : 0;
  auto issue = [&](int it, int buf) {
    const int start_n = ph.lo + it * BN;
    load_tile<T, BN, D, kThreads>(sK + buf * BN * LD, LD, k + static_cast<int64_t>(start_n) * p.stride_kn,
                                  p.stride_kn, s.len_k - start_n, D, true, tid);
    load_tile<T, BN, D, kThreads>(sV + buf * BN * LD, LD, v + static_cast<int64_t>(start_n) * p.stride_vn,
                                  p.stride_vn, s.len_k - start_n, D, true, tid);
  };
  if (n_tiles > 0) issue(0, 0);
  cp_async_commit();

  const int r0 = warp * 16;
  float lse2[2], dlt[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = start_m + r0 + g + 8 * hr;
    const bool ok = row < s.len_q;
    const float l = ok ? p.lse[b * p.stride_lb + h * p.stride_lh + s.q_start + row] : -INFINITY;
    lse2[hr] = l == -INFINITY ? INFINITY : l * kLog2e;
    dlt[hr] = ok ? p.delta[b * p.stride_lb + h * p.stride_lh + s.q_start + row] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  const float qk_scale = p.sm_scale * kLog2e;

  for (int it = 0; it < n_tiles; ++it) {
    const int start_n = ph.lo + it * BN;
    const int buf = it & 1;
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < n_tiles) issue(it + 1, buf ^ 1);
    cp_async_commit();
    const T* cK = sK + buf * BN * LD;
    const T* cV = sV + buf * BN * LD;

    float sc[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[i][e] = dp[i][e] = 0.f;
#pragma unroll 1  // kk only moves addresses; unrolling it hoists ~2 registers per step
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4], ad[4];
      load_a(a, sQ, LD, r0, kk * 16, lane);
      load_a(ad, sdO, LD, r0, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        uint32_t bb[4];
        load_b_nk(bb, cK, LD, j * 16, kk * 16, lane);
        Dtype<T>::mma(sc[2 * j], a, bb[0], bb[1]);
        Dtype<T>::mma(sc[2 * j + 1], a, bb[2], bb[3]);
        load_b_nk(bb, cV, LD, j * 16, kk * 16, lane);
        Dtype<T>::mma(dp[2 * j], ad, bb[0], bb[1]);
        Dtype<T>::mma(dp[2 * j + 1], ad, bb[2], bb[3]);
      }
    }
    const bool edge = start_n < ph.full_lo || start_n >= ph.full_hi;
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[nb][e] * qk_scale;
        if (edge) {
          const int row = start_m + r0 + g + 8 * (e >> 1);
          const int col = start_n + nb * 8 + 2 * t4 + (e & 1);
          if (!band_keep(row, col, off, left, right, s.len_q, s.len_k)) x = -INFINITY;
        }
        const float pr = exp2f(x - lse2[e >> 1]);
        dp[nb][e] = pr * (dp[nb][e] - dlt[e >> 1]);  // dS
      }
    // dQ += dS K
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      uint32_t a[4] = {Dtype<T>::pack(dp[2 * j][0], dp[2 * j][1]), Dtype<T>::pack(dp[2 * j][2], dp[2 * j][3]),
                       Dtype<T>::pack(dp[2 * j + 1][0], dp[2 * j + 1][1]),
                       Dtype<T>::pack(dp[2 * j + 1][2], dp[2 * j + 1][3])};
#pragma unroll
      for (int dn2 = 0; dn2 < D / 16; ++dn2) {
        uint32_t bb[4];
        load_b_kn(bb, cK, LD, dn2 * 16, j * 16, lane);
        Dtype<T>::mma(dq[2 * dn2], a, bb[0], bb[1]);
        Dtype<T>::mma(dq[2 * dn2 + 1], a, bb[2], bb[3]);
      }
    }
  }
  cp_async_wait_all();

  T* dqp = static_cast<T*>(p.dq) + b * p.stride_dqb + h * p.stride_dqh + static_cast<int64_t>(s.q_start) * p.stride_dqm;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = start_m + r0 + g + 8 * hr;
    if (row < s.len_q) {
      T* qrow = dqp + static_cast<int64_t>(row) * p.stride_dqm + 2 * t4;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn)
        store_pair(qrow + dn * 8, dq[dn][2 * hr] * p.sm_scale, dq[dn][2 * hr + 1] * p.sm_scale);
    }
  }
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

template <typename T, int D>
cudaError_t run_fwd(const SwaParams& p, cudaStream_t stream) {
  return launch_batches(swa_fwd_kernel<T, D>, cdiv(p.seqlen_q, kFwdBM), p.num_heads, fwd_smem_bytes<D>(), p, stream);
}

template <typename T, int D>
cudaError_t run_bwd(const SwaParams& p, cudaStream_t stream) {  // after the delta pre-pass
  cudaError_t err = launch_batches(swa_bwd_dkdv_kernel<T, D>, cdiv(p.seqlen_k, kDkdvBN), p.num_kv_heads,
                                   dkdv_smem_bytes<D>(), p, stream);
  if (err != cudaSuccess) return err;
  return launch_batches(swa_bwd_dq_kernel<T, D>, cdiv(p.seqlen_q, kDqBM), p.num_heads, dq_smem_bytes<D>(), p,
                        stream);
}

// Per-head_dim entry points, one translation unit each (swa_fwd_d64.cu, ...).
cudaError_t fwd_d64(const SwaParams& p, cudaStream_t stream);
cudaError_t fwd_d128(const SwaParams& p, cudaStream_t stream);
cudaError_t bwd_d64(const SwaParams& p, cudaStream_t stream);
cudaError_t bwd_d128(const SwaParams& p, cudaStream_t stream);

}  // namespace swa
}  // namespace sftk
