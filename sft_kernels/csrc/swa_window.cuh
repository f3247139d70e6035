// The window rule of the CUDA attention kernels, every kernel's one copy: a device function per
// @triton.jit helper of the Triton kernels (sft_kernels/ops/sliding_window_attention/triton_jit.py)
// that finds a sequence, its window, the tiles a program visits or the band mask, under that
// helper's name less the leading underscore, with its meaning and arithmetic line for line:
//   _isqrt -> isqrt, _resolve_window -> resolve_window, _seq_info -> seq_info,
//   _key_phases -> key_phases, _query_phases -> query_phases, _band_mask -> band_mask,
//   _q_tile_prologue -> q_tile_prologue.
// The softcap helpers (_tanh, _scores, _softcap_grad, _score_scales) have no counterpart: the
// CUDA kernels take no softcap (op.py refuses it by name).
//
// Notation (window.py): query i of a sequence sees keys j with i + off - left <= j <=
// i + off + right, off = len_k - len_q (bottom-right alignment); -1 = unbounded on that side.
#pragma once

#include <cmath>

#include "sft_kernels.h"

namespace sftk {
namespace swa {

__host__ __device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// _isqrt: floor(sqrt(n)), exact for 0 <= n < 2^31 (fp32 estimate, corrected in int64).
__device__ __forceinline__ int isqrt(int n) {
  long long r = static_cast<long long>(sqrtf(static_cast<float>(n)));
  while (r > 0 && r * r > n) --r;
  while ((r + 1) * (r + 1) <= n) ++r;
  return static_cast<int>(r);
}

struct Window {
  int left, right;  // -1 = unbounded
};

// _resolve_window: (left, right) for one sequence of len_k keys (window.py's WindowSpec.resolve).
__device__ __forceinline__ Window resolve_window(int left, int right, int keys, int len_k, int mode, bool causal) {
  if (mode == kModeExplicit) return {left, right};
  int w = mode == kModeKeys ? min(keys, len_k) : isqrt(len_k);  // else kModeSqrt
  w = max(w, 1);
  if (causal) return {w - 1, 0};
  return {w / 2, (w - 1) / 2};
}

struct Seq {
  int q_start, k_start, len_q, len_k;
};

// _seq_info: the first query / key row and the lengths of sequence b (packed or padded).
__device__ __forceinline__ Seq seq_info(const SwaParams& p, int b) {
  if (p.cu_seqlens_q != nullptr) {
    const int qs = p.cu_seqlens_q[b], qe = p.cu_seqlens_q[b + 1];
    const int ks = p.cu_seqlens_k[b], ke = p.cu_seqlens_k[b + 1];
    return {qs, ks, qe - qs, ke - ks};
  }
  return {0, 0, p.seqlen_q, p.seqlen_k};
}

struct Phases {
  int lo, full_lo, full_hi, hi;
};

// _key_phases: key-tile bounds for query rows [start_m, start_m + BM). Tiles in [lo, full_lo)
// and [full_hi, hi) need the mask, [full_lo, full_hi) are inside the band for every row
// (every quotient has a non-negative dividend).
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

// _query_phases: query-tile bounds for key columns [start_n, start_n + BN); as key_phases.
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

// _band_mask: true where query `row` attends key `col` and both are in range.
__device__ __forceinline__ bool band_mask(int row, int col, int off, int left, int right, int len_q, int len_k) {
  const int pos = row + off;
  return col < len_k && row < len_q && col >= 0 && (left < 0 || col >= pos - left) && (right < 0 || col <= pos + right);
}

// A program's sequence and window: what _q_tile_prologue (forward, dQ) and the dK/dV
// kernel's first lines compute from (blockIdx.x, blockIdx.z) on a grid (tiles, heads,
// sequences). `start` is the tile's first query row (query tiles) or key (key tiles).
struct Tile {
  int b, start;
  Seq s;
  int left, right, off;
  __device__ __forceinline__ bool keep(int row, int col) const {  // band_mask in this sequence
    return band_mask(row, col, off, left, right, s.len_q, s.len_k);
  }
  __device__ __forceinline__ Phases key_phases(int BM, int BN) const {  // of a query tile
    return swa::key_phases(start, off, left, right, s.len_k, BM, BN);
  }
  __device__ __forceinline__ Phases query_phases(int BM, int BN) const {  // of a key tile
    return swa::query_phases(start, off, left, right, s.len_q, BM, BN);
  }
};

__device__ __forceinline__ Tile tile_prologue(const SwaParams& p, int tile_rows) {
  Tile t;
  t.b = p.batch_start + static_cast<int>(blockIdx.z);
  t.start = static_cast<int>(blockIdx.x) * tile_rows;
  t.s = seq_info(p, t.b);
  const Window w = resolve_window(p.left, p.right, p.keys, t.s.len_k, p.window_mode, p.causal);
  t.left = w.left;
  t.right = w.right;
  t.off = t.s.len_k - t.s.len_q;
  return t;
}

// _q_tile_prologue: a query-tile program (forward, dQ) of head blockIdx.y, kv head h / group.
// The caller returns when t.start >= t.s.len_q (a tile past its sequence's end).
struct QTile : Tile {
  int h, hk;
};

__device__ __forceinline__ QTile q_tile_prologue(const SwaParams& p, int BM) {
  QTile t;
  static_cast<Tile&>(t) = tile_prologue(p, BM);
  t.h = static_cast<int>(blockIdx.y);
  t.hk = t.h / p.group;
  return t;
}

}  // namespace swa
}  // namespace sftk
