// Block-diagonal merged matmul as a grouped GEMM on mma.sync tensor cores.
//
// One CTA (8 warps, 2 x 4) computes a 128 x 128 output tile with fp32 accumulators
// (each warp 64 x 32), stepping K by 32 through two shared-memory stages filled by
// cp.async (16-byte chunks where the rows are 16-byte aligned, element copies for
// odd sizes and ragged edges). Tiles of every block are enumerated by one grid:
//   forward / dX: blockIdx.x = token tile (up to 2^31 - 1 of them), blockIdx.y = column
//                 tile over all blocks (block found by a binary search of the block table);
//   dW:           blockIdx.x = (m, n) tile over all blocks, blockIdx.y = token split.
// The zero blocks of the merged weight are never read. Semantics match
// sft_kernels/ops/block_diag/triton_kernels.py; block tables are built by
// sft_kernels/ops/block_diag/cuda_backend.py (layout in sft_kernels.h).
#include "mma.cuh"
#include "sft_kernels.h"

namespace sftk {
namespace bd {

constexpr int BM = kBdBlockM, BN = kBdBlockN, BK = kBdBlockK;
constexpr int kThreads = 256;
constexpr int kPad = 8;
static_assert(BM == 128 && BN == 128 && BK % 16 == 0, "warp layout assumes 128 x 128 tiles");

__device__ __forceinline__ int find_group(const int* meta, int num_groups, int tile) {
  int lo = 0, hi = num_groups - 1;  // last group whose tile_start <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta[mid * kBdMetaCols + 6] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// acc[mi][ni] += A(64 x BK slab of this warp) * B(BK x 32 slab), for one shared stage.
// A_KMAJOR: A stored [BK][BM + pad] (dW's dy^T), else [BM][BK + pad].
// B_KN: B stored [BK][BN + pad], else [BN][BK + pad] (W_i rows in the forward).
template <typename T, bool A_KMAJOR, bool B_KN>
__device__ __forceinline__ void mma_stage(float acc[4][4][4], const T* sA, const T* sB, int warp_m, int warp_n,
                                          int lane) {
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    uint32_t af[4][4], bf[2][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
      A_KMAJOR ? load_a_kmajor(af[mi], sA, BM + kPad, warp_m * 64 + mi * 16, ks * 16, lane)
               : load_a(af[mi], sA, BK + kPad, warp_m * 64 + mi * 16, ks * 16, lane);
#pragma unroll
    for (int nj = 0; nj < 2; ++nj)
      B_KN ? load_b_kn(bf[nj], sB, BN + kPad, warp_n * 32 + nj * 16, ks * 16, lane)
           : load_b_nk(bf[nj], sB, BK + kPad, warp_n * 32 + nj * 16, ks * 16, lane);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        Dtype<T>::mma(acc[mi][2 * nj], af[mi], bf[nj][0], bf[nj][1]);
        Dtype<T>::mma(acc[mi][2 * nj + 1], af[mi], bf[nj][2], bf[nj][3]);
      }
  }
}

// acc = this warp's share of the tile's A B over k_tiles steps of BK: issue(kt, buf) loads
// step kt into sA[buf], sB[buf] (mma_stage's layouts), through the two-stage pipeline.
template <typename T, bool A_KMAJOR, bool B_KN, int A_SIZE, int B_SIZE, typename Issue>
__device__ __forceinline__ void mainloop(float (&acc)[4][4][4], const T (&sA)[2][A_SIZE], const T (&sB)[2][B_SIZE],
                                         int k_tiles, Issue&& issue, int warp_m, int warp_n, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) zero(acc[i]);
  pipeline(k_tiles, issue,
           [&](int, int buf) { mma_stage<T, A_KMAJOR, B_KN>(acc, sA[buf], sB[buf], warp_m, warp_n, lane); });
}

// f(ni, c, col) for each of this thread's accumulator columns (acc[.][ni][2 hr + c]) in the
// output, col = n0 + warp_n * 32 + ni * 8 + 2 (lane % 4) + c, below N.
template <typename F>
__device__ __forceinline__ void for_each_col(int n0, int N, int warp_n, int lane, F&& f) {
#pragma unroll
  for (int ni = 0; ni < 4; ++ni)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = n0 + warp_n * 32 + ni * 8 + 2 * (lane & 3) + c;
      if (col < N) f(ni, c, col);
    }
}

