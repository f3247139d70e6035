// Tensor-core building blocks shared by the kernels: mma.sync m16n8k16 (fp16/bf16 in,
// fp32 accumulate), ldmatrix, cp.async, and a tile loader. Device code only; no torch.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   B (16x8, "col")       b0: (k=2t..2t+1, n=g)  b1: (k=2t+8.., n=g)
//   C (16x8, fp32)        c0,c1: (g, 2t..2t+1)  c2,c3: (g+8, 2t..2t+1)
// Two C fragments that are neighbours in n (columns 16j..16j+15) are exactly the A
// fragment of k-step j once packed to 16 bits (the FlashAttention-2 register reuse).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace sftk {

#if defined(SFTK_EMULATE)
// CPU emulation (tests/cuda/emu/): the same primitives written in C++ over fibers, so
// the kernels below run unchanged on a machine without a GPU.
#include "emu_primitives.h"
#else
// ----------------------------------------------------------------------------- dtypes
// mma.sync m16n8k16, A and B of type AB ("f16" or "bf16"), fp32 C += A B.
#define SFTK_MMA_M16N8K16(AB, c, a, b0, b1)                                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
               "{%0,%1,%2,%3};\n"                                                                                \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename H2>
__device__ __forceinline__ uint32_t bits32(H2 h) {  // a __half2 / __nv_bfloat162 as the 32 bits mma takes
  return *reinterpret_cast<uint32_t*>(&h);
}

// T = __half or __nv_bfloat16.
template <typename T>
struct Dtype {
  static constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  static_assert(kBf16 || std::is_same<T, __half>::value, "the kernels take float16 or bfloat16");
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {  // lo in the low 16 bits
    if constexpr (kBf16) return bits32(__floats2bfloat162_rn(lo, hi));
    else return bits32(__floats2half2_rn(lo, hi));
  }
  static __device__ __forceinline__ float to_float(T x) {
    if constexpr (kBf16) return __bfloat162float(x);
    else return __half2float(x);
  }
  static __device__ __forceinline__ T from_float(float x) {
    if constexpr (kBf16) return __float2bfloat16_rn(x);
    else return __float2half_rn(x);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    if constexpr (kBf16) SFTK_MMA_M16N8K16("bf16", c, a, b0, b1);
    else SFTK_MMA_M16N8K16("f16", c, a, b0, b1);
  }
};

// ----------------------------------------------------------------------------- ldmatrix
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// ----------------------------------------------------------------------------- cp.async
// 16 bytes global -> shared; src_bytes = 0 writes zeros without reading (gptr must still
// be a valid address).
__device__ __forceinline__ void cp_async_16(void* sptr, const void* gptr, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(sptr)), "l"(gptr),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Dynamic shared memory of a kernel, and a kernel launch.
#define SFTK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define SFTK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
template <typename Kernel>
inline cudaError_t set_max_dynamic_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}
#endif  // SFTK_EMULATE

// Operand fetchers from shared memory (ld = row length in elements, a multiple of 8;
// every row starts 16-byte aligned). Each thread passes its own lane.
//
// A fragment of the 16x16 block at (row r0, col k0) of a row-major [M][K] tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t a[4], const T* s, int ld, int r0, int k0, int lane) {
  ldmatrix_x4(a, s + (r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}
// A fragment of rows m0..m0+15, k0..k0+15 from a K-major tile stored [K][M].
template <typename T>
__device__ __forceinline__ void load_a_kmajor(uint32_t a[4], const T* s, int ld, int m0, int k0, int lane) {
  ldmatrix_x4_trans(a, s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8);
}
// B fragments of two n-blocks (n0..n0+7 -> b[0], b[1]; n0+8..n0+15 -> b[2], b[3]) for
// k0..k0+15, from a tile stored [N][K] (e.g. K rows when computing Q K^T).
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t b[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}
// The same from a tile stored [K][N] (e.g. V rows when computing P V).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t b[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// Copy a ROWS x COLS tile (COLS a multiple of 8) from global memory (element (0, 0) at
// `g`, row stride `g_ld` elements, unit column stride) into shared memory (row stride
// `s_ld`), zero-filling rows >= rows_valid and columns >= cols_valid. `vec` says `g`
// is 16-byte aligned and g_ld a multiple of 8: whole 8-element chunks then go through
// cp.async; otherwise (and for a chunk that straddles cols_valid) elements are copied
// one by one. Call cp_async_commit / cp_async_wait_all + __syncthreads afterwards.
template <typename T, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void load_tile(T* s, int s_ld, const T* g, int64_t g_ld, int rows_valid, int cols_valid,
                                          bool vec, int tid) {
  constexpr int CHUNKS_PER_ROW = COLS / 8;
  constexpr int CHUNKS = ROWS * CHUNKS_PER_ROW;
  static_assert(COLS % 8 == 0, "tile width must be a multiple of 8");
#pragma unroll 1
  for (int c0 = 0; c0 < CHUNKS; c0 += NTHREADS) {
    const int c = c0 + tid;
    if (CHUNKS % NTHREADS == 0 || c < CHUNKS) {
      const int row = c / CHUNKS_PER_ROW;
      const int col = (c % CHUNKS_PER_ROW) * 8;
      T* dst = s + row * s_ld + col;
      const bool row_ok = row < rows_valid;
      if (vec && (!row_ok || col >= cols_valid || col + 8 <= cols_valid)) {
        const bool ok = row_ok && col < cols_valid;
        cp_async_16(dst, ok ? static_cast<const void*>(g + row * g_ld + col) : static_cast<const void*>(g),
                    ok ? 16 : 0);
      } else {
        // raw 16-bit copies: torch builds define __CUDA_NO_HALF_CONVERSIONS__
        const uint16_t* src = reinterpret_cast<const uint16_t*>(g) + row * g_ld + col;
        uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma unroll
        for (int e = 0; e < 8; ++e) d[e] = (row_ok && col + e < cols_valid) ? src[e] : uint16_t(0);
      }
    }
  }
}

// A warp's fp32 accumulator fragments (float c[N][4], the C layout above) set to 0.
template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// A double-buffered cp.async pipeline over n stages: issue(i, buf) starts the copies of stage
// i into buffer buf (0 or 1), consume(i, buf) reads them. One barrier per stage: stage i has
// landed and every warp is done with the other buffer (read by consume(i - 1)) before stage
// i + 1 is issued into it. Every kernel's main loop.
template <typename Issue, typename Consume>
__device__ __forceinline__ void pipeline(int n, Issue&& issue, Consume&& consume) {
  if (n > 0) issue(0, 0);
  cp_async_commit();
  for (int it = 0; it < n; ++it) {
    const int buf = it & 1;
    cp_async_wait_all();
    __syncthreads();  // stage `it` landed; every warp is done with the other buffer
    if (it + 1 < n) issue(it + 1, buf ^ 1);
    cp_async_commit();
    consume(it, buf);
  }
  cp_async_wait_all();
}

__device__ __forceinline__ float warp_max4(float x) {  // over the 4 threads of a quad
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
__device__ __forceinline__ float warp_sum4(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

}  // namespace sftk
