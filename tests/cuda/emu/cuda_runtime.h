// CPU-emulation shim for <cuda_runtime.h> (see emu.h). Only what the kernels use.
#pragma once
#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace emu {
dim3 thread_idx();
dim3 block_idx();
void syncthreads();
float shfl_xor(float v, int mask);
void mma_f16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, bool bf16);
void ldmatrix_x4(uint32_t r[4], const void* p, bool trans);
void cp_async_16(void* dst, const void* src, int src_bytes);
void cp_async_wait_all();
unsigned char* dynamic_smem();
void set_max_dynamic_smem(size_t bytes);
void launch_impl(void (*body)(void*), void* ctx, dim3 grid, dim3 block, size_t smem);
template <typename Kernel, typename Arg>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, const Arg& arg) {
  struct Ctx {
    Kernel k;
    Arg a;
  } ctx{kernel, arg};
  launch_impl([](void* c) { static_cast<Ctx*>(c)->k(static_cast<Ctx*>(c)->a); }, &ctx, grid, block, smem);
}
}  // namespace emu
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
inline void __syncthreads() { ::emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return ::emu::shfl_xor(v, mask); }