// Forward (TRANS_W = false): out_i = a_i @ W_i^T (+ bias_i); dX (TRANS_W): out_i = a_i @ W_i.
template <typename T, bool TRANS_W>
__global__ void __launch_bounds__(kThreads) bd_gemm_kernel(const BdGemmParams p) {
  constexpr int A_SIZE = BM * (BK + kPad);
  constexpr int B_SIZE = TRANS_W ? BK * (BN + kPad) : BN * (BK + kPad);
  __shared__ __align__(16) T sA[2][A_SIZE];
  __shared__ __align__(16) T sB[2][B_SIZE];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int tile = blockIdx.y;
  const int gi = find_group(p.meta, p.num_groups, tile);
  const int* meta = p.meta + gi * kBdMetaCols;
  const int a_off = meta[0], col_off = meta[1], K = meta[2], N = meta[3], w_off = meta[4], ld_w = meta[5];
  const int n0 = (tile - meta[6]) * BN;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows_valid = static_cast<int>(min(static_cast<int64_t>(BM), p.tokens - t0));

  const T* a = static_cast<const T*>(p.a) + t0 * p.lda + a_off;
  const T* w = static_cast<const T*>(p.w) + w_off;
  const bool vec_a = aligned16(a) && (p.lda % 8) == 0;
  const bool vec_w = aligned16(w) && (ld_w % 8) == 0;
  const int k_tiles = (K + BK - 1) / BK;

  auto issue = [&](int kt, int buf) {
    const int k0 = kt * BK;
    load_tile<T, BM, BK, kThreads>(sA[buf], BK + kPad, a + k0, p.lda, rows_valid, K - k0, vec_a, tid);
    if (TRANS_W)  // B = W_i (K x N): rows k0.., columns n0..
      load_tile<T, BK, BN, kThreads>(sB[buf], BN + kPad, w + static_cast<int64_t>(k0) * ld_w + n0, ld_w, K - k0,
                                     N - n0, vec_w, tid);
    else  // B^T = W_i (N x K): rows n0.., columns k0..
      load_tile<T, BN, BK, kThreads>(sB[buf], BK + kPad, w + static_cast<int64_t>(n0) * ld_w + k0, ld_w, N - n0,
                                     K - k0, vec_w, tid);
  };

  float acc[4][4][4];
  mainloop<T, false, TRANS_W>(acc, sA, sB, k_tiles, issue, warp_m, warp_n, lane);

  const int g = lane >> 2;
  T* out = static_cast<T*>(p.out) + col_off;
  const T* bias = p.bias != nullptr ? static_cast<const T*>(p.bias) + col_off : nullptr;
  for_each_col(n0, N, warp_n, lane, [&](int ni, int c, int col) {
    const float bv = bias != nullptr ? Dtype<T>::to_float(bias[col]) : 0.f;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = warp_m * 64 + mi * 16 + g + 8 * hr;
        if (r < rows_valid) out[(t0 + r) * p.ldo + col] = Dtype<T>::from_float(acc[mi][ni][2 * hr + c] + bv);
      }
  });
}

