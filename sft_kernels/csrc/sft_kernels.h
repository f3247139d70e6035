// C++ entry points of the CUDA kernels: raw device pointers, element strides and a
// cudaStream_t; no torch types. Used by the torch binding (binding.cpp), by the CMake
// library and by the C++ test executable (tests/cuda/).
//
// Argument checks live in the Python launchers (op.py) and, for what the kernels rely
// on (dtype, head_dim, alignment), in binding.cpp. These functions assume them and
// return cudaErrorInvalidValue for an unsupported head_dim / dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sftk {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Window modes: the same numbers as MODE_EXPLICIT / MODE_KEYS / MODE_SQRT in
// sft_kernels/window.py (the binding exports these, and tests/test_cuda_build.py checks
// that they match).
constexpr int kModeExplicit = 0;  // (left, right) given, -1 = unbounded
constexpr int kModeKeys = 1;      // `keys` keys including self, clamped to the key length
constexpr int kModeSqrt = 2;      // floor(sqrt(seqlen_k)) keys

// Grid axes y and z hold at most this many blocks; x up to 2^31 - 1.
constexpr int kMaxGridYZ = 65535;

// ----------------------------------------------------------------------------- attention
// Mirrors the Triton kernels' arguments (sft_kernels/ops/sliding_window_attention/
// triton_jit.py). Layouts: (batch, seqlen, heads, head_dim) with strides
// (*_b, *_m / *_n, *_h), or packed (total, heads, head_dim) with cu_seqlens (int32,
// batch + 1) and *_b = 0. The last dimension is contiguous; every tensor pointer is
// 16-byte aligned and every row stride a multiple of 8 elements. LSE / delta are fp32
// (batch, heads, seqlen) or (heads, total) with strides (lse_b, lse_h), unit row stride.
//
// Window: kModeExplicit uses (left, right) (-1 = unbounded, causal already applied);
// kModeKeys = `keys` keys clamped to each sequence's key length; kModeSqrt =
// floor(sqrt(seqlen_k)) keys; the last two turn W keys into (W-1, 0) if causal else
// (W/2, (W-1)/2). Queries are aligned to the bottom-right when seqlen_q != seqlen_k.
//
// Grids are (tiles, heads, sequences): blockIdx.y is the head, blockIdx.z the sequence
// minus batch_start; the entry points launch once per 65,535 sequences (any batch size;
// num_heads must be <= 65,535). Row offsets are 64-bit.
struct SwaParams {
  DType dtype = DType::kFloat16;
  int head_dim = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;   // forward output (an input of the backward)
  const void* dout = nullptr;
  void* out = nullptr;       // forward: O
  float* lse = nullptr;      // forward writes, backward reads
  float* delta = nullptr;    // backward workspace, lse's layout
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  const int* cu_seqlens_q = nullptr;  // null unless packed
  const int* cu_seqlens_k = nullptr;

  int64_t stride_qb = 0, stride_qm = 0, stride_qh = 0;
  int64_t stride_kb = 0, stride_kn = 0, stride_kh = 0;
  int64_t stride_vb = 0, stride_vn = 0, stride_vh = 0;
  int64_t stride_ob = 0, stride_om = 0, stride_oh = 0;     // O (forward output)
  int64_t stride_dob = 0, stride_dom = 0, stride_doh = 0;  // dO
  int64_t stride_dqb = 0, stride_dqm = 0, stride_dqh = 0;
  int64_t stride_dkb = 0, stride_dkn = 0, stride_dkh = 0;
  int64_t stride_dvb = 0, stride_dvn = 0, stride_dvh = 0;
  int64_t stride_lb = 0, stride_lh = 0;  // LSE and delta

  int batch = 0;
  int seqlen_q = 0;  // max over the batch when packed
  int seqlen_k = 0;
  int num_heads = 0;     // query heads
  int num_kv_heads = 0;  // num_heads / group
  int group = 1;
  int left = -1, right = -1, keys = 0;
  int window_mode = kModeExplicit;
  bool causal = false;
  float sm_scale = 1.0f;
  int batch_start = 0;  // first sequence of the launch in flight (set by the entry points)
};

// Head dims with compiled kernels.
bool swa_supports_head_dim(int head_dim);

// out, lse <- attention(q, k, v)
cudaError_t swa_forward(const SwaParams& p, cudaStream_t stream);
// delta = rowsum(dO * O); dK, dV over key tiles; dQ over query tiles. No atomics.
cudaError_t swa_backward(const SwaParams& p, cudaStream_t stream);

// ----------------------------------------------------------------------------- block-diagonal
// Tile shape of the grouped GEMM (the launcher builds the block tables with it).
constexpr int kBdBlockM = 128;  // rows of a tile: tokens (forward / dX), m (dW)
constexpr int kBdBlockN = 128;  // columns of a tile
constexpr int kBdBlockK = 32;
constexpr int kBdMetaCols = 8;

// Forward / dX: out[:, col_off_i + :N_i] = a[:, a_off_i + :K_i] @ B_i (+ bias) for every
// block i in one launch. Block table (int32, G x 8, device):
//   a_off, col_off, K_i, N_i, w_off, ld_w, tile_start, 0
// tile_start = sum_{j<i} ceil(N_j / kBdBlockN). Forward: B_i = W_i^T (W_i (N_i, K_i)
// row-major at w_off, ld_w = K_i); dX (trans_w): B_i = W_i (W_i (K_i, N_i), ld_w = N_i).
// a: (T, *) row stride lda, unit column stride; out row stride ldo, unit column stride.
struct BdGemmParams {
  DType dtype = DType::kFloat16;
  const void* a = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;  // forward only; null for none
  void* out = nullptr;
  const int* meta = nullptr;
  int num_groups = 0;
  int total_tiles_n = 0;  // sum_i ceil(N_i / kBdBlockN)
  int64_t tokens = 0;
  int64_t lda = 0, ldo = 0;
  bool trans_w = false;
};
cudaError_t bd_gemm(const BdGemmParams& p, cudaStream_t stream);

// dW_i = dy[:, m_off_i + :m_i]^T @ x[:, n_off_i + :n_i], summed over tokens, split into
// `split` chunks of `t_chunk` tokens (a multiple of kBdBlockK). split == 1 writes the
// flat dW in the input dtype at w_off_i; split > 1 writes fp32 partials
// (split, numel) with row stride `stride_split`, summed by the caller. Block table
// (int32, G x 8): m_off, n_off, m_i, n_i, w_off, 0, tile_start, n_tiles_i with
// tile_start = sum_{j<i} ceil(m_j / kBdBlockM) * ceil(n_j / kBdBlockN).
struct BdDwParams {
  DType dtype = DType::kFloat16;
  const void* dy = nullptr;
  const void* x = nullptr;
  void* dw = nullptr;
  bool dw_fp32 = false;
  const int* meta = nullptr;
  int num_groups = 0;
  int total_tiles = 0;
  int64_t tokens = 0;
  int64_t ld_dy = 0, ld_x = 0;
  int64_t t_chunk = 0;
  int split = 1;
  int64_t stride_split = 0;
};
cudaError_t bd_dw(const BdDwParams& p, cudaStream_t stream);

}  // namespace sftk
