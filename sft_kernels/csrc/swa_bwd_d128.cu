// Sliding-window attention backward (dK/dV and dQ kernels), head_dim 128 (fp16 and bf16).
#include "swa_kernels.cuh"

namespace sftk {
namespace swa {

cudaError_t bwd_d128(const SwaParams& p, cudaStream_t stream) {
  return p.dtype == DType::kBFloat16 ? run_bwd<__nv_bfloat16, 128>(p, stream) : run_bwd<__half, 128>(p, stream);
}

}  // namespace swa
}  // namespace sftk