// dW_i tile = dy_i^T x_i over the tokens of one split.
template <typename T>
__global__ void __launch_bounds__(kThreads) bd_dw_kernel(const BdDwParams p) {
  constexpr int A_SIZE = BK * (BM + kPad);
  constexpr int B_SIZE = BK * (BN + kPad);
  __shared__ __align__(16) T sA[2][A_SIZE];
  __shared__ __align__(16) T sB[2][B_SIZE];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int gi = find_group(p.meta, p.num_groups, tile);
  const int* meta = p.meta + gi * kBdMetaCols;
  const int m_off = meta[0], n_off = meta[1], M = meta[2], N = meta[3], w_off = meta[4];
  const int local = tile - meta[6], n_tiles = meta[7];
  const int m0 = (local / n_tiles) * BM, n0 = (local % n_tiles) * BN;
  const int64_t t_start = static_cast<int64_t>(split) * p.t_chunk;
  const int64_t t_end = min(p.tokens, t_start + p.t_chunk);
  const int k_tiles = t_end > t_start ? static_cast<int>((t_end - t_start + BK - 1) / BK) : 0;

  const T* dy = static_cast<const T*>(p.dy) + m_off + m0;
  const T* x = static_cast<const T*>(p.x) + n_off + n0;
  const bool vec_a = aligned16(dy) && (p.ld_dy % 8) == 0;
  const bool vec_b = aligned16(x) && (p.ld_x % 8) == 0;
  auto issue = [&](int kt, int buf) {
    const int64_t t0 = t_start + static_cast<int64_t>(kt) * BK;
    const int rows = static_cast<int>(min(static_cast<int64_t>(BK), t_end - t0));
    load_tile<T, BK, BM, kThreads>(sA[buf], BM + kPad, dy + t0 * p.ld_dy, p.ld_dy, rows, M - m0, vec_a, tid);
    load_tile<T, BK, BN, kThreads>(sB[buf], BN + kPad, x + t0 * p.ld_x, p.ld_x, rows, N - n0, vec_b, tid);
  };

  float acc[4][4][4];
  mainloop<T, true, true>(acc, sA, sB, k_tiles, issue, warp_m, warp_n, lane);

  const int g = lane >> 2;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = m0 + warp_m * 64 + mi * 16 + g + 8 * hr;
      if (row >= M) continue;
      const int64_t base = static_cast<int64_t>(w_off) + static_cast<int64_t>(row) * N;
      for_each_col(n0, N, warp_n, lane, [&](int ni, int c, int col) {
        const float val = acc[mi][ni][2 * hr + c];
        if (p.dw_fp32)
          static_cast<float*>(p.dw)[split * p.stride_split + base + col] = val;
        else
          static_cast<T*>(p.dw)[base + col] = Dtype<T>::from_float(val);
      });
    }
}

}  // namespace bd

cudaError_t bd_gemm(const BdGemmParams& p, cudaStream_t stream) {
  if (p.tokens <= 0 || p.total_tiles_n <= 0 || p.num_groups <= 0) return cudaSuccess;
  const int64_t t_tiles = (p.tokens + bd::BM - 1) / bd::BM;
  if (p.total_tiles_n > kMaxGridYZ || t_tiles > 0x7fffffff) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(t_tiles), p.total_tiles_n);
  const bool bf16 = p.dtype == DType::kBFloat16;
  auto kernel = p.trans_w ? (bf16 ? bd::bd_gemm_kernel<__nv_bfloat16, true> : bd::bd_gemm_kernel<__half, true>)
                          : (bf16 ? bd::bd_gemm_kernel<__nv_bfloat16, false> : bd::bd_gemm_kernel<__half, false>);
  SFTK_LAUNCH(kernel, grid, bd::kThreads, 0, stream, p);
  return cudaGetLastError();
}

cudaError_t bd_dw(const BdDwParams& p, cudaStream_t stream) {
  if (p.total_tiles <= 0 || p.num_groups <= 0 || p.split <= 0) return cudaSuccess;
  if (p.split > kMaxGridYZ) return cudaErrorInvalidValue;
  dim3 grid(p.total_tiles, p.split);
  auto kernel = p.dtype == DType::kBFloat16 ? bd::bd_dw_kernel<__nv_bfloat16> : bd::bd_dw_kernel<__half>;
  SFTK_LAUNCH(kernel, grid, bd::kThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace sftk
