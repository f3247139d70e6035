// Sliding-window attention forward, head_dim 64 (fp16 and bf16). One file per head_dim
// so that the build compiles the instantiations in parallel.
#include "swa_kernels.cuh"

namespace sftk {
namespace swa {

cudaError_t fwd_d64(const SwaParams& p, cudaStream_t stream) {
  return p.dtype == DType::kBFloat16 ? run_fwd<__nv_bfloat16, 64>(p, stream) : run_fwd<__half, 64>(p, stream);
}

}  // namespace swa
}  // namespace sftk
