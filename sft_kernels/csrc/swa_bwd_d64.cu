// Sliding-window attention backward (dK/dV and dQ kernels), head_dim 64 (fp16 and bf16).
#include "swa_kernels.cuh"

namespace sftk {
namespace swa {

cudaError_t bwd_d64(const SwaParams& p, cudaStream_t stream) {
  return p.dtype == DType::kBFloat16 ? run_bwd<__nv_bfloat16, 64>(p, stream) : run_bwd<__half, 64>(p, stream);
}

}  // namespace swa
}  // namespace sftk
