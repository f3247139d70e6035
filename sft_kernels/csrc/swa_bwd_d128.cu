// Sliding-window attention backward (dK/dV and dQ), head_dim 128, fp16 and bf16. One file per pass
// and head_dim, so that the build compiles the instantiations in parallel.
#include "swa_kernels.cuh"

template cudaError_t sftk::swa::bwd<128>(const sftk::SwaParams& p, cudaStream_t stream);
