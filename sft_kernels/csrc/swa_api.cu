// Sliding-window attention entry points: head_dim dispatch and the delta pre-pass.
#include "swa_kernels.cuh"

namespace sftk {
namespace swa {

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32; one warp per row, 8 rows per CTA.
template <typename T>
__global__ void __launch_bounds__(256) swa_bwd_delta_kernel(const SwaParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = p.batch_start + static_cast<int>(blockIdx.z), h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int row = blockIdx.x * 8 + warp;
  if (row >= s.len_q) return;
  const int64_t r = s.q_start + row;
  const T* o = static_cast<const T*>(p.o) + b * p.stride_ob + h * p.stride_oh + r * p.stride_om;
  const T* d = static_cast<const T*>(p.dout) + b * p.stride_dob + h * p.stride_doh + r * p.stride_dom;
  float acc = 0.f;
  for (int i = lane; i < p.head_dim; i += 32) acc += Dtype<T>::to_float(o[i]) * Dtype<T>::to_float(d[i]);
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (lane == 0) p.delta[b * p.stride_lb + h * p.stride_lh + r] = acc;
}

}  // namespace swa

bool swa_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t swa_forward(const SwaParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return swa::fwd<64>(p, stream);
    case 128:
      return swa::fwd<128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t swa_backward(const SwaParams& p, cudaStream_t stream) {
  if (!swa_supports_head_dim(p.head_dim)) return cudaErrorInvalidValue;
  if (p.num_heads > kMaxGridYZ) return cudaErrorInvalidValue;
  if (p.batch > 0 && p.num_heads > 0 && p.seqlen_q > 0) {
    auto kernel = p.dtype == DType::kBFloat16 ? swa::swa_bwd_delta_kernel<__nv_bfloat16>
                                              : swa::swa_bwd_delta_kernel<__half>;
    SwaParams q = p;
    for (int b0 = 0; b0 < p.batch; b0 += kMaxGridYZ) {  // grid (row blocks, heads, sequences)
      q.batch_start = b0;
      const int nb = p.batch - b0 < kMaxGridYZ ? p.batch - b0 : kMaxGridYZ;
      SFTK_LAUNCH(kernel, dim3(swa::cdiv(p.seqlen_q, 8), p.num_heads, nb), 256, 0, stream, q);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return p.head_dim == 64 ? swa::bwd<64>(p, stream) : swa::bwd<128>(p, stream);
}

}  // namespace sftk
